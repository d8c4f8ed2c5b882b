"""Training checkpoints: save, find the newest complete one, resume, prune.

Layout under `OUT/checkpoints/step_00001000/`: DeepSpeed's engine state (every rank writes its
own ZeRO partition, so the directory must be on storage all nodes share), one
`rank_00000.pt` per rank (RNG states and that rank's EMA partition), and last the marker
`vitdeep.json` (step, epoch, data position, config, metrics). The marker is written by rank 0
only after every rank has finished writing, atomically, so a save interrupted at any point never
leaves a checkpoint that looks complete; `--resume auto` only considers marked ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdeep.errors import UserError

MARKER = "vitdeep.json"
CHECKPOINTS = "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.pt"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary name in the same directory, then rename (atomic on POSIX)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of a complete checkpoint directory, or None."""
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _marked(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, marker) of each complete checkpoint under `out/checkpoints`, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(p, read_marker(p)) for p in root.iterdir() if p.is_dir()]
    return sorted(((p, m) for p, m in found if m is not None), key=lambda pm: pm[1]["step"])


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under `out/checkpoints`, oldest first."""
    return [path for path, _ in _marked(out)]


def resolve_resume(resume: str | None, out: Path) -> Path | None:
    """`auto` → newest complete checkpoint in `out` (None when there is none); a path must be complete."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {resume}")
    if read_marker(path) is None:
        raise UserError(f"{resume} is not a complete vitdeep checkpoint (no {MARKER}; an interrupted save?)")
    return path


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine: Any,
    out: Path,
    *,
    rank: int,
    step: int,
    meta: dict[str, Any],
    ema_state: dict[str, Any] | None,
) -> Path:
    """Save on every rank (a collective); returns the checkpoint directory."""
    import torch.distributed as dist

    root = Path(out) / CHECKPOINTS
    tag = tag_for(step)
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # the remains of an interrupted save at this step
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"vitdeep": {"step": step}}, save_latest=False)
    own = rank_file(path, rank)
    tmp = own.with_name(own.name + ".tmp")
    torch.save({"rng": rng_state(), "ema": ema_state}, tmp)
    os.replace(tmp, own)
    dist.barrier()
    if rank == 0:
        write_json_atomic(path / MARKER, {**meta, "step": step, "world_size": dist.get_world_size()})
    dist.barrier()
    return path


def prune_checkpoints(out: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints and the best by validation top-1;
    remove the rest and the remains of interrupted saves older than the newest complete one."""
    marked = _marked(out)
    if not marked:
        return
    complete = [path for path, _ in marked]
    keep = set(complete[-max(keep_last, 1):])
    scored = [(marker["val_top1"], path) for path, marker in marked if marker.get("val_top1") is not None]
    if scored:
        keep.add(max(scored, key=lambda sp: sp[0])[1])
    newest_step = marked[-1][1]["step"]
    for path in (Path(out) / CHECKPOINTS).iterdir():
        if not path.is_dir() or path in keep:
            continue
        step = _step_of(path)
        if path in complete or (step is not None and step < newest_step):
            shutil.rmtree(path, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return None


def load_checkpoint(engine: Any, path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load engine state (weights, optimizer) from a complete checkpoint; returns
    (marker, this rank's extra state with `rng` and `ema`)."""
    marker = read_marker(path)
    engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False)
    extra = torch.load(rank_file(path, rank), map_location="cpu", weights_only=False)
    return marker, extra
