"""Run vitdeep commands for real: under the deepspeed launcher, torchrun, or one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vitdeep.engine.deepspeed import free_port
from vitdeep.launcher import RANK_VARIABLES

BIN = Path(sys.executable).parent

#: A small deep ViT and light augmentation, so a few dozen steps show learning on 2 CPU cores.
SMALL = [
    "--model", "deit_tiny_12", "--depth", "6", "--embed-dim", "64", "--num-heads", "4",
    "--img-size", "16", "--patch-size", "4", "--global-batch", "64", "--micro-batch", "16",
    "--workers", "1", "--lr", "2e-3", "--warmup-steps", "3", "--log-every", "1",
    "--rand-augment", "", "--reprob", "0", "--hflip", "0", "--scale-min", "0.6", "--color-jitter", "0",
]


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(shards), "--out", str(out), *SMALL, *extra]


def metrics(out: Path, kind: str = "train") -> dict[int, dict]:
    """Logged rows by step (a resumed run's rows replace the ones it re-did)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if row["kind"] == kind}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def refuses(argv: list[str], capsys, needle: str, out: Path | None = None) -> str:
    """`vitdeep ARGV` in this process refuses: exit code 2, one stderr line naming `needle`, no
    traceback, and `out` (when given) not created. Returns stderr."""
    import pytest

    from vitdeep.cli import main

    capsys.readouterr()  # drop what earlier calls printed
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, f"exit code {exit_info.value.code}; stderr:\n{err}"
    assert needle in err, f"{needle!r} not in stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, f"not one stderr line:\n{err}"
    if out is not None:
        assert not Path(out).exists(), f"{out} was created"
    return err


def cpu_env(**extra: str) -> dict[str, str]:
    # an in-process `vitdeep eval` of an earlier test joined a process group of its own and left its
    # rank variables in this process's environment: no child inherits them
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def deepspeed_cmd(args: list[str], ranks: int = 2, port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus N --master_port P --module vitdeep ARGS` (CPU ranks here)."""
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port or free_port()), "--module", "vitdeep", *args]


def torchrun_cmd(args: list[str], ranks: int = 2, port: int | None = None) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(port or free_port()), "-m", "vitdeep", *args]


def ranks_cmd(args: list[str], ranks: int = 2, port: int | None = None) -> list[str]:
    """N CPU ranks for a test about what the ranks compute: started by torchrun, which starts and
    stops 3 s sooner than the DeepSpeed launcher (its runner, then a per-node launcher, then a 1 s
    poll). Tests about the launcher itself use `deepspeed_cmd`: the exit code it passes on (75 for a
    stop, 2 for a refusal), the signals it forwards, the `--local_rank` it appends, hostfiles."""
    return torchrun_cmd(args, ranks, port)


def single_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "vitdeep", *args]


def with_script(cmd: list[str], script: Path, *script_args: str) -> list[str]:
    """A launch command (`deepspeed_cmd`, `ranks_cmd`, `single_cmd`) that runs `script SCRIPT_ARGS`
    with vitdeep's arguments in place of `vitdeep` (the test scripts that inject faults)."""
    at = cmd.index("--module") if "--module" in cmd else cmd.index("-m")
    return [*cmd[:at], str(script), *script_args, *cmd[at + 2:]]


def run(cmd: list[str], timeout: float = 900, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=cpu_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def shm_files(port: int) -> list[Path]:
    """DeepSpeed's CPU all-reduce files in /dev/shm of the run with this master port (each 66 MB of RAM)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
