"""Reading samples out of tar shards without letting bad data stop a run.

A shard is opened by `vitdeep.data.storage` (timeouts and retries for remote ones) and its members
grouped into samples by webdataset; every failure is logged, counted in `ReadStats` and skipped.
A sample that cannot be used (an undecodable image, a missing, malformed or out-of-range `cls`, a
repeated member) counts as one bad sample. A shard whose read fails part-way (it vanished, cannot be opened, stalls or is cut
off past its retries, or its tar is truncated or broken) or ends short of its listing is logged
once and counts what it lost: the samples its listing promised (`expected`, from `_info.json`)
and the read did not deliver, as missing samples; a failed shard of which nothing says how many
samples it held, or which lost none of them, counts as one unreadable shard. `count_samples`
counts a shard's samples from the tar headers alone, grouping member names exactly as the reader
does (`group_members`), so a resumed stream can skip samples without decoding them (for local files, without
reading more than the headers).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlparse

from PIL import Image
from webdataset.tariterators import base_plus_ext

from vitdeep.data.options import IMAGE_EXTENSIONS
from vitdeep.data.storage import open_shard

logger = logging.getLogger(__name__)

LABEL_EXTENSION = "cls"
#: Names webdataset treats as archive metadata, not samples.
_META = re.compile(r"__[^/]*__($|/)")
#: The counts of a shard whose read failed: the samples it promised and lost, or (when unknown,
#: or none were lost) the shard itself.
MISSING = "missing samples"
UNREADABLE_SHARD = "unreadable shard"
#: What a failed read raises once the storage layer has given up: I/O errors, a broken or
#: truncated tar (or gzip) stream.
READ_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error)


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
    """Counts bad data into `stats` and logs the first few bad samples with their shard, and every
    failed shard once (`log_limit=0`: count without logging)."""

    LOG_LIMIT = 10

    def __init__(self, stats: ReadStats, log_limit: int = LOG_LIMIT):
        self.stats = stats
        self.log_limit = log_limit
        self.logged = 0

    def _log(self, message: str) -> None:
        self.logged += 1
        if self.logged <= self.log_limit:
            logger.warning("skipped bad data: %s", message)
        if self.logged == self.log_limit:
            logger.warning("further bad data is counted but not logged")

    def sample(self, sample: dict, reason: str) -> None:
        self.stats.bad[reason.split(":")[0]] += 1
        self._log(f"{sample.get('__key__')} in {sample.get('__url__')}: {reason}")

    def read_error(self, error: Exception) -> bool:
        """webdataset's error handler: count, log, carry on with the next member or shard."""
        self.stats.bad["unreadable tar data"] += 1
        self._log(f"{type(error).__name__}: {' '.join(str(a) for a in error.args)[:300]}")
        return True

    def shard_failed(self, url: str, reason: str, read: int, lost: int) -> None:
        """A shard's read failed (or ended early) after `read` samples, losing `lost` of those it
        promised (which the caller counts as missing); with none lost, the shard counts as
        unreadable."""
        if not lost:
            self.stats.bad[UNREADABLE_SHARD] += 1
        if self.log_limit:
            cost = f"{lost} samples not read count as missing" if lost else "counted as one unreadable shard"
            logger.warning("unreadable shard %s after %d samples: %s; %s", url, read, reason, cost)

    def missing(self, count: int = 1) -> None:
        self.stats.bad[MISSING] += count


def _reason(error: Exception) -> str:
    text = str(error)
    return (text if isinstance(error, OSError) and text else f"{type(error).__name__}: {text}")[:300]


def shard_slots(url: str, bad: BadDataLog, expected: int | None = None) -> Iterator[dict | None]:
    """The raw samples of one shard in file order, then, when the read failed or ended short of
    the `expected` count, one `None` for each expected sample it did not deliver. The failure is
    logged and, when it costs no expected sample, counted (`BadDataLog.shard_failed`); the `None`s
    are left to the caller, which may count only its share of them (`EvalStream`)."""
    read, failure = 0, None
    try:
        with open_shard(url) as stream:
            for sample in group_members(_members(url, stream)):
                read += 1
                yield sample
    except READ_ERRORS as error:
        failure = _reason(error)
    lost = max(expected - read, 0) if expected is not None else 0
    if failure is None and not lost:
        return
    bad.shard_failed(url, failure or f"it ended {lost} samples short of the {expected} listed", read, lost)
    yield from itertools.repeat(None, lost)


def shard_samples(url: str, bad: BadDataLog, expected: int | None = None) -> Iterator[dict]:
    """Raw samples (`__key__`, `__url__`, one entry per member) of one shard, in file order. A read
    that fails part-way ends the shard: logged once, and counted in `bad` as the `expected`
    samples it did not deliver ("missing samples"), or as one "unreadable shard" when `expected`
    is unknown or all of it was delivered. A read that ends short of `expected` without an error
    counts its shortfall as missing too."""
    for sample in shard_slots(url, bad, expected):
        if sample is None:
            bad.missing()
        else:
            yield sample


def _members(url: str, stream: BinaryIO) -> Iterator[dict]:
    """The regular, non-metadata members of a tar stream, as webdataset's grouping takes them."""
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for member in archive:
            if member.isreg() and not _META.match(member.name):
                yield {"fname": member.name, "data": archive.extractfile(member).read(), "__url__": url}
            archive.members = []  # a stream's members are not kept


