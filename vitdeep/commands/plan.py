"""`vitdeep plan`: will this run fit, and how long will it take, before a GPU-hour is spent.

Resolves the run exactly as `vitdeep train` / `finetune` would (the same options, recipe and
config file, `engine.run_plan.make_plan`) for the cluster named by --nodes / --gpus-per-node,
prices it with `vitdeep.planner` (memory, time, input verdict), prints the breakdown and verdict,
and with --json writes the same numbers. Shards are not needed: without --data the plan assumes
ImageNet-1k (1,281,167 training images, 1000 classes) and says so. With --measure it runs one real
step here (`planner.measure`) and prints the prediction beside the measurement.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitdeep.config import TrainConfig
from vitdeep.data.info import DatasetInfo, read_dataset_info
from vitdeep.cores import usable_cores
from vitdeep.data.decode_rate import committed_decode_rate, measured_decode_rate
from vitdeep.engine.run_plan import RunPlan, make_plan
from vitdeep.errors import UserError
from vitdeep.monitor import is_main_process, make_console
from vitdeep.planner.cluster import DEFAULT_GPUS_PER_NODE, IMAGENET_CLASSES, IMAGENET_TRAIN_SAMPLES, Cluster, parse_memory
from vitdeep.planner.input_verdict import InputVerdict, choose_decode_rate
from vitdeep.planner.memory import MemoryEstimate, gb
from vitdeep.planner.report import CapacityReport, build_report


def training_data(cfg: TrainConfig) -> tuple[DatasetInfo, str]:
    """The shards' counts when --data is given, else ImageNet-1k's (with a note saying so)."""
    if cfg.data.data:
        info = read_dataset_info(cfg.data.data, num_samples=cfg.data.num_samples, split="train")
        return info, f"{info.require_num_samples():,} training images from --data"
    samples = cfg.data.num_samples or IMAGENET_TRAIN_SAMPLES
    classes = cfg.model.num_classes or IMAGENET_CLASSES
    note = (f"no --data: {samples:,} training images and {classes} classes assumed "
            f"(ImageNet-1k has {IMAGENET_TRAIN_SAMPLES:,} and {IMAGENET_CLASSES}; --num-samples / --num-classes change them)")
    return DatasetInfo(urls=(), num_samples=samples, num_classes=IMAGENET_CLASSES, counted_from="assumed"), note


def plan_for_cluster(cfg: TrainConfig, world_size: int) -> tuple[RunPlan, list[str]]:
    """The run plan for `world_size` ranks without shards, an output folder or init weights."""
    info, data_note = training_data(cfg)
    cfg.data.val = None  # memory and time come from training; validation is read by the run itself
    cfg.run.init_from = None  # the architecture came with the recipe (finetune --from); weights do not change memory
    notes = [data_note]
    if cfg.loss.distill != "none":
        notes.append("the distillation teacher's weights and forward pass are not counted")
    plan = make_plan(cfg, world_size, train_info=info, check_host=False)
    layout = plan.layout
    notes.append(f"training order: {layout.lanes} lanes (`--lanes`), so the run can stop and go on on "
                 f"{', '.join(map(str, layout.world_sizes()))} ranks; on {world_size}: up to "
                 f"{layout.worker_counts(world_size)[-1]} workers, micro-batch "
                 f"{', '.join(map(str, layout.micro_batches(world_size)))}")
    return plan, notes


def run_plan(
    cfg: TrainConfig,
    nodes: int | None,
    gpus_per_node: int | None,
    gpu_memory: str | None,
    gpu_tflops: float,
    mfu: float,
    json_path: Path | None,
    measure: bool,
    config: Path | None = None,
    measure_data: bool = False,
    decode_rate: float | None = None,
    cores_per_node: int | None = None,
) -> dict[str, Any]:
    """Plan, print, and (--json) write; with `measure`, also run and measure one step on this
    launch's ranks. Returns what --json writes (on rank 0; other ranks return {}). The JSON file
    is never the `config` file or inside the shards' folder, and replaces a file only with `overwrite`.

    The input verdict (`planner.input_verdict`) prices decoding at the rate `measure_data` measures
    here, the `decode_rate` given, or the committed benchmark's, on `cores_per_node` cores
    (default: this machine's usable cores)."""
    import torch

    from vitdeep.engine.deepspeed import world_from_env
    from vitdeep.paths import claim_outputs, data_folders

    if json_path is not None and not json_path.parent.is_dir():
        raise UserError(f"--json {json_path}: folder {json_path.parent} does not exist")
    if json_path is not None:
        claim_outputs([json_path], [*data_folders(cfg.data.data), *([config] if config else [])], flag="--json",
                      overwrite=cfg.run.overwrite)
    on_gpu = torch.cuda.is_available()
    memory = parse_memory(gpu_memory) if gpu_memory else None
    nodes = 1 if nodes is None else nodes
    if measure:
        _, launched, _ = world_from_env()
        gpus_per_node = launched // max(nodes, 1) if gpus_per_node is None else gpus_per_node
        if nodes * gpus_per_node != launched:
            raise UserError(f"--measure runs on this launch's {launched} rank(s): plan --nodes {nodes} × --gpus-per-node "
                            f"{gpus_per_node} = {nodes * gpus_per_node} to match, or launch that many ranks")
        if memory is None and on_gpu:
            memory = torch.cuda.get_device_properties(world_from_env()[2]).total_memory
    cluster = Cluster(
        nodes=nodes, gpus_per_node=DEFAULT_GPUS_PER_NODE if gpus_per_node is None else gpus_per_node,
        gpu_memory=Cluster().gpu_memory if memory is None else memory,
        gpu_tflops=gpu_tflops, mfu=mfu, device="cuda" if (on_gpu or not measure) else "cpu",
    )
    if measure:
        # one optimizer step per micro-step: memory per micro-step is the same, and the step runs in seconds
        cfg.optim.global_batch = cfg.optim.micro_batch * cluster.world_size
    plan, notes = plan_for_cluster(cfg, cluster.world_size)
    if measure:
        from vitdeep.engine.deepspeed import check_precision_supported

        check_precision_supported(plan.ds_config)
        notes.append(f"--measure: global batch = micro-batch × {cluster.world_size} ranks (no accumulation), "
                     f"optimizer {'fused AdamW (CUDA)' if cluster.device == 'cuda' else 'AdamW on the CPU'}")
    # every rank of a --measure launch runs the step; rank 0 alone prices and reports it
    report = verdict = None
    if is_main_process():
        decode = choose_decode_rate(measure_data, decode_rate, assumed=committed_decode_rate, measure=lambda: measured_decode_rate(
            cfg.model.img_size, cfg.augment, plan.train_info if cfg.data.data else None))
        report = build_report(plan, cluster, notes, decode)
        verdict = input_verdict(report, cores_per_node or usable_cores())
    record = {**report.to_dict(), "input": verdict.to_dict() if verdict else None} if report else {}
    if measure:
        from vitdeep.planner.measure import measure_step

        measured = measure_step(plan)
        if report:
            record["measured"] = measured
            record["predicted_vs_measured"] = compare(report.requested, measured)
    if report:
        print_report(report)
        for line in verdict.lines() if verdict else ["input: no decoding rate known: `--measure-data` measures it here, `--decode-rate N` takes one"]:
            make_console().print(line, markup=False)
        if measure:
            print_comparison(record["predicted_vs_measured"], measured)
        if json_path is not None:
            json_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def input_verdict(report: CapacityReport, cores_per_node: int) -> InputVerdict | None:
    """The node's input pipeline against what its ranks consume (None without a decoding rate)."""
    time, cfg = report.time, report.plan.cfg
    if time.decode is None:
        return None
    return InputVerdict(time.images_per_second_node, time.decode, cores_per_node, report.cluster.gpus_per_node,
                        cfg.model.img_size, cfg.augment.reduced_decode)


def compare(predicted: MemoryEstimate, measured: dict[str, Any]) -> list[dict[str, Any]]:
    """Prediction and measurement side by side, line by line (bytes per rank)."""
    lines = [
        ("model states (parameters, gradients, optimizer state, fp32 masters, ZeRO buffers)",
         sum(line.nbytes for line in predicted.states), measured["model_states"]),
        ("EMA", predicted.ema.nbytes, measured["held"]["EMA"]),
        ("micro-step: forward + backward", predicted.step.peak, measured["forward_backward"]),
        ("micro-step: optimizer step", predicted.step.after_backward + predicted.optimizer_step, measured["optimizer_step"]),
        ("tensor peak", predicted.tensor_peak, measured["tensor_peak"]),
    ]
    if "cuda_max_allocated" in measured:
        lines.append(("torch.cuda.max_memory_allocated", predicted.tensor_peak, measured["cuda_max_allocated"]))
        lines.append(("total with the framework allowance vs reserved + outside torch", predicted.total,
                      measured["cuda_max_reserved"] + measured["cuda_outside_torch"]))
    return [{"line": name, "predicted": p, "measured": m, "ratio": m / p if p else None} for name, p, m in lines]


def print_comparison(rows: list[dict[str, Any]], measured: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"predicted vs measured, one training step on {measured['ranks']} rank(s), {measured['device']} (largest rank)")
    for column in ("per rank", "predicted MB", "measured MB", "measured / predicted"):
        table.add_column(column, justify="left" if column == "per rank" else "right")
    for row in rows:
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "—"
        table.add_row(row["line"], f"{row['predicted'] / 1e6:,.1f}", f"{row['measured'] / 1e6:,.1f}", ratio)
    console = make_console()
    console.print(table)
    console.print("measured held storages: " + ", ".join(f"{kind} {nbytes / 1e6:.1f} MB" for kind, nbytes in measured["held"].items()))


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.0f} ms"


