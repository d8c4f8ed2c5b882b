"""`vitdeep plan`: model states against DeepSpeed's estimators, the fake-tensor trace against a real
step, the verdict and its search, the plan check of `train`, the command, and — on 2 DeepSpeed
CPU ranks — prediction against measurement from one `--measure` run."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from tests.launch import ranks_cmd, refuses, run, train_args, with_script
from vitdeep.config import resolve_config
from vitdeep.data.info import DatasetInfo
from vitdeep.engine.run_plan import make_plan
from vitdeep.errors import UserError
from vitdeep.losses import Objective, ObjectiveConfig
from vitdeep.models import create_model
from vitdeep.planner.cluster import Cluster
from vitdeep.planner.measure import peak_above_start
from vitdeep.planner.memory import (
    MemoryModel,
    ParamCounts,
    Zero,
    check_fits,
    fp32_gradient_bytes,
    gradient_path,
    largest_fitting,
    micro_batch_options,
    model_state_lines,
)
from vitdeep.planner.report import build_report, ds_config_with_zero
from vitdeep.planner.trace import GradientPath, StepTracer

IMAGENET = DatasetInfo(urls=(), num_samples=1_281_167, num_classes=1000)


#: Every remedy at once (the fake trace must update Re-attention's BatchNorm buffers too).
ALL_REMEDIES = dict(talking_heads=True, reattention=True, attnscale=True, featscale=True, qk_norm=True, contranorm=0.1, reg_tokens=4)


def plan_of(world_size: int, **options):
    return make_plan(resolve_config(options), world_size, train_info=IMAGENET, check_host=False)


def meta_model(name: str, **options) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name, **options)


def deepspeed_gpu_estimate(estimator, capsys, line_with: str, **kwargs) -> float:
    """The per-GPU bytes DeepSpeed's `*_all_cold` estimator prints for the option line `line_with`
    (it prints GiB with two decimals)."""
    capsys.readouterr()
    estimator(**kwargs)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.rstrip().endswith(line_with))
    return float(re.findall(r"([\d.]+)GB", line)[1]) * 2**30


# -- model states against DeepSpeed's own estimators --------------------------------------------


@pytest.mark.parametrize("name", ["deit_base_24", "cait_m48"])
def test_zero2_states_match_deepspeeds_estimator(name, capsys):
    """DeepSpeed's ZeRO-2 figure, 2Ψ + 18Ψ/N (bf16 parameters; 2 + 4 bytes of gradients, 4 of fp32
    masters, 8 of Adam moments per partitioned parameter), is vitdeep's held states plus what a
    step adds on a GPU: the bf16 gradient partition backward leaves and its fp32 copy."""
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    plan = plan_of(16, model=name, ds_config="zero2_bf16")
    zero, model = Zero.from_ds_config(plan.ds_config), meta_model(name, num_classes=1000)
    counts = ParamCounts.of(model, zero, 16)
    ours = sum(line.nbytes for line in model_state_lines(counts, zero, 16))
    ours += gradient_path(counts, zero, 16).partition_grads + fp32_gradient_bytes(counts, zero, 16)
    printed = deepspeed_gpu_estimate(estimate_zero2_model_states_mem_needs_all_cold, capsys, "offload_optimizer=none",
                                     total_params=counts.total, num_gpus_per_node=8, num_nodes=2)
    _, exact = estimate_zero2_model_states_mem_needs(counts.total, num_gpus_per_node=8, num_nodes=2, cpu_offload=False)
    print(f"{name} ZeRO-2 per GPU: vitdeep {ours / 2**30:.4f} GiB, DeepSpeed {exact / 2**30:.4f} GiB (printed {printed / 2**30:.2f})")
    assert abs(printed - exact) <= 0.006 * 2**30
    assert abs(ours - exact) <= 16 * 4  # partitions rounded up per rank


@pytest.mark.parametrize("name", ["deit_base_24", "cait_m48"])
def test_zero3_states_match_deepspeeds_estimator_up_to_named_terms(name, capsys):
    """DeepSpeed's ZeRO-3 figure is 4 × the largest layer + 18Ψ/N. vitdeep's partitioned states
    are 20Ψ/N: the same 18 plus the bf16 parameter partition (2Ψ/N), which DeepSpeed's formula
    leaves out. Instead of its largest-layer term vitdeep counts the persistent (small, never
    partitioned) parameters and the reduction bucket among the states, and the gathered
    parameters in the micro-step."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, estimate_zero3_model_states_mem_needs_all_cold

    plan = plan_of(16, model=name, ds_config="zero3_bf16")
    zero, model = Zero.from_ds_config(plan.ds_config), meta_model(name, num_classes=1000)
    counts = ParamCounts.of(model, zero, 16)
    ours = sum(line.nbytes for line in model_state_lines(counts, zero, 16)) + fp32_gradient_bytes(counts, zero, 16)
    # DeepSpeed's model_to_params tells parameters apart by data_ptr, which a meta model lacks: count as it would
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    printed = deepspeed_gpu_estimate(estimate_zero3_model_states_mem_needs_all_cold, capsys,
                                     "offload_param=none, offload_optimizer=none, zero_init=1",
                                     total_params=counts.total, largest_layer_params=largest_layer, num_gpus_per_node=8, num_nodes=2)
    _, exact, largest_layer_memory = estimate_zero3_model_states_mem_needs(
        counts.total, largest_layer, num_gpus_per_node=8, num_nodes=2, cpu_offload=False, cpu_offload_params=False)
    bf16_partition = 2 * counts.partition
    named = bf16_partition + 2 * counts.persistent + 2 * zero.reduce_bucket_size
    print(f"{name} ZeRO-3 per GPU: vitdeep {ours / 2**30:.4f} GiB (bf16 partition + persistent + bucket {named / 2**30:.4f}), "
          f"DeepSpeed {exact / 2**30:.4f} GiB (printed {printed / 2**30:.2f}; largest layer {largest_layer_memory / 2**30:.4f})")
    assert abs(printed - exact) <= 0.006 * 2**30
    assert abs((ours - named) - (exact - largest_layer_memory)) <= 16 * 4 + 2 * 16 * 400  # per-tensor rounding of partitions


