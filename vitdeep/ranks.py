"""The rank variables a launcher sets, read and checked in one place.

A process started by hand has none of them: it is rank 0 of 1. A launcher (deepspeed, torchrun;
Slurm through them) sets all of `LAUNCH_VARIABLES`, torchrun also LOCAL_WORLD_SIZE. Half a set,
such as WORLD_SIZE=2 left exported in a shell, used to go wrong late: DeepSpeed went looking for
MPI (a traceback), or the plan counted two ranks where the process group had one (an assertion
deep in DeepSpeed, after `--out` was written). So are a value that is not a number, and a rank
outside its world. Each is refused in one line naming the variable, before anything is written.

Free of torch: the error printer asks which rank it runs on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from vitdeep.errors import UserError
from vitdeep.fields import MAX_RANKS, Range, at_least, shown, within

#: What a launcher sets for every rank: who it is, and where the ranks meet.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_WHOLE = re.compile(r"\s*\+?([0-9]+)\s*")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    #: Ranks on this machine, when the launcher says (torchrun's LOCAL_WORLD_SIZE, or LOCAL_SIZE).
    local_world_size: int | None = None


def _whole(environ: Mapping[str, str], name: str, valid: Range) -> int | None:
    text = environ.get(name)
    if text is None:
        return None
    match = _WHOLE.fullmatch(text)
    # more digits than any rank count has are simply too large (and int() of thousands is refused)
    value = (int(match[1]) if len(match[1].lstrip("0")) <= 19 else float("inf")) if match else None
    if value is None or value not in valid:
        wanted = valid.interval() if value is None else valid.complaint(value)
        raise UserError(f"the environment sets {name}={shown(text)}: it must be a whole number {wanted}")
    return value


def read_ranks(environ: Mapping[str, str] = os.environ) -> Ranks:
    """This process's place among the ranks, from the launcher's variables (rank 0 of 1 without
    them); a `UserError` for malformed, half-set or inconsistent ones."""
    rank = _whole(environ, "RANK", at_least(0, MAX_RANKS - 1))
    world_size = _whole(environ, "WORLD_SIZE", at_least(1, MAX_RANKS))
    local_rank = _whole(environ, "LOCAL_RANK", at_least(0, MAX_RANKS - 1))
    local_sizes = [_whole(environ, name, at_least(1, MAX_RANKS)) for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")]
    local_world_size = next((size for size in local_sizes if size is not None), None)
    _whole(environ, "MASTER_PORT", within(1, 65535))
    if rank is None:
        if world_size not in (None, 1):
            raise UserError(f"the environment sets WORLD_SIZE={world_size} but no RANK: start the ranks with deepspeed or "
                            "torchrun (they set both), or unset WORLD_SIZE to run one process")
        return Ranks(0, 1, 0, local_world_size)
    missing = [name for name in LAUNCH_VARIABLES if not environ.get(name, "").strip()]
    if missing:
        raise UserError(f"the environment sets RANK but not {', '.join(missing)}: a launcher (deepspeed, torchrun) sets all of "
                        f"{', '.join(LAUNCH_VARIABLES)}; start the ranks with one, or unset RANK to run one process")
    address = environ["MASTER_ADDR"].strip()
    if len(address) > 253 or any(c.isspace() for c in address):
        raise UserError(f"the environment sets MASTER_ADDR={shown(address)}: it must be a host name or address")
    if rank >= world_size:
        raise UserError(f"the environment sets RANK={rank} and WORLD_SIZE={world_size}: ranks are numbered 0 to WORLD_SIZE - 1")
    if local_world_size is not None and (local_world_size > world_size or local_rank >= local_world_size):
        raise UserError(f"the environment sets LOCAL_RANK={local_rank} of LOCAL_WORLD_SIZE={local_world_size} in WORLD_SIZE="
                        f"{world_size}: a machine's ranks are numbered 0 to LOCAL_WORLD_SIZE - 1, at most WORLD_SIZE of them")
    if local_rank >= world_size:
        raise UserError(f"the environment sets LOCAL_RANK={local_rank} and WORLD_SIZE={world_size}: LOCAL_RANK must be below WORLD_SIZE")
    return Ranks(rank, world_size, local_rank, local_world_size)