def memory_table(estimate: MemoryEstimate, title: str):
    from rich.table import Table

    table = Table(title=title)
    for column, justify in (("per GPU", "left"), ("", "right"), ("how", "left")):
        table.add_column(column, justify=justify)
    for line in estimate.lines():
        table.add_row(line.name, _size(line.nbytes), line.note)
    table.add_row("[bold]total", f"[bold]{_size(estimate.total)}", "model states + EMA + the larger micro-step line + allowance")
    return table


def print_report(report: CapacityReport) -> None:
    """The `vitdeep plan` output: memory breakdown, verdict, changes tried, time."""
    from rich.table import Table

    from vitdeep.monitor import make_console

    plan, cluster, est = report.plan, report.cluster, report.requested
    console = make_console()
    title = (f"vitdeep plan: {plan.cfg.model.model} at {plan.cfg.model.img_size} px on {cluster.nodes} × {cluster.gpus_per_node} "
             f"GPUs of {gb(cluster.gpu_memory):.1f} GB — {est.zero.label}, micro-batch {est.micro_batch}, global batch "
             f"{plan.batch.global_batch}, gradient accumulation {plan.batch.grad_accum}")
    console.print(memory_table(est, title))
    for line in report.verdict():
        console.print(line)
    if report.options:
        tried = Table(title="changes tried, cheapest first")
        for column in ("change", "ZeRO", "checkpointing", "largest micro-batch", "accumulation", "GB per GPU"):
            tried.add_column(column)
        for row in (o.to_dict(plan.batch.global_batch, cluster.world_size) for o in report.options):
            tried.add_row(row["change"], row["zero"], "yes" if row["grad_checkpointing"] else "no",
                          str(row["largest_micro_batch"] or "none fits"), str(row["grad_accum"] or ""), str(row["GB_per_gpu"] or ""))
        console.print(tried)
    t = report.time
    timing = Table(title=f"time at {t.mfu:.0%} MFU of {t.gpu_tflops:g} TFLOP/s per GPU", show_header=False)
    timing.add_row("forward GFLOPs per image", f"{t.forward_flops / 1e9:.2f}", "the counter of `vitdeep models`")
    timing.add_row("training GFLOPs per image", f"{t.train_factor * t.forward_flops / 1e9:.2f}",
                   f"{t.train_factor}× forward ({'with' if t.train_factor == 4 else 'without'} activation checkpointing)")
    timing.add_row("step", _duration(t.step_seconds), f"global batch {plan.batch.global_batch} on {cluster.world_size} GPU(s)")
    timing.add_row("epoch", _duration(t.epoch_seconds), f"{t.steps_per_epoch:,} steps of {plan.train_info.num_samples:,} images")
    timing.add_row("total", _duration(t.total_seconds), f"{t.total_steps:,} steps ({plan.epochs} epochs)")
    timing.add_row("images/s per node", f"{t.images_per_second_node:,.0f}", "what the data pipeline must decode and augment")
    if t.decode is not None:
        timing.add_row("CPU cores per node to decode", f"{t.cores_per_node:.1f}",
                       f"at {t.decode.per_core:.0f} images/s per core ({t.decode.source}: {t.decode.detail})")
    console.print(timing)
    for note in report.notes:
        console.print(f"note: {note}")
