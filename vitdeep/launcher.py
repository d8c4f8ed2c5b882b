"""Start vitdeep runs under the DeepSpeed launcher on this machine: its GPUs, or CPU ranks over
gloo where there are none. Shared by `vitdeep demo` and `vitdeep ablate`, which run one training
job after another from a plain parent process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

#: Variables a launcher sets for its ranks; a parent that joined a process group of its own (an
#: in-process evaluation) must not hand them on to the next launcher.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
#: What a failed run's own words look like, most telling first: vitdeep's one line (rank 0's, then
#: another rank's), then the last line of a traceback.
_FAILURE_LINES = (re.compile(r"^error: "), re.compile(r"^error \(rank \d+\): "), re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b"))


def on_gpu() -> bool:
    return torch.cuda.is_available()


def default_ranks() -> int:
    """Every GPU, or 2 CPU ranks without one."""
    return torch.cuda.device_count() if on_gpu() else 2


def default_ds_config() -> str:
    """The bundled DeepSpeed config a local run uses when none is named: bf16 ZeRO-2 on GPUs, fp32 on CPUs."""
    return "zero2_bf16" if on_gpu() else "cpu_fp32"


def option_flags(options: dict[str, Any]) -> list[str]:
    """Command-line flags of flat config options: `{"attnscale": True, "lr": 0.005}` →
    `["--attnscale", "--lr", "0.005"]` (booleans as `--name` / `--no-name`)."""
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def launcher_env() -> dict[str, str]:
    """This process's environment for a launcher: CPU ranks without a GPU, no stale rank variables."""
    env = {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}
    if not on_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def deepspeed_command(args: list[str], ranks: int) -> list[str]:
    """`deepspeed --num_gpus RANKS --master_port FREE --module vitdeep ARGS` with this Python."""
    from vitdeep.engine.deepspeed import free_port

    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port()),
            "--module", "vitdeep", *args]


def run_logged(cmd: list[str], log: Path, switch: Callable[[str], Path | None]) -> tuple[int, str | None]:
    """Run `cmd` with its output shown here as it comes and kept in `log`; returns the exit code
    and the error line of what it wrote (the last `error: …` line, else the last exception line).

    `switch` sees every output line (without colour codes, redraws joined); where it names another
    log, that line and what follows go there, and the error line is the last log's (one launch
    running several jobs). On a terminal the command gets a pseudo-terminal of its own, so its
    progress bars stay live.
    """
    out = sys.stdout
    out.flush()
    kept = _KeptOutput(log, switch)
    try:
        if out.isatty():
            code = _run_on_pty(cmd, kept)
        else:
            with subprocess.Popen(cmd, env=launcher_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) as process:
                for chunk in iter(lambda: process.stdout.read1(65536), b""):
                    _forward(chunk, kept)
                code = process.wait()
    finally:
        kept.close()
    return code, kept.error_line()


class _KeptOutput:
    """A command's output appended to its log file, or to the log `switch` names from a line on.

    A line is held until it ends, up to `LINE_LIMIT` bytes: beyond that it is a progress bar
    redrawn in place, written as it comes."""

    LINE_LIMIT = 65536

    def __init__(self, log: Path, switch: Callable[[str], Path | None]) -> None:
        self.switch, self.partial = switch, b""
        self._open(log)

    def _open(self, log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.file = log, open(log, "ab")
        self.start = self.file.tell()

    def write(self, chunk: bytes) -> None:
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        for line in lines:
            log = self.switch(_ANSI.sub("", line.decode(errors="replace")).replace("\r", " ").strip())
            if log is not None and log != self.path:
                self.file.close()
                self._open(log)
            self.file.write(line + b"\n")
        if len(self.partial) > self.LINE_LIMIT:
            self.file.write(self.partial)
            self.partial = b""

    def close(self) -> None:
        self.file.write(self.partial)
        self.partial = b""
        self.file.close()

    def error_line(self) -> str | None:
        """The error line of what this command wrote into the (last) log."""
        with open(self.path, "rb") as kept:
            kept.seek(self.start)
            return error_line(kept.read().decode(errors="replace"))


def _forward(chunk: bytes, kept: _KeptOutput) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
    kept.write(chunk)


def _run_on_pty(cmd: list[str], kept: _KeptOutput) -> int:
    import pty
    import shutil

    env = launcher_env()
    env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    parent, child = pty.openpty()
    try:
        process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    finally:
        os.close(child)
    try:
        while True:
            try:
                chunk = os.read(parent, 65536)
            except OSError:  # EIO: every holder of the terminal has closed it
                break
            if not chunk:
                break
            _forward(chunk, kept)
    finally:
        os.close(parent)
    return process.wait()


def error_line(text: str) -> str | None:
    """The line that says why a run failed (the last of the most telling kind), or None."""
    lines = [line.strip() for line in _ANSI.sub("", text).replace("\r", "\n").splitlines() if line.strip()]
    for pattern in _FAILURE_LINES:
        found = [line for line in lines if pattern.match(line)]
        if found:
            return found[-1]
    return None
