"""DeepSpeed plumbing: ds_config "auto" filling and checks, schedule, param groups, EMA."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import run
from vitdeep.engine.deepspeed import DS_CONFIG_DIR, fill_ds_config, load_ds_config, param_groups, plan_batches
from vitdeep.engine.schedule import LrSchedule
from vitdeep.errors import UserError
from vitdeep.models import create_model

OPTIONS = {"global_batch": 64, "micro_batch": 16, "clip_grad": 1.0}


def test_auto_values_are_filled_from_the_options():
    filled, adopted, plan = fill_ds_config(load_ds_config("zero2_bf16"), OPTIONS, frozenset(), world_size=2, num_parameters=10**6)
    assert (filled["train_batch_size"], filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (64, 16, 2)
    assert filled["gradient_clipping"] == 1.0 and adopted == {} and plan.grad_accum == 2
    assert filled["zero_optimization"]["reduce_bucket_size"] == 10**6  # capped at the model's size


def test_zero_buckets_keep_deepspeeds_default_for_big_models_and_explicit_values():
    filled, _, _ = fill_ds_config(load_ds_config("zero3_bf16"), OPTIONS, frozenset(), world_size=2, num_parameters=10**9)
    assert filled["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert filled["zero_optimization"]["stage3_prefetch_bucket_size"] == 50_000_000
    ds = load_ds_config("zero2_bf16")
    ds["zero_optimization"]["reduce_bucket_size"] = 12345
    filled, _, _ = fill_ds_config(ds, OPTIONS, frozenset(), world_size=2, num_parameters=10**9)
    assert filled["zero_optimization"]["reduce_bucket_size"] == 12345


def test_explicit_ds_value_wins_over_a_default_and_contradiction_names_both():
    ds = {**load_ds_config("zero2_bf16"), "train_batch_size": 128}
    filled, adopted, plan = fill_ds_config(ds, OPTIONS, frozenset(), world_size=2, num_parameters=10**6)
    assert adopted == {"global_batch": 128} and filled["gradient_accumulation_steps"] == 4
    with pytest.raises(UserError, match=r"train_batch_size=128 but --global-batch=64"):
        fill_ds_config(ds, OPTIONS, frozenset({"global_batch"}), world_size=2, num_parameters=10**6)
    ds = {**load_ds_config("zero2_bf16"), "gradient_accumulation_steps": 3}
    with pytest.raises(UserError, match="gradient_accumulation_steps=3"):
        fill_ds_config(ds, OPTIONS, frozenset(), world_size=2, num_parameters=10**6)


def test_batch_that_does_not_divide_is_an_error():
    with pytest.raises(UserError, match=r"global_batch=64 is not a multiple of micro_batch=24 × world size 2"):
        plan_batches(64, 24, 2)


def test_bad_ds_configs(tmp_path):
    with pytest.raises(UserError, match="ds-config not found"):
        load_ds_config(str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_ds_config(str(broken))
    with_optimizer = tmp_path / "opt.json"
    with_optimizer.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(UserError, match="optimizer"):
        load_ds_config(str(with_optimizer))


def test_every_bundled_config_fills_completely():
    for name in sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")):
        filled, _, _ = fill_ds_config(load_ds_config(name), OPTIONS, frozenset(), world_size=4, num_parameters=10**6)
        assert "\"auto\"" not in json.dumps(filled)  # no value left "auto"


def test_schedule_warmup_cosine_and_constant():
    schedule = LrSchedule(peak_lr=1e-3, total_steps=110, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5)
    assert schedule.lr_at(0) == pytest.approx(1e-6)
    assert schedule.lr_at(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert schedule.lr_at(10) == pytest.approx(1e-3)
    assert schedule.lr_at(60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert schedule.lr_at(110) == pytest.approx(1e-5)
    constant = LrSchedule(peak_lr=5e-6, total_steps=50, kind="constant")
    assert {constant.lr_at(s) for s in range(50)} == {5e-6}


def test_schedule_applies_layer_decay_scale():
    model = create_model("deit_tiny_12", img_size=16, patch_size=4, num_classes=10)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, 0.5), lr=1.0)
    LrSchedule(peak_lr=1e-3, total_steps=10).apply(optimizer, 3)
    lrs = sorted({g["lr"] / g["lr_scale"] for g in optimizer.param_groups})
    assert len(lrs) == 1 and math.isclose(lrs[0], LrSchedule(peak_lr=1e-3, total_steps=10).lr_at(3))


EMA_CONFIGS = ["zero1_bf16", "zero2_bf16", "zero3_bf16", "cpu_fp32", "zero2_autocast_bf16"]


@pytest.fixture(scope="module")
def ema_checks() -> dict[str, dict]:
    """tests/scripts/ema_check.py on 2 ranks, every ds_config of EMA_CONFIGS in the one launch."""
    from tests.launch import ranks_cmd, with_script

    script = Path(__file__).parent / "scripts" / "ema_check.py"
    result = run(with_script(ranks_cmd([]), script, *EMA_CONFIGS), timeout=600)
    found = {}
    for line in result.stdout.splitlines():
        if "EMA_CHECK " in line:
            name, numbers = line.split("EMA_CHECK ", 1)[1].split(" ", 1)
            found[name] = json.loads(numbers)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", EMA_CONFIGS)
def test_partitioned_ema_is_exact_under_every_zero_stage(ds_config, ema_checks):
    numbers = ema_checks[ds_config]
    print(ds_config, numbers)
    assert numbers["trained_moved"] > 10 * numbers["tolerance"]
    assert numbers["initial"] < numbers["tolerance"]
    assert numbers["current"] < 1e-6 and numbers["restored"] < 1e-6


def test_pruning_keeps_the_last_k_and_the_best_and_clears_interrupted_saves(tmp_path):
    from vitdeep.engine.checkpoint import CHECKPOINTS, MARKER, complete_checkpoints, prune_checkpoints, tag_for

    def checkpoint(step: int, top1: float | None = None, complete: bool = True) -> None:
        path = tmp_path / CHECKPOINTS / tag_for(step)
        path.mkdir(parents=True)
        if complete:
            marker = {"step": step, "epoch": 0, "batch_in_epoch": step, "model": "deit_tiny_12", "model_kwargs": {},
                      "zero_stage": 2, "world_size": 1, "config": {}, "val_top1": top1}
            (path / MARKER).write_text(json.dumps(marker))

    for step, top1 in [(10, 50.0), (20, 80.0), (30, 60.0), (40, None), (50, 70.0)]:
        checkpoint(step, top1)
    checkpoint(25, complete=False)  # an interrupted save older than the newest complete one
    checkpoint(60, complete=False)  # a save still being written
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [tag_for(s) for s in (20, 40, 50)]
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == [tag_for(s) for s in (20, 40, 50, 60)]
    prune_checkpoints(tmp_path, keep_last=0)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [tag_for(s) for s in (20, 50)]


@pytest.mark.parametrize("v2, v1, affinity, expected", [
    ("max 100000\n", None, 8, 8),            # no quota: the affinity mask
    ("150000 100000\n", None, 8, 2),         # 1.5 cores of quota: 2 threads
    ("400000 100000\n", None, 2, 2),         # a quota above the mask: the mask
    (None, ("-1", "100000"), 8, 8),          # cgroup v1 without quota
    (None, ("300000", "100000"), 8, 3),      # cgroup v1 with 3 cores
    ("garbage\n", None, 4, 4),               # unreadable: no quota
    ("0 100000\n", None, 4, 4),              # a zero quota is none
])
def test_usable_cores_follow_the_affinity_and_the_cgroup_quota(v2, v1, affinity, expected, tmp_path, monkeypatch):
    from vitdeep import cores

    v2_file = tmp_path / "cpu.max"
    if v2 is not None:
        v2_file.write_text(v2)
    v1_files = (tmp_path / "cfs_quota_us", tmp_path / "cfs_period_us")
    if v1 is not None:
        for path, text in zip(v1_files, v1):
            path.write_text(text)
    monkeypatch.setattr(cores, "CGROUP_V2_MAX", v2_file)
    monkeypatch.setattr(cores, "CGROUP_V1", v1_files)
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    assert cores.usable_cores() == expected


@pytest.mark.parametrize("given, expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"), ({"GOMP_SPINCOUNT": "1000"}, None)])
def test_the_command_sets_passive_openmp_waits_before_torch_loads(given, expected):
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: `vitdeep` must set it before any
    import of torch, and leave a policy the environment gives alone."""
    script = ("import builtins, os, sys\nreal = builtins.__import__\n"
              "def spy(name, *args, **kwargs):\n"
              "    if name.split('.')[0] == 'torch':  # the first import of torch: report, and stop there\n"
              "        print('POLICY', {'policy': os.environ.get('OMP_WAIT_POLICY')}, flush=True)\n"
              "        os._exit(0)\n"
              "    return real(name, *args, **kwargs)\n"
              "builtins.__import__ = spy\n"
              "from vitdeep.cli import main\n"
              "main(['models', 'deit_tiny_12'])\n"
              "print('POLICY', 'torch never imported')")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", script], env={**env, **given}, capture_output=True, text=True, check=True)
    seen = result.stdout.strip().splitlines()[-1]
    assert seen == f"POLICY {{'policy': {expected!r}}}", result.stdout[-2000:]


@pytest.mark.parametrize("cores, local_ranks, expected", [(64, None, 4), (2, None, 2), (2, "2", 1), (8, "8", 1), (16, "2", 4)])
def test_eval_workers_default_to_the_cores_each_rank_has(cores, local_ranks, expected, monkeypatch):
    """`vitdeep eval` without --workers: 4, or fewer where the cores are fewer (2 cores: no
    DataLoader warning about 4 workers)."""
    from vitdeep.commands import eval as eval_command

    monkeypatch.setattr("vitdeep.cores.usable_cores", lambda: cores)
    from vitdeep.launcher import RANK_VARIABLES

    for name in (*RANK_VARIABLES, "SLURM_NTASKS_PER_NODE"):  # an in-process eval of another test may have left them
        monkeypatch.delenv(name, raising=False)
    if local_ranks:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    assert eval_command.default_eval_workers() == expected
