"""The training sample order: one global sequence for any number of ranks, workers and micro-batches.

An epoch's samples are fixed by the data, the seed, the epoch and the global batch alone, so a run
can stop on 64 ranks and go on on 8 (or be debugged on 1) with the same samples at the same global
positions. The order is built from *lanes*, a number chosen when a run starts and kept for its life:

- **Parts.** The shard list is shuffled with (seed, epoch); its concatenated samples are cut into
  `lanes` equal contiguous parts, sample by sample (a part may start and end inside a shard). Lane
  `l` reads its part in order, one *piece* (the part's stretch of one shard) after another, each
  shuffled by its own buffer seeded by (seed, epoch, piece). No sample is read twice in an epoch.
- **Positions.** Each optimizer step takes `per_lane = global_batch / lanes` consecutive entries
  of every lane; entry `e` of a lane is view `e mod views` of its image `e div views`
  (`repeated_aug` views). Global position `q = slot × lanes + lane` within the step's batch.
- **Ranks.** Rank `r` of `R` owns lanes `[r·L/R, (r+1)·L/R)`; its share of a step is ordered slot
  by slot over its lanes, and micro-batch `j` is the `j`-th run of `micro_batch` entries of it.
  Worker `w` of `W` reads the rank's lanes `i ≡ w (mod W)` and contributes to every micro-batch
  the entries of its lanes (a *piece*); the loader puts the pieces in place.
- **Randomness.** Every sample carries a 64-bit seed of (seed, epoch, lane, entry): its
  augmentation, random erasing and drop-path masks are drawn from it, and Mixup / CutMix from the
  seed of its *pair* (the lanes `2p, 2p+1` at one slot, always on one rank and in one micro-batch).
  So nothing random depends on which rank or worker handles a sample.

What an epoch leaves out: `steps = samples // global_batch` steps are made; with one view per image
the last `samples - steps × global_batch` (fewer than one global batch) of the shuffled shard
order are not read. With `views` > 1 each lane reads the first `ceil(steps × per_lane / views)` images
of its part, as DeiT's repeated-augmentation sampler reads 1/views of the images an epoch.

A bad sample keeps its position: its entries are filled with views of the next good image of its
lane (the previous one at the lane's end) and recorded as substituted. Samples a piece could not
read at all (a vanished or truncated shard) are counted as missing and filled the same way.
A run resumed at step `s` starts each lane at entry `s × per_lane`, skipping earlier pieces
unopened and the rest of the current piece without decoding.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import random
import tarfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset
from webdataset.filters import shuffle
from webdataset.tariterators import base_plus_ext, tar_file_expander

from vitdeep.data.lane_layout import LaneLayout
from vitdeep.data.samples import _META, BadDataLog, BadSample, ReadStats, decode_sample, group_members, is_local, shard_samples
from vitdeep.data.seeding import AUGMENT, mix64
from vitdeep.data.streams import NoData, _stack, _worker, preserved_rngs, reseed, stream_seed
from vitdeep.data.reduced_decode import decode, takes_lazy_images
from vitdeep.data.transforms import Transform

logger = logging.getLogger(__name__)

#: Consecutive bad samples a lane reads before it gives up on finding a good one.
MAX_CONSECUTIVE_BAD = 10_000
# Purposes mixed into every seed, so no two random streams share one.
_SHARD_ORDER, _PIECE, _SAMPLE = 11, 12, 13


@dataclass(frozen=True)
class Piece:
    """A lane's stretch of one shard: raw samples `[start, stop)` in file order, shuffled."""

    url: str
    start: int
    stop: int
    seed: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochOrder:
    """The world-independent content of one training epoch (see the module docstring)."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    seed: int
    epoch: int
    layout: LaneLayout
    views: int
    shuffle_buffer: int

    @property
    def steps(self) -> int:
        return sum(self.sizes) // self.layout.global_batch

    @property
    def lane_images(self) -> int:
        """Images each lane reads in this epoch."""
        return math.ceil(self.steps * self.layout.per_lane / self.views)

    def shard_order(self) -> list[int]:
        order = list(range(len(self.urls)))
        random.Random(stream_seed(self.seed, self.epoch, _SHARD_ORDER)).shuffle(order)
        return order

    def pieces(self, lane: int) -> list[Piece]:
        """Lane `lane`'s part of the shuffled shard sequence, shard by shard."""
        begin = lane * self.lane_images
        end = begin + self.lane_images
        pieces, offset = [], 0
        for index in self.shard_order():
            size = self.sizes[index]
            start, stop = max(begin, offset), min(end, offset + size)
            if start < stop:
                seed = stream_seed(self.seed, self.epoch, index, start - offset, _PIECE)
                pieces.append(Piece(self.urls[index], start - offset, stop - offset, seed))
            offset += size
            if offset >= end:
                break
        return pieces

    def lane_seed(self, lane: int) -> int:
        return stream_seed(self.seed, self.epoch, lane, _SAMPLE)

    @staticmethod
    def sample_seeds(lane_seed: int, entry: int) -> tuple[int, int]:
        """(augmentation seed, sample seed) of entry `entry` of the lane with `lane_seed`."""
        sample = mix64(lane_seed + entry * 0x9E3779B97F4A7C15 & 0xFFFF_FFFF_FFFF_FFFF)
        return mix64(sample ^ AUGMENT), sample


