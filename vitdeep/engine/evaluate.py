"""Exact evaluation over a sharded set on any number of ranks.

The eval pipeline yields each sample exactly once across ranks; the sums (correct, loss,
per-class counts) are all-reduced, so top-1 / top-5 are over the true sample count whatever the
number of ranks. Ranks may hold different numbers of batches: under ZeRO-3 every forward is a
collective, so a rank that has run out keeps stepping with an empty batch until all are done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    count: int
    images_per_s: float
    per_class_top1: list[float] = field(default_factory=list)
    per_class_count: list[int] = field(default_factory=list)

    def scalars(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "count": self.count}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not _distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@torch.no_grad()
def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    device: torch.device,
    img_size: int,
    lockstep: bool = False,
    on_batch: Callable[[int], Any] | None = None,
) -> EvalResult:
    """Top-1 / top-5 / cross-entropy of `model` over `batches` (uint8 images, int labels).

    `lockstep=True` (ZeRO-3) keeps every rank calling the model until all ranks are done.
    `on_batch(n)` is called with each batch size (for progress bars).
    """
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, count
    class_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    class_count = torch.zeros(num_classes, dtype=torch.float64, device=device)
    iterator = iter(batches)
    start = time.perf_counter()
    while True:
        batch = next(iterator, None)
        if lockstep and not _any_rank(batch is not None, device):
            break
        if batch is None:
            if not lockstep:
                break
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
    return EvalResult(
        top1=100.0 * sums[0].item() / denominator,
        top5=100.0 * sums[1].item() / denominator,
        loss=sums[2].item() / denominator,
        count=count,
        images_per_s=count / max(seconds, 1e-9),
        per_class_top1=[100.0 * v for v in per_class],
        per_class_count=[int(c) for c in class_count.tolist()],
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
    dist_timeout: float = 30.0,
) -> EvalResult:
    """`vitdeep eval`: exact top-1 / top-5 / loss of any loadable source over a sharded set, on
    however many ranks launched it; prints a table and writes `out` (JSON) on rank 0."""
    from vitdeep.data.pipeline import BatchPreprocessor, eval_loader, read_dataset_info
    from vitdeep.engine.checkpoint import write_json_atomic
    from vitdeep.engine.deepspeed import init_distributed
    from vitdeep.errors import UserError
    from vitdeep.models.checkpoints import build_model, read_weights
    from vitdeep.monitor import make_console, progress_bar

    info = read_dataset_info(data, num_samples=num_samples, split=split)
    weights = read_weights(checkpoint, ema=ema)
    model, report = build_model(weights, model_name, img_size=img_size)
    if info.num_classes and info.num_classes != model.num_classes:
        raise UserError(f"{checkpoint} predicts {model.num_classes} classes; {data} has {info.num_classes}")
    dist_info = init_distributed(dist_timeout)
    model = model.to(dist_info.device).eval()
    loader = eval_loader(
        info, micro_batch=batch_size, img_size=model.img_size, crop_ratio=crop_ratio, rank=dist_info.rank,
        world_size=dist_info.world_size, num_workers=workers, num_classes=model.num_classes,
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
    if dist_info.is_main:
        _print_result(console, result, checkpoint, ema)
        classes = info.class_names or [str(i) for i in range(model.num_classes)]
        write_json_atomic(Path(out), {
            "checkpoint": str(checkpoint), "ema": ema, "data": str(data), "img_size": model.img_size,
            "crop_ratio": crop_ratio, "world_size": dist_info.world_size, **result.scalars(),
            "images_per_s": result.images_per_s,
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
