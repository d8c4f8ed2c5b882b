"""Training and evaluation loaders over tar shards, and the on-device batch preprocessing.

`train_loader` and `eval_loader` check everything a user can get wrong (shards, sizes, ranks,
batch sizes) before any worker starts, then wrap a DataLoader over the streams of
`vitdeep.data.streams`. Rank and world size are always passed in: nothing here asks
torch.distributed or webdataset's node splitter who we are. Batches leave the workers as uint8
(a quarter of the bytes of float32); `BatchPreprocessor` normalises them on the device.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import itertools
import math
import multiprocessing
import os
import random
import signal
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, IterableDataset

from vitdeep.data.children import die_with_parent
from vitdeep.data.info import DatasetInfo, read_dataset_info
from vitdeep.data.lane_layout import LaneLayout, lane_shuffle_buffer
from vitdeep.data.lanes import EpochOrder, LaneStream, RankShare, TrainBatch
from vitdeep.data.options import MAX_BAD_FRACTION, ReadPolicy
from vitdeep.data.replay import StreamReplay, stream_key
from vitdeep.data.samples import ReadStats
from vitdeep.data.seeding import ERASE, derive
from vitdeep.data.storage import read_policy, use_read_policy
from vitdeep.data.streams import EvalPlan, EvalStream, TrainPlan, TrainStream
from vitdeep.data.transforms import AugmentConfig, Transform, eval_transform, train_transform
from vitdeep.data.worker_start import mark_started, start_workers, started_flags
from vitdeep.errors import UserError

__all__ = [
    "BatchPreprocessor",
    "DatasetInfo",
    "EvalLoader",
    "LaneLayout",
    "LaneLoader",
    "ReadStats",
    "StreamReplay",
    "TrainLoader",
    "epoch_batches",
    "eval_loader",
    "read_dataset_info",
    "TrainBatch",
    "lane_loader",
    "too_many_bad",
    "train_loader",
]

#: Until this many samples have been read, the limit is judged against this many.
MIN_JUDGED = 1000
SHUFFLE_BUFFER = 1000
#: Signals a training run acts on (`vitdeep.engine.signals`); loader workers leave them to it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def too_many_bad(bad: int, read: int, max_bad_fraction: float) -> bool:
    """The one bad-data rule (training, validation, `eval`): more bad samples than the fraction of
    those read, judged against at least `MIN_JUDGED` samples, so a few bad files early in a run
    or in a small set do not stop it."""
    return bad > max_bad_fraction * max(read, MIN_JUDGED)


def bad_data_error(bad: Counter, read: int, max_bad_fraction: float, *, shared: bool = False) -> UserError:
    reasons = ", ".join(f"{count} {reason}" for reason, count in bad.most_common())
    return UserError(
        f"{sum(bad.values())} of {read} samples read were bad ({reasons}), more than `max_bad_fraction` "
        f"{max_bad_fraction:g} allows; see the warnings above for where", shared=shared, params=("max_bad_fraction",),
    )


def _init_worker(parent: int, reads: ReadPolicy, started, worker_id: int) -> None:
    """A loader worker says it got past its fork (`vitdeep.data.worker_start`), and ignores the
    stop signals: killed by SIGTERM, it would fail the batch the
    run still needs to reach its checkpoint. It ignores them through a handler that does nothing,
    not SIG_IGN, which the commands it starts (`pipe:`) would inherit and so survive SIGTERM.
    It dies with the process that started it (blocked on a stalled read, it would never notice
    that process was killed), and reads under that process's `ReadPolicy`."""
    mark_started(started, worker_id)
    die_with_parent(parent)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _ignore_signal)
    use_read_policy(reads)


def _ignore_signal(number: int, frame: object) -> None:
    pass