@dataclass(frozen=True)
class RankShare:
    """What one rank reads of an epoch: its lanes, its micro-batches and each worker's piece of them."""

    order: EpochOrder
    rank: int
    world_size: int
    micro_batch: int
    readers: int
    start_step: int
    num_classes: int | None

    @property
    def rank_lanes(self) -> int:
        return self.order.layout.lanes // self.world_size

    @property
    def micro_per_step(self) -> int:
        return self.rank_lanes * self.order.layout.per_lane // self.micro_batch

    @property
    def micro_batches(self) -> int:
        """Micro-batches of this rank left in the epoch."""
        return (self.order.steps - self.start_step) * self.micro_per_step

    def lane(self, local: int) -> int:
        return self.rank * self.rank_lanes + local

    def global_position(self, u: int) -> int:
        """Position in the step's global batch of the rank's `u`-th entry of a step."""
        return (u // self.rank_lanes) * self.order.layout.lanes + self.lane(u % self.rank_lanes)

    def reader_lanes(self, reader: int) -> list[int]:
        return list(range(reader, self.rank_lanes, self.readers))

    def reader_slots(self, reader: int, micro: int) -> list[tuple[int, int, int]]:
        """(index in the micro-batch, global lane, lane entry) of what `reader` gives micro-batch
        `micro` (counted from the epoch's start)."""
        step, j = divmod(micro, self.micro_per_step)
        first = j * self.micro_batch
        out = []
        for u in range(first, first + self.micro_batch):
            local = u % self.rank_lanes
            if local % self.readers == reader:
                out.append((u - first, self.lane(local), step * self.order.layout.per_lane + u // self.rank_lanes))
        return out

    def positions(self, micro: int) -> list[int]:
        """Global positions (within the step's batch) of micro-batch `micro`'s entries, in order."""
        first = (micro % self.micro_per_step) * self.micro_batch
        return [self.global_position(u) for u in range(first, first + self.micro_batch)]


@dataclass
class Entry:
    """One view of a lane: its image (after augmentation), label, sample key and seed."""

    view: torch.Tensor
    label: int
    key: str
    seed: int
    substitute: str | None = None  # the key of the image used in place of a bad or missing one


@dataclass
class _Image:
    index: int
    key: str
    image: object = None  # PIL image, or None for a bad / missing sample
    label: int = -1
    #: The key of the image whose pixels stand in for this one, found undecodable only when a
    #: transform decoded it (a lazily opened JPEG whose data is broken past its header).
    borrowed: str | None = None


class LaneReader:
    """Entries of one lane from `first_entry` on, in order (run inside a loader worker)."""

    def __init__(self, order: EpochOrder, lane: int, first_entry: int, transform: Transform, bad: BadDataLog,
                 num_classes: int | None) -> None:
        self.order, self.lane, self.transform, self.bad, self.num_classes = order, lane, transform, bad, num_classes
        self.seed = order.lane_seed(lane)
        self.lazy = takes_lazy_images(transform)  # JPEGs left undecoded for the transform to decode at the scale it needs
        self.next_entry = first_entry
        self._images = self._filled(first_entry // order.views)
        self._current: tuple[_Image, _Image] | None = None
        self._ahead: deque[tuple[_Image, _Image]] = deque()  # read past by `_stand_in`, not yet taken
        self._last_good: _Image | None = None

    def take(self, entry: int) -> Entry:
        if entry != self.next_entry:
            raise RuntimeError(f"lane {self.lane} asked for entry {entry}, expected {self.next_entry}")
        self.next_entry += 1
        index, view = divmod(entry, self.order.views)
        while self._current is None or self._current[0].index != index:
            self._current = self._ahead.popleft() if self._ahead else next(self._images)
        wanted, used = self._current
        augment_seed, sample_seed = self.order.sample_seeds(self.seed, entry)
        reseed(augment_seed)  # the caller keeps its generators (`LaneStream` preserves them around a part)
        try:
            tensor = self.transform(used.image)
        except BadSample as error:
            self._borrow(used, str(error))
            reseed(augment_seed)
            tensor = self.transform(used.image)
        self._last_good = used
        substitute = used.borrowed or (None if used is wanted else used.key)
        return Entry(tensor, used.label, wanted.key, sample_seed, substitute)

    def _borrow(self, image: _Image, reason: str) -> None:
        """`image` was counted good but its transform could not decode it: count it bad, and give
        it (for this view and its others) the pixels and label of a stand-in (`_stand_in`)."""
        self.bad.sample({"__key__": image.key}, reason)
        self.bad.stats.samples -= 1
        stand_in = self._stand_in(image)
        image.image, image.label, image.borrowed = stand_in.image, stand_in.label, stand_in.key

    def _stand_in(self, broken: _Image) -> _Image:
        """As for a bad sample (`_filled`): the lane's next image that decodes, else the last good
        one. Images read past on the way are kept for their own turn."""
        for candidate in itertools.chain((used for _, used in list(self._ahead)), self._read_ahead()):
            if candidate is broken or candidate.borrowed is not None:
                continue
            try:
                decode(candidate.image)
            except BadSample:
                continue
            return candidate
        if self._last_good is None:
            raise NoData(f"no decodable image in lane {self.lane} to stand in for {broken.key}")
        return self._last_good

    def _read_ahead(self) -> Iterator[_Image]:
        """The images after those read so far, each kept for its turn."""
        for pair in self._images:
            self._ahead.append(pair)
            yield pair[1]

    # -- reading -----------------------------------------------------------------------------

    def _raw(self, first: int) -> Iterator[_Image]:
        """The lane's images (decoded, or None when bad / missing) from image `first` on."""
        index = 0
        for piece in self.order.pieces(self.lane):
            if index + len(piece) <= first:
                index += len(piece)  # wholly before the resume point: not even opened
                continue
            for position, sample in enumerate(self._piece_samples(piece)):
                if index + position < first:
                    continue  # read (the shuffle needs it) but not decoded
                yield self._decode(index + position, sample, piece)
            index += len(piece)

    def _piece_samples(self, piece: Piece) -> Iterator[dict | None]:
        """The piece's raw samples, shuffled; exactly `len(piece)` items, ending with None for each
        one that could not be read (counted as missing, beyond the read errors already counted).
        Read errors in the shard before the piece are another lane's to count."""
        log = _PieceLog(self.bad)
        samples = _samples_from(piece.url, piece.start, log)
        log.counting = True
        errors_before = self.bad.stats.bad_samples
        raw = itertools.islice(samples, len(piece))
        if self.order.shuffle_buffer > 1:
            raw = shuffle(self.order.shuffle_buffer, self.order.shuffle_buffer, rng=random.Random(piece.seed))(raw)
        read = 0
        for sample in raw:
            read += 1
            yield sample
        if read < len(piece):
            logger.warning("shard %s: %d of the %d samples [%d, %d) of lane %d could not be read",
                           piece.url, len(piece) - read, len(piece), piece.start, piece.stop, self.lane)
            missing = len(piece) - read - (self.bad.stats.bad_samples - errors_before)
            if missing > 0:
                self.bad.missing(missing)
            yield from itertools.repeat(None, len(piece) - read)

    def _decode(self, index: int, sample: dict | None, piece: Piece) -> _Image:
        if sample is None:
            return _Image(index, f"{piece.url}#missing")
        try:
            image, label = decode_sample(sample, self.num_classes, lazy=self.lazy)
        except BadSample as error:
            self.bad.sample(sample, str(error))
            return _Image(index, str(sample.get("__key__")))
        self.bad.stats.samples += 1
        return _Image(index, str(sample["__key__"]), image, label)

    def _filled(self, first: int) -> Iterator[tuple[_Image, _Image]]:
        """(image wanted at a position, image used there): a bad one borrows the next good image of
        the lane, or the previous one when none follows."""
        waiting: deque[_Image] = deque()
        previous: _Image | None = None
        for image in self._raw(first):
            if image.image is None:
                waiting.append(image)
                if len(waiting) > MAX_CONSECUTIVE_BAD:
                    raise NoData(f"no decodable image in {MAX_CONSECUTIVE_BAD} consecutive samples of lane {self.lane}")
                continue
            while waiting:
                yield waiting.popleft(), image
            previous = image
            yield image, image
        if waiting and previous is None:
            raise NoData(f"no readable sample in lane {self.lane} ({len(waiting)} bad or missing)")
        while waiting:
            yield waiting.popleft(), previous


def _samples_from(url: str, start: int, log: _PieceLog) -> Iterator[dict]:
    """A shard's raw samples from sample `start` on. A local uncompressed tar is entered at that
    sample's first header, found from the headers alone; any other shard is read from its start,
    the first `start` samples passed over without counting their read errors (another lane's)."""
    offsets = _sample_offsets(url) if start and is_local(url) else None
    if offsets is None or start >= len(offsets):
        samples = shard_samples(url, log)
        for _ in itertools.islice(samples, start):
            pass
        log.counting = True
        yield from samples
        return
    log.counting = True
    try:
        stream = open(url, "rb")
    except OSError as error:
        log.read_error(error)
        return
    with stream:
        stream.seek(offsets[start])
        files = tar_file_expander(iter([{"url": url, "stream": stream}]), handler=log.read_error)
        yield from group_members(files)


def _sample_offsets(url: str) -> tuple[int, ...] | None:
    """The byte offset of each sample's first tar header in a local shard, None when it cannot be
    entered mid-way (compressed, unreadable). Cached per file and version."""
    try:
        stat = os.stat(url)
    except OSError:
        return None
    return _scan_offsets(url, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _scan_offsets(path: str, size: int, mtime: int) -> tuple[int, ...] | None:
    """Grouped as webdataset groups a tar's members into samples (`count_samples` does the same)."""
    offsets, previous = [], None
    try:
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                if not member.isreg() or _META.match(member.name):
                    continue
                prefix, _ = base_plus_ext(member.name)
                if prefix is not None and prefix != previous:
                    offsets.append(member.offset)
                    previous = prefix
    except (OSError, tarfile.TarError):
        return None
    return tuple(offsets)


class _PieceLog(BadDataLog):
    """A lane's bad-data log that counts read errors only once `counting` (past the piece's start)."""

    def __init__(self, log: BadDataLog) -> None:
        super().__init__(log.stats, log.log_limit)
        self.counting = False

    def read_error(self, error: Exception) -> bool:
        return super().read_error(error) if self.counting else True


@dataclass
class ReaderPart:
    """What one reader gives one micro-batch (the loader puts the pieces of all readers together)."""

    index: torch.Tensor  # int64 [n]: places in the micro-batch
    images: torch.Tensor | None  # uint8 [n, 3, H, W]
    labels: torch.Tensor
    seeds: torch.Tensor  # int64 [n]: the samples' seeds (two's complement of the 64-bit seed)
    keys: list[str] = field(default_factory=list)
    substitutes: list[str | None] = field(default_factory=list)


class LaneStream(IterableDataset):
    """Yields, for each micro-batch of the rank, one `(ReaderPart | None, ReadStats)` per reader."""

    def __init__(self, share: RankShare, transform: Transform):
        super().__init__()
        self.share = share
        self.transform = transform

    def __iter__(self):
        share = self.share
        reader, workers = _worker()
        if workers != share.readers:
            raise RuntimeError(f"LaneStream planned for {share.readers} readers runs on {workers} workers")
        stats = ReadStats(worker=reader)
        bad = BadDataLog(stats)
        first_entry = share.start_step * share.order.layout.per_lane
        lanes = {share.lane(local): LaneReader(share.order, share.lane(local), first_entry, self.transform, bad, share.num_classes)
                 for local in share.reader_lanes(reader)}
        first = share.start_step * share.micro_per_step
        try:
            for micro in range(first, first + share.micro_batches):
                slots = share.reader_slots(reader, micro)
                with preserved_rngs():
                    part = self._piece([(place, lanes[lane].take(entry)) for place, lane, entry in slots]) if slots else None
                yield part, stats.snapshot()
        except NoData as error:
            stats.fatal = f"{error} (rank {share.rank}, reader {reader})"
            yield None, stats.snapshot()

    @staticmethod
    def _piece(entries: list[tuple[int, Entry]]) -> ReaderPart:
        places, items = zip(*entries)
        return ReaderPart(
            index=torch.tensor(places, dtype=torch.int64),
            images=_stack([e.view for e in items]),
            labels=torch.tensor([e.label for e in items], dtype=torch.int64),
            seeds=torch.tensor(np.array([e.seed for e in items], dtype=np.uint64).view(np.int64)),
            keys=[e.key for e in items],
            substitutes=[e.substitute for e in items],
        )


@dataclass
class TrainBatch:
    """A rank's micro-batch: uint8 images, labels, each sample's seed, global position in the step's
    batch, key and substitute (the key of the image used in place of a bad or missing one)."""

    images: torch.Tensor
    labels: torch.Tensor
    seeds: torch.Tensor
    positions: list[int]
    keys: list[str]
    substitutes: list[str | None]
    stats: ReadStats

    @classmethod
    def assemble(cls, parts: list[ReaderPart], size: int, positions: list[int], stats: ReadStats,
                 pin_memory: bool = False) -> TrainBatch:
        """Put the readers' parts of one micro-batch in their places."""
        if len(parts) == 1 and parts[0].index.tolist() == list(range(size)):
            part = parts[0]
            return cls(part.images, part.labels, part.seeds, positions, part.keys, part.substitutes, stats)
        images = torch.empty((size, *parts[0].images.shape[1:]), dtype=torch.uint8, pin_memory=pin_memory)
        labels = torch.empty(size, dtype=torch.int64)
        seeds = torch.empty(size, dtype=torch.int64)
        keys: list[str] = [""] * size
        substitutes: list[str | None] = [None] * size
        for part in parts:
            images.index_copy_(0, part.index, part.images)
            labels.index_copy_(0, part.index, part.labels)
            seeds.index_copy_(0, part.index, part.seeds)
            for place, key, substitute in zip(part.index.tolist(), part.keys, part.substitutes):
                keys[place], substitutes[place] = key, substitute
        return cls(images, labels, seeds, positions, keys, substitutes, stats)

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes + self.seeds.nbytes

    def clone(self) -> TrainBatch:
        return TrainBatch(self.images.clone(), self.labels.clone(), self.seeds.clone(), list(self.positions),
                          list(self.keys), list(self.substitutes), self.stats)
