"""`vitdeep eval`: exact top-1 / top-5 / loss of any loadable source over a sharded set, on however
many ranks launched it (the loop itself is `vitdeep.engine.evaluate.evaluate`)."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.table import Table

from vitdeep.architecture import EVAL_CROP_RATIO
from vitdeep.cores import workers_for_cores
from vitdeep.data.options import MAX_BAD_FRACTION, ReadPolicy
from vitdeep.data.pipeline import BatchPreprocessor, eval_loader, read_dataset_info
from vitdeep.data.storage import use_read_policy
from vitdeep.ranks import read_ranks
from vitdeep.paths import write_json_atomic
from vitdeep.engine.deepspeed import init_distributed, leave_process_group
from vitdeep.engine.evaluate import EvalResult, evaluate
from vitdeep.engine.markers import CHECKPOINTS, MARKER
from vitdeep.engine.weights import build_model, read_weights
from vitdeep.errors import UserError
from vitdeep.monitor import make_console, progress_bar
from vitdeep.paths import check_output_file, checkpoint_inputs, claim_outputs, data_folders


#: Loader workers per rank when none are asked for (fewer where the cores are fewer).
EVAL_WORKERS = 4


def default_eval_workers() -> int:
    """`EVAL_WORKERS`, or the usable cores each rank on this machine has when those are fewer: more
    workers than cores only contend (and torch warns about them). The count changes no result:
    evaluation reads every sample exactly once whatever the workers."""
    return workers_for_cores(EVAL_WORKERS, read_ranks().local_world_size or 1)


def run_eval(
    checkpoint: str,
    data: str,
    *,
    out: Path | None = None,
    model_name: str | None = None,
    img_size: int | None = None,
    crop_ratio: float | None = None,
    ema: bool = False,
    batch_size: int = 128,
    workers: int | None = None,
    split: str = "val",
    num_samples: int | None = None,
    max_bad_fraction: float = MAX_BAD_FRACTION,
    dist_timeout: float = 30.0,
    overwrite: bool = False,
    reads: ReadPolicy | None = None,
    reduced_decode: bool = False,
    leave: bool = False,
) -> EvalResult:
    """`vitdeep eval`: exact top-1 / top-5 / loss of any loadable source over a sharded set, on
    however many ranks launched it; prints a table and writes `out` (JSON) on rank 0, with the
    checkpoint evaluated (its path, step and whether EMA).

    Every check runs before the evaluation: the output path (never an input, nor an existing file
    without `overwrite`), the shards, the weights. Too much bad or missing data (over all ranks),
    or no readable sample at all, is an error after it, and `out` is not written. `reads` sets the
    timeouts and retries of remote reads (default: the process's). `reduced_decode` decodes JPEGs
    at the reduced scale the resize allows (off by default: comparable with published numbers).
    `out` defaults to `default_eval_out(checkpoint, ema)`: with the run's other outputs. `leave`:
    the launch ends with this evaluation (the command's own), so its ranks leave the process group.
    """
    out = Path(out) if out is not None else default_eval_out(checkpoint, ema)
    workers = default_eval_workers() if workers is None else workers
    check_output_file(out, "--out", "eval.json")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise UserError(f"--max-bad-fraction must be in [0, 1], got {max_bad_fraction:g}")
    if batch_size < 1 or workers < 0:
        raise UserError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
    claim_outputs([out], [*data_folders(data), *checkpoint_inputs(checkpoint)], flag="--out", overwrite=overwrite)
    if reads is not None:
        use_read_policy(reads)
    info = read_dataset_info(data, num_samples=num_samples, split=split)
    weights = read_weights(checkpoint, ema=ema)
    if crop_ratio is None:  # as the run validated (its own crop ratio), else DeiT's
        crop_ratio = weights.crop_ratio if weights.crop_ratio is not None else EVAL_CROP_RATIO
    model, report = build_model(weights, model_name, img_size=img_size)
    if info.num_classes and info.num_classes != model.num_classes:
        raise UserError(f"{checkpoint} predicts {model.num_classes} classes; {data} has {info.num_classes}")
    dist_info = init_distributed(dist_timeout)
    model = model.to(dist_info.device).eval()
    loader = eval_loader(
        info, micro_batch=batch_size, img_size=model.img_size, crop_ratio=crop_ratio, rank=dist_info.rank,
        world_size=dist_info.world_size, num_workers=workers, num_classes=model.num_classes, max_bad_fraction=None,
        reduced_decode=reduced_decode,
    )
    preprocess = BatchPreprocessor(None, dist_info.device, torch.float32)
    console = make_console()
    for line in report.lines():
        console.print(line)
    with progress_bar(transient=True) as progress:  # gone once done: the table follows, or a refusal's one line
        task = progress.add_task("eval", total=loader.samples_rank, info=f"rank 0 of {dist_info.world_size}")
        result = evaluate(
            model, loader, lambda images: preprocess(images, train=False), model.num_classes, dist_info.device,
            img_size=model.img_size, on_batch=lambda n: progress.advance(task, n),
        )
    error = result.bad_data_error(max_bad_fraction)
    if error is not None:
        raise error
    if not result.count:
        raise UserError(f"no sample of {data} could be read ({result.bad_causes() or 'its shards hold no sample'})", shared=True)
    if dist_info.is_main:
        _print_result(console, result, checkpoint, ema)
        classes = info.class_names or [str(i) for i in range(model.num_classes)]
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, {
            "checkpoint": str(checkpoint), "ema": ema,
            "evaluated": {"path": weights.source, "step": weights.step, "ema": ema, "kind": weights.kind},
            "data": str(data), "img_size": model.img_size,
            "crop_ratio": crop_ratio, "reduced_decode": reduced_decode, "world_size": dist_info.world_size, **result.scalars(),
            "images_per_s": result.images_per_s, **result.accounting(),
            "per_class": [
                {"class": i, "name": classes[i] if i < len(classes) else str(i), "top1": top1, "count": count}
                for i, (top1, count) in enumerate(zip(result.per_class_top1, result.per_class_count))
            ],
        })
    if leave:
        leave_process_group()
    return result


def default_eval_out(checkpoint: str | Path, ema: bool) -> Path:
    """Where `eval` writes without `--out`: beside the run's other outputs, never in the current
    folder (a second evaluation from elsewhere would scatter or clobber results). A run folder, its
    `checkpoints/` or one of its `step_*` folders → RUN/eval.json (eval_ema.json for the EMA, as
    `ablate` names them); a lone `step_*` folder or a file (an export, a state dict) → beside it,
    named after it (`NAME.eval.json`), as nothing may be written inside an input."""
    name = "eval_ema.json" if ema else "eval.json"
    path = Path(checkpoint)
    if not path.is_dir():
        return path.with_name(f"{path.stem}.{name}")
    if path.name == CHECKPOINTS:
        return path.parent / name
    if (path / MARKER).exists():  # one step_* folder
        return path.parent.parent / name if path.parent.name == CHECKPOINTS else path.with_name(f"{path.name}.{name}")
    return path / name


def _print_result(console, result: EvalResult, checkpoint: str, ema: bool) -> None:
    table = Table(title=f"vitdeep eval: {checkpoint}{' (EMA)' if ema else ''}")
    for column in ("images", "top-1 %", "top-5 %", "loss", "images/s"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.count:,}", f"{result.top1:.2f}", f"{result.top5:.2f}", f"{result.loss:.4f}", f"{result.images_per_s:.0f}")
    console.print(table)
    if result.bad or result.missing:
        console.print(f"[yellow]{result.describe_reading()}")