def kill_workers() -> None:
    """SIGKILL this process's loader workers: they hold nothing to save, and ignore SIGTERM."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the DataLoader's handler would report each kill
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


@functools.cache
def _kill_workers_at_exit() -> None:
    """Registered once, before a loader starts its first workers (atexit runs the newest first).

    A process leaving on an exception still holds its loader in the traceback, so the workers are
    never told to stop; multiprocessing's own exit handler then sends them SIGTERM, which they
    ignore (above), and waits for them forever, and the other ranks wait for this one until
    `--dist-timeout`. SIGKILL ends them at once: they hold nothing to save."""
    atexit.register(kill_workers)


class _Loader:
    """A DataLoader over one of our streams: tallies the workers' `ReadStats`, turns a reader's
    fatal error or too much bad data into one `UserError` in the main process.

    `max_bad_fraction=None` leaves the bad-data decision to the caller, which makes it over all
    ranks (`too_many_bad` on all-reduced counts), so that every rank stops at the same point.
    """

    def __init__(self, dataset: IterableDataset, num_workers: int, max_bad_fraction: float | None, pin_memory: bool):
        if max_bad_fraction is not None and not 0.0 <= max_bad_fraction <= 1.0:
            raise UserError(f"`max_bad_fraction` must be in [0, 1], got {max_bad_fraction}", params=("max_bad_fraction",))
        self.max_bad_fraction = max_bad_fraction
        self.stats = ReadStats()
        # A private generator: the DataLoader draws its workers' base seed from it, not from the
        # caller's global stream (our streams seed themselves per batch).
        self._started = started_flags(num_workers)
        self._loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                  generator=torch.Generator(),
                                  worker_init_fn=functools.partial(_init_worker, os.getpid(), read_policy(), self._started))
        if num_workers:
            _kill_workers_at_exit()

    @property
    def bad_samples(self) -> int:
        return self.stats.bad_samples

    def _items(self) -> Iterator[tuple]:
        """The workers' items without their `ReadStats`, which are tallied into `self.stats`."""
        latest: dict[int, ReadStats] = {}
        self.stats = ReadStats()
        for *item, stats in start_workers(functools.partial(iter, self._loader), self._started, self._loader.num_workers):
            latest[stats.worker] = stats
            self.stats = sum(latest.values(), ReadStats())
            if stats.fatal:
                raise UserError(stats.fatal)
            self._check_bad()
            yield item
        self._check_bad()

    def _check_bad(self) -> None:
        if self.max_bad_fraction is not None and too_many_bad(self.stats.bad_samples, self.stats.read, self.max_bad_fraction):
            raise bad_data_error(self.stats.bad, self.stats.read, self.max_bad_fraction)


class TrainLoader(_Loader):
    """One rank's training epoch in the per-rank order of runs started before the lane order
    (`TrainStream`; such a run resumes only on its own world size). `len()` is the epoch's batch
    count, the same on every rank; with `start_batch=b` iteration yields batches b … len()-1,
    exactly as a full run would."""

    def __init__(self, plan: TrainPlan, info: DatasetInfo, transform: Transform, num_workers: int,
                 max_bad_fraction: float, pin_memory: bool):
        super().__init__(TrainStream(plan, transform), num_workers, max_bad_fraction, pin_memory)
        self.plan = plan
        self.info = info

    @property
    def start_batch(self) -> int:
        return self.plan.start_batch

    def __len__(self) -> int:
        return self.plan.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self._items():
            if images is not None:
                yield images, labels


