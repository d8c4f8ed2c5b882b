"""Exact evaluation over a sharded set on any number of ranks.

The eval pipeline yields each sample exactly once across ranks; the sums (correct, loss,
per-class counts) are all-reduced, so top-1 / top-5 are over the true sample count whatever the
number of ranks. Ranks may hold different numbers of batches: under ZeRO-3 every forward is a
collective, so a rank that has run out keeps stepping with an empty batch until all are done.

Bad data is accounted for over all ranks and judged once, at the end: samples the shard list
promised, samples read, bad ones by cause, and missing ones (promised but never read, e.g. lost
after a tar read error), so that 1 rank and N ranks decide alike.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vitdeep.data.pipeline import MAX_BAD_FRACTION, EvalLoader, bad_data_error, too_many_bad
from vitdeep.engine.signals import StopFlag, StopRequested, WaitInterrupted
from vitdeep.errors import UserError


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    count: int
    images_per_s: float
    per_class_top1: list[float] = field(default_factory=list)
    per_class_count: list[int] = field(default_factory=list)
    #: Samples the shard list promised (None when unknown), read (good + bad), bad by cause, and
    #: missing: promised but never read (lost after a tar read error, or a listing that overstates).
    expected: int | None = None
    read: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    missing: int = 0

    def scalars(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "count": self.count}

    def accounting(self) -> dict[str, Any]:
        return {"expected": self.expected, "read": self.read, "bad": self.bad, "missing": self.missing}

    def bad_data_error(self, max_bad_fraction: float, flag: str = "--max-bad-fraction") -> UserError | None:
        """The bad-data rule applied to bad and missing samples together, over all ranks."""
        unusable = Counter(self.bad)
        if self.missing:
            unusable["missing (listed but not read)"] = self.missing
        judged = max(self.expected or 0, self.read)
        if not too_many_bad(sum(unusable.values()), judged, max_bad_fraction):
            return None
        error = bad_data_error(unusable, judged, max_bad_fraction, flag)
        return UserError(str(error), shared=True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _agree(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over all ranks."""
    if not _distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def counter_over_ranks(counter: Counter) -> Counter:
    """The sum of every rank's counts (bad samples by cause); a collective."""
    if not _distributed():
        return Counter(counter)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counter))
    return sum((Counter(g) for g in gathered), Counter())


def _next_batch(iterator: Iterator, stop: StopFlag | None) -> tuple | None:
    if stop is None:
        return next(iterator, None)
    try:
        with stop.interruptible():
            return next(iterator, None)
    except WaitInterrupted:
        return None


@torch.no_grad()
def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor],
    loader: EvalLoader,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    device: torch.device,
    img_size: int,
    lockstep: bool = False,
    on_batch: Callable[[int], Any] | None = None,
    stop: StopFlag | None = None,
) -> EvalResult:
    """Top-1 / top-5 / cross-entropy of `model` over `loader` (uint8 images, int labels), with the
    sample accounting of all ranks (expected, read, bad by cause, missing).

    `lockstep=True` (ZeRO-3) keeps every rank calling the model until all ranks are done. With a
    `stop` flag the ranks agree after every batch whether a stop signal arrived anywhere and
    raise `StopRequested` together. `on_batch(n)` is called with each batch size (for progress bars).
    """
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, count
    class_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    class_count = torch.zeros(num_classes, dtype=torch.float64, device=device)
    iterator = iter(loader)
    start = time.perf_counter()
    while True:
        batch = _next_batch(iterator, stop)
        if lockstep or stop is not None:
            any_batch, signal_number = _agree([float(batch is not None), float(stop.number if stop else 0)], device)
            if signal_number:
                raise StopRequested(int(signal_number))
            if not any_batch:
                break
        if batch is None:
            if not lockstep:
                if stop is None:
                    break
                continue
            model(preprocess(torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8, device=device)))
            continue
        images, labels = batch
        labels = labels.to(device)
        logits = model(preprocess(images.to(device, non_blocking=True))).float()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit1 = top5[:, 0] == labels
        sums[0] += hit1.sum()
        sums[1] += (top5 == labels[:, None]).any(-1).sum()
        sums[2] += F.cross_entropy(logits, labels, reduction="sum")
        sums[3] += labels.numel()
        class_count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        class_correct.index_add_(0, labels, hit1.to(torch.float64))
        if on_batch:
            on_batch(labels.numel())
    seconds = time.perf_counter() - start
    if _distributed():
        for tensor in (sums, class_correct, class_count):
            dist.all_reduce(tensor)
    count = int(sums[3].item())
    denominator = max(count, 1)
    per_class = (class_correct / class_count.clamp(min=1)).tolist()
    bad = counter_over_ranks(loader.stats.bad)
    read = count + sum(bad.values())
    expected = loader.samples_total
    return EvalResult(
        top1=100.0 * sums[0].item() / denominator,
        top5=100.0 * sums[1].item() / denominator,
        loss=sums[2].item() / denominator,
        count=count,
        images_per_s=count / max(seconds, 1e-9),
        per_class_top1=[100.0 * v for v in per_class],
        per_class_count=[int(c) for c in class_count.tolist()],
        expected=expected,
        read=read,
        bad=dict(bad.most_common()),
        missing=max(expected - read, 0) if expected is not None else 0,
    )


