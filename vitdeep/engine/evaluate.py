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
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vitdeep.data.pipeline import EvalLoader, bad_data_error, too_many_bad
from vitdeep.data.samples import MISSING
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
    #: missing: promised but never read (lost with a shard whose read failed, or a listing that
    #: overstates).
    expected: int | None = None
    read: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    missing: int = 0

    def scalars(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "count": self.count}

    def accounting(self) -> dict[str, Any]:
        return {"expected": self.expected, "read": self.read, "bad": self.bad, "missing": self.missing}

    def bad_causes(self) -> str:
        """"7 undecodable image, 1 unreadable tar data" ('' when nothing was bad)."""
        return ", ".join(f"{count} {cause}" for cause, count in self.bad.items())

    def describe_reading(self) -> str:
        """"290 of 297 samples read; bad: 7 undecodable image, 2 missing (listed but not read)"."""
        causes = self.bad_causes()
        missing = f", {self.missing} missing (listed but not read)" if self.missing else ""
        return f"{self.read:,} of {self.expected or self.read:,} samples read; bad: {causes or 'none'}{missing}"

    def bad_data_error(self, max_bad_fraction: float) -> UserError | None:
        """The bad-data rule applied to bad and missing samples together, over all ranks."""
        unusable = Counter(self.bad)
        if self.missing:
            unusable["missing (listed but not read)"] = self.missing
        judged = max(self.expected or 0, self.read)
        if not too_many_bad(sum(unusable.values()), judged, max_bad_fraction):
            return None
        return bad_data_error(unusable, judged, max_bad_fraction, shared=True)


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
    lost = bad.pop(MISSING, 0)
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
        missing=max(expected - read, lost) if expected is not None else lost,
    )