class EvalLoader(_Loader):
    """One rank's share of an evaluation set: every sample exactly once over all ranks."""

    def __init__(self, plan: EvalPlan, info: DatasetInfo, transform: Transform, num_workers: int,
                 max_bad_fraction: float, pin_memory: bool, with_keys: bool):
        super().__init__(EvalStream(plan, transform), num_workers, max_bad_fraction, pin_memory)
        self.plan = plan
        self.info = info
        self.with_keys = with_keys
        per_reader = self._per_reader_counts()
        mine = per_reader[plan.rank * plan.readers : (plan.rank + 1) * plan.readers] if per_reader else None
        #: Samples expected over all ranks / on this rank / batches on this rank (None if unknown).
        self.samples_total: int | None = info.num_samples
        self.samples_rank: int | None = sum(mine) if mine is not None else None
        self.num_batches: int | None = sum(math.ceil(n / plan.batch) for n in mine) if mine is not None else None

    def _per_reader_counts(self) -> list[int] | None:
        plan, info = self.plan, self.info
        if plan.by_shards and info.shard_sizes is not None:
            return [sum(info.shard_sizes[c :: plan.consumers]) for c in range(plan.consumers)]
        if not plan.by_shards and info.num_samples is not None:
            return [len(range(c, info.num_samples, plan.consumers)) for c in range(plan.consumers)]
        return None

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("the number of evaluation batches is unknown (no sample counts for these shards)")
        return self.num_batches

    def __iter__(self) -> Iterator[tuple]:
        for images, labels, keys in self._items():
            if images is not None:
                yield (images, labels, keys) if self.with_keys else (images, labels)