# -- the trace ------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing, remedies", [(False, {}), (True, {}), (False, ALL_REMEDIES)],
                         ids=["plain", "checkpointing", "every remedy"])
def test_trace_matches_a_real_cpu_step(checkpointing, remedies):
    """The fake-tensor trace of forward + loss + backward against the same step run for real on the
    CPU, measured from the profiler's allocation events (no DeepSpeed: gradients stay in .grad).
    The measurement also holds oneDNN's scratchpad (about 5 MB in the fp32 patch embedding's
    backward), which the trace leaves out: a batch of 32 keeps it small beside the activations."""
    options = dict(img_size=64, num_classes=100, patch_head=True, **remedies)
    batch, patches = 32, 16
    torch.manual_seed(0)
    model = create_model("deit_tiny_24", **options).train()
    model.set_grad_checkpointing(checkpointing)
    objective = Objective()

    def step() -> None:
        x = torch.randn(batch, 3, 64, 64)
        targets = torch.softmax(torch.randn(batch, 100), dim=-1)
        labels = torch.randint(0, 100, (batch, patches))
        loss, _ = objective(model(x, aux=True), targets, patch_labels=labels)
        loss.backward()

    measured = peak_above_start(step, torch.device("cpu"))
    tracer = StepTracer(meta_model("deit_tiny_24", **options), torch.float32, objective, soft_targets=True, patch_labels=True)
    predicted = tracer.trace(batch, checkpointing, GradientPath()).peak
    print(f"checkpointing={checkpointing}, {remedies}: traced {predicted / 1e6:.2f} MB, measured {measured / 1e6:.2f} MB")
    assert abs(predicted - measured) <= 0.05 * measured


