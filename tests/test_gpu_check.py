"""The prepared GPU check (`benchmarks/gpu_check.sh`): its CPU smoke passes, and without a GPU the
full check refuses to start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import cpu_env

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def gpu_check(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=cpu_env(PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # the script starts 2 ranks
def test_cpu_smoke_runs_every_stage_and_records_what_it_found(tmp_path):
    result = gpu_check("--cpu-smoke", "--work", str(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    record = json.loads((tmp_path / "gpu-cpu-smoke.json").read_text())
    stages = {stage["name"]: stage for stage in record["stages"]}
    assert list(stages) == ["shards", "train zero2_bf16 + NaN", "train zero3_bf16", "finetune 24 px (zero2_autocast_bf16)",
                            "eval", "export + timm", "bench"]
    assert record["passed"] and all(stage["ok"] for stage in stages.values()), record
    nan_run = stages["train zero2_bf16 + NaN"]["facts"]
    assert nan_run["skipped_micro_batches"] == 1 and nan_run["steps"] == 4 and nan_run["backend"] == "gloo"
    assert nan_run["loss_scale_around_injection"] == [1.0, 1.0]
    assert stages["train zero3_bf16"]["facts"]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    finetune = stages["finetune 24 px (zero2_autocast_bf16)"]["facts"]
    assert finetune["precision"] == "autocast-bf16" and finetune["weights_dtype"] == "torch.float32"
    assert stages["eval"]["facts"]["count"] == 297
    rows = {row["name"] for row in record["bench"]["rows"]}
    assert "autocast-bf16 engine (zero2_autocast_bf16) vs plain loop with bf16 autocast" in rows
    assert any(name.startswith("train step with the losses: engine.compile()") for name in rows)
    markdown = (tmp_path / "gpu-cpu-smoke.md").read_text()
    assert "passed" in markdown and "| eval | ok |" in markdown and "autocast-bf16 engine" in markdown
    print(f"CPU smoke: {record['seconds']:.0f} s; " + ", ".join(f"{s['name']} {s['seconds']:.0f} s" for s in record["stages"]))


def test_without_a_gpu_the_full_check_refuses_and_writes_nothing(tmp_path):
    work = tmp_path / "work"
    result = gpu_check("--work", str(work), "--out", str(tmp_path / "results"), timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: no CUDA GPU here; run `bash benchmarks/gpu_check.sh --cpu-smoke` for the CPU subset"]
    assert not work.exists() and not (tmp_path / "results").exists()
