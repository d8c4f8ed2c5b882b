"""Run vitdeep commands for real: under the deepspeed launcher, torchrun, or one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vitdeep.engine.deepspeed import free_port

BIN = Path(sys.executable).parent


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def deepspeed_cmd(args: list[str], ranks: int = 2, port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus N --master_port P --module vitdeep ARGS` (CPU ranks here)."""
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port or free_port()), "--module", "vitdeep", *args]


def torchrun_cmd(args: list[str], ranks: int = 2, port: int | None = None) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(port or free_port()), "-m", "vitdeep", *args]


def single_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "vitdeep", *args]


def run(cmd: list[str], timeout: float = 900, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=cpu_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def shm_files(port: int) -> list[Path]:
    """DeepSpeed's CPU all-reduce files in /dev/shm of the run with this master port (each 66 MB of RAM)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
