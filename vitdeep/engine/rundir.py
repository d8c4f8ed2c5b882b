"""A run's output folder: one run at a time, never a new run over an old one by accident.

- `RunLock`: an exclusive lock file `OUT/.vitdeep.lock` (host, pid, start time, Slurm job), held by
  rank 0 for the whole run. A lock left by a run that is gone (its pid is not alive on this
  host, or the same Slurm job was requeued) is taken over; one held elsewhere refuses the run.
- `existing_run`: what an older run left in OUT (logged steps, a save begun), so that a new run
  without `--resume` is refused (keep-last pruning would otherwise delete the new run's
  checkpoints, the higher old steps being "newer") unless `--overwrite` says to replace it
  (`clear_run`). A start that failed before its first step is no run: rerunning replaces it.
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
from vitdeep.engine.jsonl import trim_step_rows
from vitdeep.engine.ledger import LEDGER
from vitdeep.errors import UserError

LOCK = ".vitdeep.lock"
#: What a run writes into OUT (removed by `--overwrite`; nothing else in OUT is touched).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "tb", LEDGER, CHECKPOINTS)


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

    def check_free(self) -> dict[str, Any]:
        """Raise `UserError` naming the holder (host, pid, since) when a live run holds the lock:
        asked before anything else about `out`, so that a second run is told the truth rather
        than what the first one has written so far. Returns a stale lock's holder ({} if none)."""
        holder = self._holder()
        if not self._is_stale(holder):
            raise UserError(
                f"`out` {self.path.parent} is in use by another run (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, since {holder.get('since')}); two runs cannot share `out`. If that run "
                f"is gone, delete {self.path}", params=("out",)
            )
        return holder

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises `UserError` when
        another live run holds it."""
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self.check_free()
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
    """A description of the run already in `out` ("a run at step 1200"), or None.

    Only a run that logged a step or began a save counts: a start that failed before (a process
    group that never formed, an engine that would not build) leaves `config.json` and an empty
    `tb/`, and the same command run again replaces them instead of being refused for them.
    """
    out = Path(out)
    found = complete_checkpoints(out)
    if found:
        return f"a run at step {read_marker(found[-1])['step']}"
    metrics, checkpoints = out / "metrics.jsonl", out / CHECKPOINTS
    if (metrics.is_file() and metrics.stat().st_size > 0) or (checkpoints.is_dir() and any(checkpoints.iterdir())):
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
    trim_step_rows(Path(out) / "metrics.jsonl", step)
