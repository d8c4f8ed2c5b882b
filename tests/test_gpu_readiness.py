"""`--compile` and the autocast-bf16 mode, for real on 2 CPU ranks (what a GPU run will use)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.launch import BIN, metrics, run
from vitdeep.engine.checkpoint import complete_checkpoints, read_marker
from vitdeep.engine.deepspeed import autocast_dtype, check_precision_supported, engine_dtype, free_port, precision
from vitdeep.errors import UserError

RUNNER = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check_run.py"
#: A 2-block DeiT at 16 px: torch.compile's first run generates C++ for every kernel, slow on a CPU.
TINY = [
    "--model", "deit_tiny_12", "--depth", "2", "--embed-dim", "64", "--num-heads", "4", "--img-size", "16",
    "--patch-size", "4", "--global-batch", "32", "--micro-batch", "16", "--workers", "1", "--lr", "2e-3",
    "--warmup-steps", "2", "--log-every", "1", "--rand-augment", "", "--reprob", "0", "--save-every", "2",
]


def recorded_train(shards: Path, out: Path, *extra: str) -> dict:
    """`vitdeep train` on 2 ranks through `gpu_check_run.py`; returns rank 0's record."""
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(RUNNER),
           "train", "--data", str(shards), "--out", str(out), *TINY, *extra]
    result = run(cmd, timeout=1200, VITDEEP_CHECK_RECORD=str(out / "record"))
    record = json.loads((out / "record" / "rank_0.json").read_text())
    record["output"] = result.stdout + result.stderr
    return record


@pytest.mark.slow
def test_compile_under_zero2_with_the_losses_and_checkpointing_trains_and_resumes(digit_shards, tmp_path):
    args = ["--ds-config", "zero2_bf16", "--compile", "--grad-checkpointing", "--cos-weight", "1"]
    first = recorded_train(digit_shards, tmp_path, *args, "--steps", "4")
    assert first["compiled"] and first["compile"]["unique_graphs"] >= 1, first["compile"]
    # the compiled model computes what the eager one does (bf16 weights: bf16 rounding apart)
    assert first["compile"]["max_abs_difference"] <= 0.05 * max(1.0, first["compile"]["logit_scale"]), first["compile"]
    assert [read_marker(p)["step"] for p in complete_checkpoints(tmp_path)] == [2, 4]
    resumed = recorded_train(digit_shards, tmp_path, *args, "--steps", "6", "--resume", "auto")
    assert "at step 4" in resumed["output"] and resumed["compiled"] and resumed["steps"] == 6
    rows = metrics(tmp_path)
    assert sorted(rows) == list(range(1, 7))
    for row in rows.values():
        assert all(math.isfinite(row[k]) for k in ("ce", "cos", "contrastive", "patch_mix")), row
    print(f"--compile: {first['compile']}")


@pytest.mark.slow
def test_autocast_mode_keeps_fp32_weights_and_resumes(digit_shards, tmp_path):
    args = ["--ds-config", "zero2_autocast_bf16", "--ema-decay", "0.5", "--no-ema-warmup"]
    first = recorded_train(digit_shards, tmp_path, *args, "--steps", "4")
    assert (first["precision"], first["weights_dtype"], first["optimizer"]) == ("autocast-bf16", "torch.float32", "DeepSpeedZeroOptimizer")
    resumed = recorded_train(digit_shards, tmp_path, *args, "--steps", "6", "--resume", "auto")
    assert "at step 4" in resumed["output"] and resumed["steps"] == 6
    assert read_marker(complete_checkpoints(tmp_path)[-1])["precision"] == "autocast-bf16"
    from vitdeep.engine.weights import read_weights

    raw, ema = read_weights(tmp_path).state_dict, read_weights(tmp_path, ema=True).state_dict
    assert set(raw) == set(ema) and any(not torch.equal(raw[k], ema[k]) for k in raw)
    # the export (--ema) of an autocast run, its evaluation and timm's loading of it: the CPU smoke of
    # benchmarks/gpu_check.sh (tests/test_gpu_check.py), on its autocast finetune


def test_precision_names_the_autocast_mode_and_refuses_mixtures():
    autocast = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    assert precision(autocast) == "autocast-bf16" and autocast_dtype(autocast) == torch.bfloat16
    assert engine_dtype(autocast) == torch.float32  # the weights stay fp32: inputs are not cast
    assert precision({"bf16": {"enabled": True}}) == "bf16" and autocast_dtype({"bf16": {"enabled": True}}) is None
    with pytest.raises(UserError, match="enables bf16 and torch_autocast; choose one"):
        precision({**autocast, "bf16": {"enabled": True}})
    with pytest.raises(UserError, match="torch_autocast.dtype='int8'"):
        precision({"torch_autocast": {"enabled": True, "dtype": "int8"}})
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="fp16 needs a GPU"):
            check_precision_supported({"torch_autocast": {"enabled": True, "dtype": "float16"}})
