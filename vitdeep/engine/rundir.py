"""A run's output folder: one run at a time, never a new run over an old one by accident.

- `RunLock`: an exclusive lock file `OUT/.vitdeep.lock` (host, pid, start time, Slurm job), held by
  rank 0 for the whole run. A lock left by a run that is gone (its pid is not alive on this
  host, or the same Slurm job was requeued) is taken over; one held elsewhere refuses the run.
- `existing_run`: what an older run left in OUT, so that a new run without `--resume` is refused
  (keep-last pruning would otherwise delete the new run's checkpoints, the higher old steps
  being "newer") unless `--overwrite` says to replace it (`clear_run`).
- `trim_metrics`: a resumed run re-logs the steps after its checkpoint; the rows the interrupted
  run wrote past it are dropped first.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from vitdeep.engine.checkpoint import CHECKPOINTS, complete_checkpoints, read_marker
from vitdeep.errors import UserError

LOCK = ".vitdeep.lock"
#: What a run writes into OUT (removed by `--overwrite`; nothing else in OUT is touched).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "tb", CHECKPOINTS)


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (tells a live pid from a reused one), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


class RunLock:
    """Exclusive use of a run directory by one run (see the module docstring)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises `UserError` when
        another live run holds it."""
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._is_stale(holder):
                    raise UserError(
                        f"`out` {self.path.parent} is in use by another run (host {holder.get('host')}, pid "
                        f"{holder.get('pid')}, since {holder.get('since')}); two runs cannot share `out`. If that run "
                        f"is gone, delete {self.path}", params=("out",)
                    ) from None
                note = f"took over the lock of a run that is gone (host {holder.get('host')}, pid {holder.get('pid')})"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as stream:
                json.dump(_owner(), stream)
            self.held = True
            return note
        raise UserError(f"`out` {self.path.parent}: could not take the lock {self.path}", params=("out",))

    def _holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _is_stale(holder: dict[str, Any]) -> bool:
        if not holder:
            return True  # unreadable: a lock whose writer died before finishing it
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job") == job:
            return True  # this Slurm job, requeued: its earlier incarnation is gone
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False  # cannot tell from here: refuse
        return _process_start(holder["pid"]) != holder.get("start")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def existing_run(out: Path) -> str | None:
    """A description of the run already in `out` ("a run at step 1200"), or None."""
    out = Path(out)
    found = complete_checkpoints(out)
    if found:
        return f"a run at step {read_marker(found[-1])['step']}"
    if (out / "config.json").exists() or (out / CHECKPOINTS).exists():
        return "a run with no complete checkpoint yet"
    return None


def clear_run(out: Path) -> None:
    """Remove what a run wrote into `out` (`--overwrite`); other files stay."""
    for name in RUN_FILES:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def trim_metrics(out: Path, step: int) -> None:
    """Drop the rows of `metrics.jsonl` past `step` (a resumed run logs those steps again)."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by the interruption
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)