def test_trace_follows_the_attention_path_that_runs():
    """Fused SDPA keeps O(N) per layer, the explicit form of talking heads O(N²): quadrupling the
    tokens (128 → 256 px, 65 → 257) multiplies the explicit form's extra memory by about 16."""

    def traced(img_size: int, talking_heads: bool) -> int:
        model = meta_model("deit_tiny_12", img_size=img_size, num_classes=10, talking_heads=talking_heads)
        tracer = StepTracer(model, torch.bfloat16, Objective(ObjectiveConfig(patch_mix_weight=0.0)), soft_targets=True, patch_labels=False)
        return tracer.trace(4, False, GradientPath()).peak

    extra_small = traced(128, True) - traced(128, False)
    extra_large = traced(256, True) - traced(256, False)
    fused_growth = traced(256, False) / traced(128, False)
    print(f"explicit N×N extra: {extra_small / 1e6:.2f} MB at 65 tokens, {extra_large / 1e6:.2f} MB at 257; fused growth {fused_growth:.2f}")
    assert extra_small > 0 and extra_large > 10 * extra_small
    assert fused_growth < 5


def test_checkpointing_trades_activations_for_recompute():
    plan = plan_of(16, model="deit_base_24", img_size=384)
    model = MemoryModel(plan, Cluster(nodes=2))
    without = model.estimate(plan.ds_config, 32, False)
    with_ckpt = model.estimate(plan.ds_config, 32, True)
    print(f"DeiT-B/24 at 384, micro-batch 32: {without.step.peak / 1e9:.1f} GB without, {with_ckpt.step.peak / 1e9:.1f} GB with checkpointing")
    assert with_ckpt.step.peak < without.step.peak / 4


# -- verdict and search ---------------------------------------------------------------------------


def test_largest_micro_batch_and_cheapest_change():
    plan = plan_of(16, model="deit_base_24", img_size=384, global_batch=1024, micro_batch=64)
    assert micro_batch_options(plan, 16) == [2, 4, 8, 16, 32, 64]  # divide 1024 / 16, even for mixing
    model = MemoryModel(plan, Cluster(nodes=2))
    at_16, at_64 = (model.estimate(plan.ds_config, m, False).total for m in (16, 64))
    budget = (at_16 + at_64) // 2  # 16 fits, 32 may, 64 does not
    report = build_report(plan, Cluster(nodes=2, gpu_memory=budget))
    assert not report.fits
    assert report.largest is not None and report.largest.micro_batch in (16, 32)
    assert report.largest.total <= budget
    assert report.accumulation(report.largest.micro_batch) * report.largest.micro_batch * 16 == 1024
    assert report.recommended.change == "smaller micro-batch"
    tried = [o.change for o in report.options]
    assert "activation checkpointing" in tried  # what checkpointing buys is shown beside it
    ckpt = next(o for o in report.options if o.change == "activation checkpointing")
    assert ckpt.fitting.micro_batch == 64
    record = report.to_dict()
    assert record["largest_micro_batch"] == report.largest.micro_batch and record["fits"] is False
    print("\n".join(report.verdict()))


@pytest.mark.parametrize("bundled", [None, "zero3_bf16", "zero3_offload"])
def test_the_floor_bounds_every_micro_batch_and_saves_the_traces_below_it(bundled):
    """`MemoryModel.floor` (states, EMA and the framework allowance on them) is below the total at
    every micro-batch, so a budget under it is refused without tracing any micro-step."""
    plan = plan_of(4, model="deit_tiny_12", img_size=64, global_batch=64, micro_batch=16, ema_decay=0.999)
    ds_config = plan.ds_config if bundled is None else ds_config_with_zero(plan, bundled)
    from vitdeep.planner import memory

    model = MemoryModel(plan, Cluster(gpus_per_node=4))
    floor = model.floor(ds_config)
    for micro_batch in (1, 16):
        assert floor <= model.estimate(ds_config, micro_batch, False).total
    traced = set(memory._TRACES)
    assert largest_fitting(model, ds_config, False, micro_batch_options(plan, 4), floor - 1) is None
    assert set(memory._TRACES) == traced


