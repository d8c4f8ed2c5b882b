"""Training epochs kept in memory and replayed, for runs in one process that read the same stream.

A training batch is a function of the shards, the seed, the epoch, the lanes, the rank's share and
the augmentation options alone (`vitdeep.data.lanes`). The cells of an ablation grid trained in one
launch share all of these, so every rank would read, decode and augment the very same batches
again for each cell: on the digits that was 6 % of a step. The first cell keeps each epoch it
reads whole and without a bad sample; the cells after it replay those batches, which are the
bytes the stream would have made. Memory is bounded: once the kept batches would pass
`max_bytes`, nothing more is kept (a stream as large as ImageNet is simply read each time).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable, Iterable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from vitdeep.data.lanes import RankShare, TrainBatch

#: Bytes of batches one process keeps by default: the digits' 30 epochs take 17 MB a rank.
DEFAULT_MAX_BYTES = 1 << 30


def shard_signature(urls: Iterable[str]) -> tuple | None:
    """(path, size, mtime) of every shard, or None when one is not a local file (a stream that
    might change under the same name is never replayed)."""
    signature = []
    for url in urls:
        parsed = urlparse(url)
        if parsed.scheme not in ("", "file"):
            return None
        try:
            stat = os.stat(parsed.path if parsed.scheme else url)
        except OSError:
            return None
        signature.append((url, stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


def stream_key(share: RankShare, transform_options: Hashable) -> Hashable | None:
    """What a rank's training epoch depends on (its start excepted), or None when it cannot be
    replayed."""
    shards = shard_signature(share.order.urls)
    if shards is None:
        return None
    return dataclasses.replace(share, start_step=0), transform_options, shards


class StreamReplay:
    """Whole training epochs of this process, by `stream_key`."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.kept_bytes = 0
        #: Set once an epoch did not fit in what was left: from then on nothing is copied.
        self.full = False
        self._epochs: dict[Hashable, list[TrainBatch]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._epochs

    def replay(self, key: Hashable, start: int) -> Iterator[TrainBatch]:
        """The kept epoch from micro-batch `start` on, as copies (the caller may change what it gets)."""
        for batch in self._epochs[key][start:]:
            yield batch.clone()

    def record(self, key: Hashable, batches: Iterable[TrainBatch], count: int) -> Iterator[TrainBatch]:
        """Pass an epoch of `count` batches through, keeping a copy once all of them have gone by
        (the consumer stops asking after the last) when none held a bad sample and they fit in
        what is left of `max_bytes`."""
        kept: list[TrainBatch] | None = None if self.full else []
        size = 0
        for batch in batches:
            if kept is not None:
                size += batch.nbytes
                if self.kept_bytes + size > self.max_bytes:
                    kept, self.full = None, True
                elif batch.stats.bad_samples:
                    kept = None
                else:
                    kept.append(batch.clone())
                    if len(kept) == count:
                        self._epochs[key] = kept
                        self.kept_bytes += size
            yield batch