def run_eval(
    checkpoint: str,
    data: str,
    *,
    out: Path,
    model_name: str | None = None,
    img_size: int | None = None,
    crop_ratio: float,
    ema: bool = False,
    batch_size: int = 128,
    workers: int = 4,
    split: str = "val",
    num_samples: int | None = None,
    max_bad_fraction: float = MAX_BAD_FRACTION,
    dist_timeout: float = 30.0,
) -> EvalResult:
    """`vitdeep eval`: exact top-1 / top-5 / loss of any loadable source over a sharded set, on
    however many ranks launched it; prints a table and writes `out` (JSON) on rank 0.

    Every check runs before the evaluation: the output path, the shards, the weights. Too much
    bad or missing data (over all ranks) is an error after it, and `out` is not written.
    """
    from vitdeep.data.pipeline import BatchPreprocessor, eval_loader, read_dataset_info
    from vitdeep.engine.checkpoint import write_json_atomic
    from vitdeep.engine.deepspeed import init_distributed
    from vitdeep.engine.weights import build_model, read_weights
    from vitdeep.monitor import make_console, progress_bar
    from vitdeep.paths import check_output_file

    check_output_file(out, "--out", "eval.json")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise UserError(f"--max-bad-fraction must be in [0, 1], got {max_bad_fraction:g}")
    if batch_size < 1 or workers < 0:
        raise UserError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
    info = read_dataset_info(data, num_samples=num_samples, split=split)
    weights = read_weights(checkpoint, ema=ema)
    model, report = build_model(weights, model_name, img_size=img_size)
    if info.num_classes and info.num_classes != model.num_classes:
        raise UserError(f"{checkpoint} predicts {model.num_classes} classes; {data} has {info.num_classes}")
    dist_info = init_distributed(dist_timeout)
    model = model.to(dist_info.device).eval()
    loader = eval_loader(
        info, micro_batch=batch_size, img_size=model.img_size, crop_ratio=crop_ratio, rank=dist_info.rank,
        world_size=dist_info.world_size, num_workers=workers, num_classes=model.num_classes, max_bad_fraction=None,
    )
    preprocess = BatchPreprocessor(None, dist_info.device, torch.float32)
    console = make_console()
    for line in report.lines():
        console.print(line)
    with progress_bar() as progress:
        task = progress.add_task("eval", total=loader.samples_rank, info=f"rank 0 of {dist_info.world_size}")
        result = evaluate(
            model, loader, lambda images: preprocess(images, train=False), model.num_classes, dist_info.device,
            img_size=model.img_size, on_batch=lambda n: progress.advance(task, n),
        )
    error = result.bad_data_error(max_bad_fraction)
    if error is not None:
        raise error
    if dist_info.is_main:
        _print_result(console, result, checkpoint, ema)
        classes = info.class_names or [str(i) for i in range(model.num_classes)]
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(out), {
            "checkpoint": str(checkpoint), "ema": ema, "data": str(data), "img_size": model.img_size,
            "crop_ratio": crop_ratio, "world_size": dist_info.world_size, **result.scalars(),
            "images_per_s": result.images_per_s, **result.accounting(),
            "per_class": [
                {"class": i, "name": classes[i] if i < len(classes) else str(i), "top1": top1, "count": count}
                for i, (top1, count) in enumerate(zip(result.per_class_top1, result.per_class_count))
            ],
        })
    return result


def _print_result(console, result: EvalResult, checkpoint: str, ema: bool) -> None:
    from rich.table import Table

    table = Table(title=f"vitdeep eval: {checkpoint}{' (EMA)' if ema else ''}")
    for column in ("images", "top-1 %", "top-5 %", "loss", "images/s"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.count:,}", f"{result.top1:.2f}", f"{result.top5:.2f}", f"{result.loss:.4f}", f"{result.images_per_s:.0f}")
    console.print(table)
    if result.bad or result.missing:
        causes = ", ".join(f"{count} {cause}" for cause, count in result.bad.items())
        missing = f", {result.missing} missing (listed but not read)" if result.missing else ""
        console.print(f"[yellow]{result.read:,} of {result.expected or result.read:,} samples read; bad: {causes or 'none'}{missing}")