def test_plans_of_one_model_and_objective_share_their_traces():
    """A trace depends on the model, its frozen blocks, the objective and the micro-step; a plan
    that differs elsewhere (seed, lr) reuses it, one with another objective or model does not."""
    small = dict(model="deit_tiny_12", img_size=32, depth=2, global_batch=16, micro_batch=8)

    def step(**options):
        plan = plan_of(1, **{**small, **options})
        return MemoryModel(plan, Cluster(gpus_per_node=1)).estimate(plan.ds_config, 8, False).step

    first = step()
    assert step(seed=3, lr=0.5) is first
    assert step(cos_weight=1.0) is not first and step(depth=3) is not first and step(freeze_blocks=1) is not first
    assert step(cos_weight=1.0) != first  # ℓ_cos keeps more of the graph


def test_check_fits_refuses_a_run_that_cannot_fit(digit_shards, tmp_path):
    """The decision `vitdeep train` makes on a GPU before anything is written, here with a GPU
    memory budget given (no GPU on this machine)."""
    cfg = resolve_config({"data": str(digit_shards), "out": str(tmp_path / "out"), "model": "deit_tiny_12", "img_size": 32,
                          "patch_size": 4, "global_batch": 32, "micro_batch": 16})
    plan = make_plan(cfg, 1)
    model = MemoryModel(plan, Cluster(gpus_per_node=1))
    at_4, at_16 = (model.estimate(plan.ds_config, m, False).total for m in (4, 16))
    budget = (at_4 + at_16) // 2
    with pytest.raises(UserError, match="no_plan_check") as refused:
        check_fits(plan, gpu_memory=budget)
    assert "`micro_batch` 4 fits" in str(refused.value) or "`micro_batch` 8 fits" in str(refused.value)
    with pytest.raises(UserError, match="no micro-batch fits"):
        check_fits(plan, gpu_memory=10**9)
    check_fits(plan, gpu_memory=at_16)
    plan.cfg.run.plan_check = False
    check_fits(plan, gpu_memory=10**9)
    assert not (tmp_path / "out").exists()
    check_fits(plan)  # no GPU here: nothing to check against


# -- the command ----------------------------------------------------------------------------------


def test_plan_deit_base_24_at_512_px_needs_no_gpu(tmp_path, capsys):
    from vitdeep.cli import main

    out = tmp_path / "plan.json"
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "deit_base_24", "--img-size", "512", "--nodes", "2", "--gpus-per-node", "8",
              "--gpu-memory", "80GB", "--json", str(out)])
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert exit_info.value.code in (0, None)
    record = json.loads(out.read_text())
    print(printed)
    print(f"vitdeep plan DeiT-B/24 at 512 px: {seconds:.1f} s wall")
    assert record["world_size"] == 16 and record["img_size"] == 512
    assert record["requested"]["total_bytes"] > record["requested"]["held_bytes"]
    assert record["time"]["train_flops_factor"] == 3 and record["time"]["total_hours"] > 0
    assert "1,281,167" in " ".join(record["notes"])
    assert "fits" in printed and "micro-step: forward + backward" in printed


@pytest.mark.parametrize("memory, code", [("1GB", 1), ("80GB", 0)])
def test_plan_check_exits_1_when_the_run_does_not_fit(memory, code, capsys):
    from vitdeep.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "deit_tiny_12", "--img-size", "64", "--gpu-memory", memory, "--check"])
    printed = capsys.readouterr().out
    assert (exit_info.value.code or 0) == code and ("does not fit" in printed) == (code == 1), printed


@pytest.mark.parametrize("ds_config", ["zero2_fp16", "zero3_offload"])
def test_gpu_only_configs_are_planned_here(ds_config, tmp_path):
    from vitdeep.cli import main

    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "deit_tiny_12", "--img-size", "64", "--ds-config", ds_config, "--json", str(out)])
    assert exit_info.value.code in (0, None)
    record = json.loads(out.read_text())
    states = {line["name"]: line["bytes"] for line in record["requested"]["lines"]}
    assert states["parameters (fp16)" if "fp16" in ds_config else "parameters (bf16)"] > 0
    if ds_config == "zero3_offload":
        assert states["optimizer state (AdamW moments, fp32)"] == 0 and states["EMA"] == 0


