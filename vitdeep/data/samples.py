"""Reading samples out of tar shards without letting bad data stop a run.

A shard is read with webdataset's tar iterator; every failure (an unreadable tar, a truncated
member, an undecodable image, a missing or out-of-range `cls`) is logged, counted in `ReadStats`
and skipped. `count_samples` counts a shard's samples from the tar headers alone, grouping member
names exactly as the reader does, so a resumed stream can skip samples without decoding them
(for local files, without reading more than the headers).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

from PIL import Image
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tarfile_samples

from vitdeep.data.options import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

LABEL_EXTENSION = "cls"
#: Names webdataset treats as archive metadata, not samples.
_META = re.compile(r"__[^/]*__($|/)")


@dataclass
class ReadStats:
    """What one reader (or, summed, a whole loader) has read so far."""

    samples: int = 0
    bad: Counter = field(default_factory=Counter)
    worker: int = 0
    fatal: str | None = None

    @property
    def bad_samples(self) -> int:
        return sum(self.bad.values())

    @property
    def read(self) -> int:
        return self.samples + self.bad_samples

    def snapshot(self) -> ReadStats:
        """A copy to hand to another process (the original keeps changing)."""
        return dataclasses.replace(self, bad=Counter(self.bad))

    def __add__(self, other: ReadStats) -> ReadStats:
        return ReadStats(self.samples + other.samples, self.bad + other.bad, fatal=self.fatal or other.fatal)


class BadSample(Exception):
    """A sample that cannot be used; the message is the reason, as counted."""


class BadDataLog:
    """Counts bad data into `stats` and logs the first few cases with their shard."""

    LOG_LIMIT = 10

    def __init__(self, stats: ReadStats, log_limit: int = LOG_LIMIT):
        self.stats = stats
        self.log_limit = log_limit

    def _log(self, message: str) -> None:
        logged = self.stats.bad_samples
        if logged <= self.log_limit:
            logger.warning("skipped bad data: %s", message)
        if logged == self.log_limit:
            logger.warning("further bad data is counted but not logged")

    def sample(self, sample: dict, reason: str) -> None:
        self.stats.bad[reason.split(":")[0]] += 1
        self._log(f"{sample.get('__key__')} in {sample.get('__url__')}: {reason}")

    def read_error(self, error: Exception) -> bool:
        """webdataset's error handler: count, log, carry on with the next member or shard."""
        self.stats.bad["unreadable tar data"] += 1
        self._log(f"{type(error).__name__}: {' '.join(str(a) for a in error.args)[:300]}")
        return True


def shard_samples(url: str, bad: BadDataLog) -> Iterator[dict]:
    """Raw samples (`__key__`, `__url__`, one entry per member) of one shard, in file order."""
    return tarfile_samples(iter([{"url": url}]), handler=bad.read_error)


def decode_sample(sample: dict, num_classes: int | None) -> tuple[Image.Image, int]:
    """RGB image and class index of a raw sample, or `BadSample` saying what is wrong."""
    image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_bytes is None:
        raise BadSample("no image member")
    if LABEL_EXTENSION not in sample:
        raise BadSample("no cls member")
    try:
        label = int(sample[LABEL_EXTENSION])
    except ValueError:
        raise BadSample("cls is not an integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise BadSample(f"cls out of range: {label} not in [0, {num_classes})")
    try:
        image = Image.open(io.BytesIO(image_bytes))
        if image.mode == "RGB":
            image.load()
        else:
            image = image.convert("RGB")
    except Exception as error:  # PIL raises many types for broken files
        raise BadSample(f"undecodable image: {error}") from None
    return image, label


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def count_samples(url: str) -> int:
    """Samples in a shard, from its member names only (local files: headers alone are read)."""
    count, previous = 0, None
    try:
        if is_local(url):
            archive = tarfile.open(urlparse(url).path if url.startswith("file:") else url, "r:*")
        else:
            archive = tarfile.open(fileobj=gopen(url), mode="r|*")
        with archive:
            for member in archive:
                if not member.isreg() or _META.match(member.name):
                    continue
                prefix, _ = base_plus_ext(member.name)
                if prefix is not None and prefix != previous:
                    count, previous = count + 1, prefix
    except (OSError, tarfile.TarError):
        pass  # the reader stops at the same place, having counted the error
    return count
