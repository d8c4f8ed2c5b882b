"""The sample streams that run inside the DataLoader workers (one reader per worker).

Training runs read the lane order of `vitdeep.data.lanes`; `TrainStream` is the per-rank order of
runs started before it, kept so that their checkpoints resume exactly (on their own world size).

Training (`TrainStream`). Rank r's epoch is `batches` batches; batch i is made by reader i mod R,
as its local batch i div R (R readers per rank), which is the order in which a DataLoader
collects batches from its workers. A reader's stream is a sequence of stretches, one whole shard
each: the shard list is shuffled with (seed, epoch), the same on every rank, then split by rank and
by reader; a reader cycles through its shards (reshuffled each cycle) for as long as its quota
needs, so every rank yields the same number of batches whatever the shard sizes. Each stretch is
shuffled with its own buffer seeded by (seed, epoch, rank, reader, stretch), and each batch is
augmented under a seed of (seed, epoch, rank, reader, batch). Nothing depends on what came
before, so a run resumed at batch b regenerates batch b exactly: the reader counts the samples of
the stretches before it from tar headers and skips raw samples without decoding them.

A bad sample is skipped and its slot filled with another view of a good image of the same batch,
so batches keep their size and position; a batch with no good image borrows the next good one
without consuming it. Each yielded item carries the reader's running `ReadStats`.

Evaluation (`EvalStream`): every sample exactly once over all ranks and readers, either by giving
each reader whole shards, or (fewer shards than readers) by every reader reading all shards and
keeping the samples whose position is its index modulo the number of readers. A shard whose read
fails counts the samples it promised and lost as missing (`shard_slots`); reading every shard, a
reader counts the lost positions that were its share, so positions stay aligned across readers
even when a stall hits one reader and not another, and the counts add up exactly.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle

from vitdeep.data.samples import BadDataLog, BadSample, ReadStats, count_samples, decode_sample, shard_samples, shard_slots
from vitdeep.data.reduced_decode import takes_lazy_images
from vitdeep.data.transforms import Transform

# Purposes mixed into every seed, so no two random streams share one.
_SHARD_ORDER, _CYCLE, _SHUFFLE, _AUGMENT = range(1, 5)
#: A reader gives up when this many consecutive samples fail to decode.
MAX_CONSECUTIVE_BAD = 10_000


def stream_seed(*parts: int) -> int:
    """A 64-bit seed derived from non-negative integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def reseed(seed: int) -> None:
    """Seed Python's, numpy's and torch's CPU generators (timm's transforms draw from all three)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


@contextmanager
def preserved_rngs() -> Iterator[None]:
    """Restore Python's, numpy's and torch's CPU generators afterwards, so a reader in the main
    process leaves the caller's streams alone."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """`reseed(seed)` inside the block, the caller's generators restored afterwards."""
    with preserved_rngs():
        reseed(seed)
        yield


class NoData(Exception):
    """A reader can make no progress; the message is for the user."""


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _stack(views: list[torch.Tensor]) -> torch.Tensor:
    """Stack into shared memory when in a worker, saving the copy the queue would make."""
    out = torch.empty((len(views), *views[0].shape), dtype=views[0].dtype)
    if get_worker_info() is not None:
        out.share_memory_()
    return torch.stack(views, out=out)


def _chunks(stream: Iterator[dict], size: int) -> Iterator[list[dict]]:
    while True:
        yield list(itertools.islice(stream, size))


@dataclass(frozen=True)
class TrainPlan:
    """Everything a training reader needs; identical on all ranks except `rank`."""

    urls: tuple[str, ...]
    rank: int
    world_size: int
    readers: int
    seed: int
    epoch: int
    batches: int
    start_batch: int
    images_per_batch: int
    views: int
    shuffle_buffer: int
    num_classes: int | None

    def reader_shards(self, reader: int) -> tuple[list[str], bool]:
        """The reader's shards and whether its first cycle is reshuffled too (shared shards)."""
        order = list(self.urls)
        random.Random(stream_seed(self.seed, self.epoch, _SHARD_ORDER)).shuffle(order)
        mine = order[self.rank :: self.world_size] if len(order) >= self.world_size else order
        if len(mine) >= self.readers:
            return mine[reader :: self.readers], False
        return mine, True

    def stretches(self, reader: int) -> Iterator[tuple[int, str]]:
        """(stretch index, shard URL), endlessly: the reader's shards, cycle after cycle."""
        shards, shuffle_first = self.reader_shards(reader)
        index = itertools.count()
        for cycle in itertools.count():
            order = list(shards)
            if cycle or shuffle_first:
                random.Random(stream_seed(self.seed, self.epoch, self.rank, reader, cycle, _CYCLE)).shuffle(order)
            for url in order:
                yield next(index), url

    def local_batches(self, worker: int) -> tuple[int, range]:
        """The reader that worker `worker` plays, and the reader-local batches it makes."""
        reader = (self.start_batch + worker) % self.readers
        count = len(range(reader, self.batches, self.readers))
        return reader, range((self.start_batch + worker) // self.readers, count)


class TrainStream(IterableDataset):
    """Yields `(images uint8 [B,3,H,W], labels int64 [B], None, ReadStats)` for one rank."""

    def __init__(self, plan: TrainPlan, transform: Transform):
        super().__init__()
        self.plan = plan
        self.transform = transform

    def __iter__(self):
        plan = self.plan
        worker, workers = _worker()
        if workers != plan.readers:
            raise RuntimeError(f"TrainStream planned for {plan.readers} readers runs on {workers} workers")
        stats = ReadStats(worker=worker)
        bad = BadDataLog(stats)
        reader, batches = plan.local_batches(worker)
        try:
            chunks = _chunks(self._raw(reader, batches.start * plan.images_per_batch, bad), plan.images_per_batch)
            ahead: deque[list[dict]] = deque()
            for batch in batches:
                decoded = self._decode(ahead.popleft() if ahead else next(chunks), bad)
                tried = 0
                while not decoded:
                    if tried == len(ahead):
                        ahead.append(next(chunks))
                    decoded = self._decode(ahead[tried], None)
                    tried += 1
                    if tried * plan.images_per_batch > MAX_CONSECUTIVE_BAD:
                        raise NoData(f"no decodable image in {MAX_CONSECUTIVE_BAD} consecutive samples (rank {plan.rank}, reader {reader})")
                images, labels = self._augment(decoded, stream_seed(plan.seed, plan.epoch, plan.rank, reader, batch, _AUGMENT))
                yield images, labels, None, stats.snapshot()
        except NoData as error:
            stats.fatal = str(error)
            yield None, None, None, stats.snapshot()

    def _raw(self, reader: int, skip: int, bad: BadDataLog) -> Iterator[dict]:
        """The reader's raw (undecoded) samples from position `skip` on, endlessly."""
        plan = self.plan
        shards, _ = plan.reader_shards(reader)
        sizes: dict[str, int] = {}
        empty: set[str] = set()  # the shards that gave nothing since the last that gave a sample
        for stretch, url in plan.stretches(reader):
            if skip and url not in sizes:
                sizes[url] = count_samples(url)
            if skip and skip >= sizes[url]:
                size = sizes[url]  # wholly before the resume point: not even opened
                skip -= size
            else:
                size = 0
                for sample in self._stretch(reader, stretch, url, bad):
                    size += 1
                    if skip:
                        skip -= 1
                    else:
                        yield sample
            empty = set() if size else empty | {url}
            if len(empty) >= len(set(shards)):
                raise NoData(
                    f"no readable sample in any of the {len(shards)} shards of rank {plan.rank}, reader {reader} (e.g. {url})"
                )

    def _stretch(self, reader: int, stretch: int, url: str, bad: BadDataLog) -> Iterator[dict]:
        """One shard's raw samples, shuffled by a buffer seeded for this stretch alone."""
        plan = self.plan
        samples = shard_samples(url, bad)
        if plan.shuffle_buffer <= 1:
            return samples
        rng = random.Random(stream_seed(plan.seed, plan.epoch, plan.rank, reader, stretch, _SHUFFLE))
        return shuffle(plan.shuffle_buffer, plan.shuffle_buffer, rng=rng)(samples)

    def _decode(self, chunk: list[dict], bad: BadDataLog | None) -> list[tuple]:
        """Good (image, label) pairs of a chunk; bad ones are counted when `bad` is given."""
        decoded = []
        for sample in chunk:
            try:
                decoded.append(decode_sample(sample, self.plan.num_classes))  # in full: the lanes alone decode lazily
            except BadSample as error:
                if bad is not None:
                    bad.sample(sample, str(error))
        if bad is not None:
            bad.stats.samples += len(decoded)
        return decoded

    def _augment(self, decoded: list[tuple], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan
        chosen = [decoded[i % len(decoded)] for i in range(plan.images_per_batch)]
        with seeded(seed):
            views = [self.transform(image) for image, _ in chosen for _ in range(plan.views)]
        labels = torch.tensor([label for _, label in chosen for _ in range(plan.views)], dtype=torch.int64)
        return _stack(views), labels


@dataclass(frozen=True)
class EvalPlan:
    """Everything an evaluation reader needs."""

    urls: tuple[str, ...]
    rank: int
    world_size: int
    readers: int
    batch: int
    by_shards: bool
    num_classes: int | None
    log_bad: bool = True
    #: Samples per shard (from `_info.json`, sizes.json or the tar headers), when known: what a
    #: failed read of each is counted against.
    shard_sizes: tuple[int, ...] | None = None

    @property
    def consumers(self) -> int:
        return self.world_size * self.readers

    def consumer(self, worker: int) -> int:
        return self.rank * self.readers + worker


class EvalStream(IterableDataset):
    """Yields `(images uint8, labels int64, keys, ReadStats)`; the last batch of a reader may be
    short, and a final `(None, None, None, stats)` reports what was skipped after it."""

    def __init__(self, plan: EvalPlan, transform: Transform):
        super().__init__()
        self.plan = plan
        self.transform = transform

    def __iter__(self):
        plan = self.plan
        worker, _ = _worker()
        me = plan.consumer(worker)
        stats = ReadStats(worker=worker)
        # Reading every shard, all readers meet the same tar errors: only one counts them.
        log_limit = BadDataLog.LOG_LIMIT if plan.log_bad else 0
        bad = BadDataLog(stats, log_limit) if plan.by_shards or me == 0 else _SampleErrorsOnly(stats, log_limit)
        batch: list[tuple] = []
        for sample in self._samples(me, bad):
            try:
                image, label = decode_sample(sample, plan.num_classes, lazy=takes_lazy_images(self.transform))
                view = self.transform(image)  # a lazily opened JPEG is decoded (or found broken) here
            except BadSample as error:
                bad.sample(sample, str(error))
                continue
            stats.samples += 1
            batch.append((view, label, sample["__key__"]))
            if len(batch) == plan.batch:
                yield *self._collate(batch), stats.snapshot()
                batch = []
        if batch:
            yield *self._collate(batch), stats.snapshot()
        yield None, None, None, stats.snapshot()

    def _samples(self, me: int, bad: BadDataLog) -> Iterator[dict]:
        plan = self.plan
        sizes = plan.shard_sizes or (None,) * len(plan.urls)
        if plan.by_shards:
            mine = range(me, len(plan.urls), plan.consumers)
            yield from itertools.chain.from_iterable(shard_samples(plan.urls[i], bad, sizes[i]) for i in mine)
            return
        every = itertools.chain.from_iterable(shard_slots(url, bad, size) for url, size in zip(plan.urls, sizes))
        for sample in itertools.islice(every, me, None, plan.consumers):
            if sample is None:
                bad.missing()
            else:
                yield sample

    @staticmethod
    def _collate(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        images, labels, keys = zip(*batch)
        return _stack(list(images)), torch.tensor(labels, dtype=torch.int64), list(keys)


class _SampleErrorsOnly(BadDataLog):
    """Counts bad samples and its share of missing ones, leaving the shards' own errors (which
    every reader meets) to reader 0."""

    def read_error(self, error: Exception) -> bool:
        return True

    def shard_failed(self, url: str, reason: str, read: int, lost: int) -> None:
        pass