def test_plan_refuses_what_cannot_be_planned(tmp_path, capsys):
    bad_zero = tmp_path / "bad.json"
    bad_zero.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 7}}))
    bf16_without_zero = tmp_path / "bf16_0.json"
    bf16_without_zero.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}))
    refuses(["plan", "--model", "deit_nope_24"], capsys, "unknown model")
    refuses(["plan", "--ds-config", "zero9_bf16"], capsys, "ds-config not found")
    refuses(["plan", "--ds-config", str(bad_zero)], capsys, "cannot be planned")
    refuses(["plan", "--ds-config", str(bf16_without_zero)], capsys, "EMA does not support")
    refuses(["plan", "--img-size", "500"], capsys, "img_size=500")
    refuses(["plan", "--gpu-memory", "80XB"], capsys, "--gpu-memory")
    refuses(["plan", "--nodes", "0"], capsys, "--nodes")
    refuses(["plan", "--mfu", "2"], capsys, "--mfu")
    refuses(["plan", "--micro-batch", "48"], capsys, "not a multiple")
    refuses(["plan", "--gpus-per-node", "4", "--measure"], capsys, "--measure runs on this launch's 1 rank")
    refuses(["plan", "--json", str(tmp_path / "missing" / "p.json")], capsys, "does not exist")


def test_dry_run_prints_the_planners_memory_lines(digit_shards, tmp_path, capsys):
    from vitdeep.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*train_args(digit_shards, tmp_path / "out"), "--dry-run"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0
    for line in ("parameters (bf16)", "optimizer state", "EMA", "micro-step: forward + backward", "framework allowance"):
        assert line in printed
    assert not (tmp_path / "out").exists()


def test_no_plan_check_is_a_train_option(digit_shards, tmp_path, capsys):
    from vitdeep.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*train_args(digit_shards, tmp_path / "out"), "--no-plan-check", "--dry-run"])
    assert exit_info.value.code == 0, capsys.readouterr().err


# -- prediction against measurement on 2 DeepSpeed ranks -----------------------------------------

#: ZeRO-0 (fp32), 2 and 3 (bf16) for both models; ZeRO-1 as well for one of them.
MEASURED_CONFIGS = {"deit_tiny_24": ("cpu_fp32", "zero1_bf16", "zero2_bf16", "zero3_bf16"), "cait_xxs24": ("cpu_fp32", "zero2_bf16", "zero3_bf16")}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> Path:
    """`--measure` (through `run_plan`) on 2 CPU ranks, 64 px, micro-batch 32, every model and
    ds_config of MEASURED_CONFIGS in one launch: the folder of their JSON reports."""
    out = tmp_path_factory.mktemp("measured")
    script = str(Path(__file__).parent / "scripts" / "plan_measure.py")
    specs = [f"{model}={','.join(configs)}" for model, configs in sorted(MEASURED_CONFIGS.items())]
    run(with_script(ranks_cmd([]), script, "64", "32", str(out), *specs), timeout=1800)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MEASURED_CONFIGS))
def test_measured_step_agrees_with_the_plan_on_two_ranks(model, measured):
    """The model-state, EMA and micro-step lines within 15 % of the measurement."""
    for ds_config in MEASURED_CONFIGS[model]:
        report = json.loads((measured / f"{model}-{ds_config}.json").read_text())
        rows = {row["line"].split(" (")[0]: row for row in report["predicted_vs_measured"]}
        print(model, ds_config, {name: (round(r["predicted"] / 1e6, 1), round(r["measured"] / 1e6, 1)) for name, r in rows.items()})
        for name in ("model states", "EMA", "micro-step: forward + backward", "micro-step: optimizer step", "tensor peak"):
            assert 0.85 <= rows[name]["ratio"] <= 1.15, (model, ds_config, name, rows[name])