def epoch_batches(num_samples: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per rank in one training epoch, the same on every rank (the remainder of the
    samples is left out, as by a drop-last sampler)."""
    return num_samples // (micro_batch * world_size)


def _check_ranks(rank: int, world_size: int, num_workers: int, micro_batch: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in a world of {world_size}")
    if num_workers < 0:
        raise UserError(f"`workers` must be >= 0, got {num_workers}", params=("workers",))
    if micro_batch < 1:
        raise UserError(f"the micro-batch size must be >= 1, got {micro_batch}")


def train_loader(
    urls: str | os.PathLike | Sequence[str] | DatasetInfo,
    *,
    micro_batch: int,
    img_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    num_workers: int,
    aug: AugmentConfig,
    num_samples: int | None = None,
    start_batch: int = 0,
    max_bad_fraction: float | None = MAX_BAD_FRACTION,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    split: str = "train",
    num_classes: int | None = None,
    pin_memory: bool = False,
) -> TrainLoader:
    """The per-rank training stream of runs started before the lane order (`lane_loader`):
    total_samples // (micro_batch × world_size) batches of `(images uint8 [B,3,H,W], labels int64
    [B])`, reproducible from (seed, epoch, rank, batch)."""
    _check_ranks(rank, world_size, num_workers, micro_batch)
    if seed < 0 or epoch < 0:
        raise UserError(f"seed and epoch must be >= 0, got {seed} and {epoch}")
    if micro_batch % aug.repeated_aug:
        raise UserError(f"the micro-batch size ({micro_batch}) must be a multiple of `repeated_aug` ({aug.repeated_aug})", params=("repeated_aug",))
    info = read_dataset_info(urls, num_samples, split)
    total = info.require_num_samples()
    batches = epoch_batches(total, micro_batch, world_size)
    if batches == 0:
        raise UserError(f"{total} training samples make no global batch of {micro_batch} × {world_size} ranks")
    if not 0 <= start_batch <= batches:
        raise UserError(f"start batch {start_batch} is outside the epoch of {batches} batches")
    plan = TrainPlan(
        urls=info.urls,
        rank=rank,
        world_size=world_size,
        readers=max(num_workers, 1),
        seed=seed,
        epoch=epoch,
        batches=batches,
        start_batch=start_batch,
        images_per_batch=micro_batch // aug.repeated_aug,
        views=aug.repeated_aug,
        shuffle_buffer=shuffle_buffer,
        num_classes=num_classes or info.num_classes,
    )
    return TrainLoader(plan, info, train_transform(aug, img_size), num_workers, max_bad_fraction, pin_memory)


def eval_loader(
    urls: str | os.PathLike | Sequence[str] | DatasetInfo,
    *,
    micro_batch: int,
    img_size: int,
    crop_ratio: float,
    rank: int,
    world_size: int,
    num_workers: int,
    num_samples: int | None = None,
    split: str = "val",
    sharding: str = "auto",
    interpolation: str = "bicubic",
    max_bad_fraction: float | None = MAX_BAD_FRACTION,
    num_classes: int | None = None,
    with_keys: bool = False,
    pin_memory: bool = False,
    log_bad: bool = True,
    reduced_decode: bool = False,
) -> EvalLoader:
    """Rank `rank`'s share of an evaluation set, every sample exactly once over all ranks.

    `sharding="shards"` gives each (rank, worker) whole shards and needs at least ranks × workers
    shards; `"modulo"` has every reader read all shards and keep every (ranks × workers)-th
    sample; `"auto"` picks whole shards when there are enough. Batches are
    `(images uint8, labels int64)` (plus the sample keys with `with_keys`); the last of each
    worker may be short. `log_bad=False` counts bad samples without logging them (a second pass
    over the same set). `reduced_decode` decodes JPEGs at the reduced scale the resize allows
    (off by default, so that accuracies stay comparable with published ones).
    """
    _check_ranks(rank, world_size, num_workers, micro_batch)
    if sharding not in ("auto", "shards", "modulo"):
        raise UserError(f"sharding must be auto, shards or modulo, got {sharding!r}")
    info = read_dataset_info(urls, num_samples, split)
    readers = max(num_workers, 1)
    enough = info.num_shards >= world_size * readers
    if sharding == "shards" and not enough:
        raise UserError(
            f"exact evaluation by whole shards needs at least ranks × workers = {world_size} × {readers} shards, "
            f"but there are {info.num_shards}: use fewer workers or modulo sharding"
        )
    plan = EvalPlan(
        urls=info.urls,
        rank=rank,
        world_size=world_size,
        readers=readers,
        batch=micro_batch,
        by_shards=sharding == "shards" or (sharding == "auto" and enough),
        num_classes=num_classes or info.num_classes,
        log_bad=log_bad,
        shard_sizes=info.shard_sizes,
    )
    transform = eval_transform(img_size, crop_ratio, interpolation, reduced_decode)
    return EvalLoader(plan, info, transform, num_workers, max_bad_fraction, pin_memory, with_keys)


class BatchPreprocessor:
    """uint8 batch → normalised float in the engine's dtype on the device, plus (training) timm's
    random erasing on the whole batch: the cheap per-pixel work the workers leave out."""

    def __init__(
        self,
        aug: AugmentConfig | None,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255)
        self.erase = None
        if aug is not None and aug.reprob > 0:
            self.erase = RandomErasing(aug.reprob, mode=aug.remode, max_count=aug.recount, device=self.device)

    def __call__(self, images: torch.Tensor, train: bool = False, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """`train=True` adds random erasing (when the config has it): from each sample's own seed
        when `seeds` (int64 [B]) are given, else from the global generators as timm does."""
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).mul_(self.inv_std)
        if train and self.erase is not None:
            if seeds is None:
                x = self.erase(x)
            else:
                self._erase_per_sample(x, seeds)
        return x.to(self.dtype)

    def _erase_per_sample(self, x: torch.Tensor, seeds: torch.Tensor) -> None:
        """timm's erasing of each image with Python's and torch's generators seeded by the image
        (the boxes come from `random`, the noise from torch); the callers' states are restored."""
        python_state = random.getstate()
        on_gpu = self.device.type == "cuda"
        generator = torch.cuda.default_generators[self.device.index or 0] if on_gpu else torch.default_generator
        with torch.random.fork_rng(devices=[self.device] if on_gpu else []):
            for image, seed in zip(x, derive(seeds.cpu(), ERASE).tolist()):
                random.seed(seed)
                generator.manual_seed(seed)  # the device's own generator: torch.manual_seed seeds every device (90 µs)
                self.erase._erase(image, *image.shape, image.dtype)
        random.setstate(python_state)


class LaneLoader(_Loader):
    """One rank's share of a training epoch in the lane order (`vitdeep.data.lanes`): yields
    `TrainBatch`es of `share.micro_batch` samples from the epoch's step `start_step` on, each put
    together from the pieces its readers made. `len()` is the number of micro-batches left."""

    def __init__(self, share: RankShare, info: DatasetInfo, transform: Transform, num_workers: int,
                 max_bad_fraction: float | None, pin_memory: bool, replay: StreamReplay | None = None,
                 replay_key: object = None):
        super().__init__(LaneStream(share, transform), num_workers, max_bad_fraction, pin_memory)
        self.pin_memory = pin_memory
        self.share = share
        self.info = info
        self.replay = replay if replay_key is not None else None
        self.replay_key = replay_key

    def __len__(self) -> int:
        return self.share.micro_batches

    def __iter__(self) -> Iterator[TrainBatch]:
        share = self.share
        if self.replay is not None and self.replay_key in self.replay:
            batches = self.replay.replay(self.replay_key, share.start_step * share.micro_per_step)
        else:
            batches = self._assembled()
            if self.replay is not None and share.start_step == 0:
                batches = self.replay.record(self.replay_key, batches, share.micro_batches)
        for batch in batches:
            self.stats = batch.stats
            yield batch

    def _assembled(self) -> Iterator[TrainBatch]:
        share = self.share
        items = self._items()
        micro = share.start_step * share.micro_per_step
        for parts in iter(lambda: list(itertools.islice(items, share.readers)), []):
            yield TrainBatch.assemble([part for part, in parts if part is not None], share.micro_batch,
                                      share.positions(micro), self.stats, self.pin_memory)
            micro += 1


def lane_loader(
    urls: str | os.PathLike | Sequence[str] | DatasetInfo,
    *,
    layout: LaneLayout,
    micro_batch: int,
    img_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    num_workers: int,
    aug: AugmentConfig,
    shuffle_buffer: int | None = None,
    start_step: int = 0,
    max_bad_fraction: float | None = MAX_BAD_FRACTION,
    split: str = "train",
    num_classes: int | None = None,
    pin_memory: bool = False,
    replay: StreamReplay | None = None,
) -> LaneLoader:
    """Rank `rank`'s share of training epoch `epoch` in the world-independent lane order, from step
    `start_step` on: the same global batches whatever `world_size`, `micro_batch` and
    `num_workers` (any that `layout` fits). `shuffle_buffer` is per lane (default: by the lanes).
    `replay` keeps the epochs read here for later loaders of the same stream in this process."""
    _check_ranks(rank, world_size, num_workers, micro_batch)
    if seed < 0 or epoch < 0:
        raise UserError(f"seed and epoch must be >= 0, got {seed} and {epoch}")
    layout.check(world_size, num_workers, micro_batch)
    info = read_dataset_info(urls, None, split)
    if info.shard_sizes is None:
        raise UserError(f"the training order needs every shard's sample count, unknown for {info.urls[0]} …: put an "
                        "_info.json (as `vitdeep shards` writes) or sizes.json beside the shards")
    order = EpochOrder(info.urls, info.shard_sizes, seed, epoch, layout, aug.repeated_aug,
                       shuffle_buffer if shuffle_buffer is not None else lane_shuffle_buffer(layout.lanes))
    if order.steps == 0:
        raise UserError(f"{sum(info.shard_sizes)} training samples make no global batch of {layout.global_batch}")
    if not 0 <= start_step <= order.steps:
        raise UserError(f"start step {start_step} is outside the epoch of {order.steps} steps")
    share = RankShare(order, rank, world_size, micro_batch, max(num_workers, 1), start_step, num_classes or info.num_classes)
    key = stream_key(share, (dataclasses.astuple(aug), img_size)) if replay is not None else None
    return LaneLoader(share, info, train_transform(aug, img_size), num_workers, max_bad_fraction, pin_memory, replay, key)