#: Set (to the reason) in a raw sample that is bad whatever decodes it; `decode_sample` refuses it.
BAD = "__bad__"


def group_members(files: Iterable[dict]) -> Iterator[dict]:
    """Tar members (`fname`, `data`, `__url__`; `{}` where a shard ends) → samples, grouped as
    webdataset's `group_by_keys` and `count_samples` group them: a run of consecutive members
    sharing the name before the first dot of their base name, each member under its extension in
    lower case; a member without an extension belongs to no sample.

    A sample that repeats a member (`a.png` twice, or `a.png` and `a.PNG`) or names one like the
    reader's own fields (`a.__key__`, any `__…__`) is yielded marked `BAD` ("duplicate member": which copy was
    meant cannot be told), so that it counts as one bad sample where samples are decoded and
    every sample keeps its position (resumed and modulo-sharded readers count positions).
    webdataset kept the first copy and counted every further one as a read error, so such a
    shard read more samples than it held ("8 of 6 samples read")."""
    current: dict | None = None
    for file in itertools.chain(files, [{}]):
        prefix, suffix = base_plus_ext(file["fname"]) if file else (None, None)
        if file and prefix is None:
            continue
        if current is not None and (not file or prefix != current["__key__"]):
            yield current
            current = None
        if not file:
            continue
        if current is None:
            current = {"__key__": prefix, "__url__": file["__url__"]}
        suffix = suffix.lower()
        if suffix in current or _META.fullmatch(suffix):
            current[BAD] = f"duplicate member: {file['fname'][-100:]!r}"
        else:
            current[suffix] = file["data"]


#: A label as `vitdeep shards` and webdataset write it: a decimal integer, perhaps padded with
#: ASCII whitespace (a trailing newline).
_LABEL = re.compile(rb"[ \t\r\n]*(-?[0-9]+)[ \t\r\n]*")


def parse_label(data: bytes, num_classes: int | None) -> int:
    """The class index in a `.cls` member, or `BadSample`. Stricter than `int()`, which also takes
    `1_000` and `٣`; and bounded, so that no label overflows the batch's int64 in a worker
    (`99999999999999999999999` did) whatever the class count."""
    match = _LABEL.fullmatch(data)
    if match is None:
        raise BadSample(f"cls is not an integer: {data[:20]!r}")
    digits = match.group(1)
    label = int(digits) if len(digits) <= 18 else -1
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise BadSample(f"cls out of range: {digits[:20].decode()} not in [0, {num_classes})")
    return label


#: The attribute of a lazily opened image (`open_lazy`) that holds its encoded bytes.
LAZY_BYTES = "encoded_bytes"
#: The marker a complete JPEG ends with (a truncated one, which libjpeg cannot finish, lacks it).
JPEG_END = b"\xff\xd9"


def decode_sample(sample: dict, num_classes: int | None, lazy: bool = False) -> tuple[Image.Image, int]:
    """RGB image and class index of a raw sample, or `BadSample` saying what is wrong.

    `lazy`: a complete JPEG (its header read, its end marker present) comes back opened but not
    decoded (`open_lazy`), for a transform that decodes it at a reduced scale; such
    an image may be of another mode than RGB until that transform decodes it."""
    if BAD in sample:
        raise BadSample(sample[BAD])
    image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_bytes is None:
        raise BadSample("no image member")
    if LABEL_EXTENSION not in sample:
        raise BadSample("no cls member")
    label = parse_label(sample[LABEL_EXTENSION], num_classes)
    try:
        image = Image.open(io.BytesIO(image_bytes))
        if lazy and image.format == "JPEG" and image_bytes.endswith(JPEG_END):
            return open_lazy(image_bytes), label
        if image.mode == "RGB":
            image.load()
        else:
            image = image.convert("RGB")
    except Exception as error:  # PIL raises many types for broken files
        raise BadSample(f"undecodable image: {error}") from None
    return image, label


def open_lazy(data: bytes) -> Image.Image:
    """An image opened (its header read) but not decoded; it keeps its bytes, so that every
    transform of it (several views, a substitute for a bad neighbour) decodes its own copy
    (`vitdeep.data.reduced_decode`)."""
    image = Image.open(io.BytesIO(data))
    setattr(image, LAZY_BYTES, data)
    return image


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def count_samples(url: str) -> int:
    """Samples in a shard, from its member names only (local files: headers alone are read)."""
    count, previous = 0, None
    try:
        for member in _headers(url):
            if not member.isreg() or _META.match(member.name):
                continue
            prefix, _ = base_plus_ext(member.name)
            if prefix is not None and prefix != previous:
                count, previous = count + 1, prefix
    except READ_ERRORS:
        pass  # the reader stops at the same place, having counted the error
    return count


def _headers(url: str) -> Iterator[tarfile.TarInfo]:
    """A shard's tar headers: local files by seeking from header to header; others as a stream
    opened under the read policy (so a stalled server times out here too)."""
    if is_local(url):
        with tarfile.open(urlparse(url).path if url.startswith("file:") else url, "r:*") as archive:
            yield from archive
    else:
        with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            yield from archive
