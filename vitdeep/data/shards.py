"""The shard writer: an ImageFolder tree → webdataset tar shards and a timm-style `_info.json`.

Each sample is `KEY.cls` (the class index as text) and `KEY.<ext>` (the image file's bytes, not
re-encoded unless `--max-size` caps the image: `vitdeep.data.capping`), the key being the file's path below the split folder without its extension. The file
list is shuffled once with a seed, so every shard is a random sample of its split: the training
stream reads one shard per stretch and relies on that. Files are read by a thread pool, written
in order by webdataset's `ShardWriter` into a scratch folder, and moved into place with the
`_info.json` only once a split is complete.

A source tree can hold anything, so listing it trusts nothing: a file is packed only when it is
a regular file (opened without blocking, so a FIFO named `x.jpg` cannot hang the writer) whose
first bytes are a JPEG, PNG or WebP header; broken links, FIFOs, devices and files that are no
image are skipped and counted by reason. Folder links are followed, but a folder is listed once
(a link loop ends there) and never under another class than its own (a link into another class
folder, or up to an ancestor of its class, is skipped), so no image gets a wrong label. Split
names are plain folder names, OUT is never SRC or inside it, and nothing is created in OUT
before every input check has passed.
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import Progress
from webdataset.writer import ShardWriter

from vitdeep.data.capping import Cap, cap_image, cap_options
from vitdeep.data.info import INFO_NAMES
from vitdeep.data.info_doc import check_info
from vitdeep.data.options import IMAGE_EXTENSIONS
from vitdeep.documents import read_document
from vitdeep.errors import UserError
from vitdeep.paths import claim_outputs
from vitdeep.fields import shown

#: Sub-folders of SRC taken as splits when no split is named (the ImageNet layout).
SPLIT_NAMES = ("train", "val", "validation", "test")
DEFAULT_SHARD_SIZE = "1000"
#: `on_split(entry, skipped, seconds)`: a split's `_info.json` entry once it is written, and the
#: files of the source tree passed over, counted by reason.
SplitWritten = Callable[[dict, Counter, float], None]
DEMO_SHARD_SIZE = "50"
#: The largest --shard-size, in samples or bytes (1 TiB: far past any shard worth writing).
MAX_SHARD_SIZE = 2**40
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_shard_size(text: str) -> tuple[int, float]:
    """`"1000"` → at most 1000 samples per shard; `"256MB"` / `"1GiB"` → at most that many bytes.

    Returned as webdataset's ShardWriter (maxcount, maxsize).
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in _UNITS) or float(match.group(1)) <= 0:
        raise UserError(f"`shard_size` must be a sample count (1000) or a size (256MB, 1GiB), got {shown(text)}", params=("shard_size",))
    if float(match.group(1)) * _UNITS.get(unit, 1) > MAX_SHARD_SIZE:  # also hundreds of digits (inf)
        raise UserError(f"`shard_size` must be at most {MAX_SHARD_SIZE:,} samples or bytes, got {shown(text)}", params=("shard_size",))
    if not unit:
        if not match.group(1).isdigit():
            raise UserError(f"`shard_size` as a sample count must be a whole number, got {shown(text)}", params=("shard_size",))
        return int(match.group(1)), float("inf")
    return 10**12, float(match.group(1)) * _UNITS[unit]


#: A split name is a plain folder name: it names SRC's folder and OUT's shard files.
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: The first bytes of the image formats a sample may carry (whatever the file's extension says).
_IMAGE_HEADERS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


@dataclass(frozen=True)
class _Image:
    path: Path
    label: int
    key: str
    ext: str


def _split_roots(src: Path, splits: Sequence[str] | None) -> dict[str, Path]:
    """Split name → folder holding its class sub-folders."""
    for name in splits or ():
        if not _SPLIT_NAME.fullmatch(name) or ".." in name:
            raise UserError(f"`split` {name!r} is not a folder name (letters, digits, '_', '-', '.')", params=("split",))
    if not src.is_dir():
        raise UserError(f"source folder {src} does not exist")
    present = [name for name in SPLIT_NAMES if (src / name).is_dir()]
    if not splits:
        return {name: src / name for name in present} or {"train": src}
    if len(splits) == 1 and not present:
        return {splits[0]: src}
    missing = [name for name in splits if not (src / name).is_dir()]
    if missing:
        raise UserError(f"{src} has no split folder {missing[0]!r} (it has {', '.join(present) or 'none'})")
    return {name: src / name for name in splits}


def _class_names(src: Path, roots: dict[str, Path]) -> list[str]:
    """Sorted class folders over every split of SRC, so all splits share one label mapping."""
    folders = {src / name for name in SPLIT_NAMES if (src / name).is_dir()} | set(roots.values())
    try:
        names = sorted({p.name for folder in folders for p in folder.iterdir() if p.is_dir()})
    except OSError as error:
        raise UserError(f"cannot list {error.filename}: {os.strerror(error.errno) if error.errno else error}") from None
    if not names:
        raise UserError(f"no class sub-folders in {', '.join(sorted(str(f) for f in folders))}")
    return names


def _class_folders(root: Path, classes: list[str]) -> dict[int, str]:
    """Label → real path of each class folder of a split; two classes that are one folder (or one
    inside the other, through links) would give its images two labels: refused."""
    real = {label: os.path.realpath(root / name) for label, name in enumerate(classes) if (root / name).is_dir()}
    for label, path in real.items():
        for other, other_path in real.items():
            if other != label and _within(path, other_path):
                raise UserError(f"class folders {root / classes[label]} and {root / classes[other]} are the same folder "
                                "or one holds the other (through a link): their images would have two labels")
    return real


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _list_images(root: Path, classes: list[str], workers: int) -> tuple[list[_Image], Counter]:
    """Image files of one split in a fixed (sorted) order, each folder listed once and under its
    own class only, and what was passed over by reason (see the module docstring); `workers`
    threads read the files' first bytes."""
    images, skipped, keys = [], Counter(), set()
    real = _class_folders(root, classes)
    visited: set[str] = set()
    for label in real:
        walk = os.walk(root / classes[label], followlinks=True, onerror=lambda error: skipped.update(["unreadable folder"]))
        for directory, subdirs, files in walk:
            visited.add(os.path.realpath(directory))
            kept = []
            for subdir in sorted(subdirs):
                path = os.path.realpath(os.path.join(directory, subdir))
                if _may_list(path, label, real, visited):
                    kept.append(subdir)
                    visited.add(path)  # a second link beside it to the same folder is a second way to it
            if len(kept) < len(subdirs):
                skipped["folder link to a folder listed elsewhere or to another class"] += len(subdirs) - len(kept)
            subdirs[:] = kept
            for file in sorted(files):
                path = Path(directory) / file
                ext = path.suffix.lower().removeprefix(".")
                if ext not in IMAGE_EXTENSIONS:
                    skipped["no image extension"] += 1
                    continue
                key = path.relative_to(root).with_suffix("").as_posix().replace(".", "_")
                unique, n = key, 1
                while unique in keys:
                    n += 1
                    unique = f"{key}_{n}"
                keys.add(unique)
                images.append(_Image(path, label, unique, ext))
    checked = []
    for image, (_, problem) in zip(images, _in_order(_read_image, [(i.path, 16) for i in images], workers)):
        if problem is None:
            checked.append(image)
        else:
            skipped[problem] += 1
    return checked, Counter(dict(skipped.most_common()))


def _may_list(path: str, label: int, real: dict[int, str], visited: set[str]) -> bool:
    """Whether a folder (its real path) met under class `label` is listed: not when it was listed
    already (a loop, or a second way to it), holds this class's folder (a link up), or is,
    holds or lies inside another class's folder (its images have another label)."""
    if path in visited or _within(real[label], path):
        return False
    return not any(_within(path, other) or _within(other, path) for lab, other in real.items() if lab != label)


def _read_image(job: tuple[Path, int | None]) -> tuple[bytes | None, str | None]:
    """`(path, limit)` → (the file's first `limit` bytes, or all of them for None; None) when it
    is a regular file starting with an image header, else (None, why it is skipped). The file is
    opened without blocking, so a FIFO or device is seen for what it is, not waited on."""
    path, limit = job
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, "broken link" if os.path.islink(path) else "vanished"
    except OSError:
        return None, "unreadable"
    with os.fdopen(fd, "rb") as stream:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None, "not a regular file"
            data = stream.read() if limit is None else stream.read(limit)
        except OSError:
            return None, "unreadable"
    if not data.startswith(_IMAGE_HEADERS) and not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return None, "not an image (no JPEG, PNG or WebP header)"
    return data, None


def _in_order(function: Callable, jobs: list, workers: int) -> Iterator:
    """`function(job)` of every job, in order, run by a thread pool a bounded number of jobs ahead
    (a million futures at once would hold gigabytes)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        upcoming = iter(jobs)
        for job in upcoming:
            pending.append(pool.submit(function, job))
            if len(pending) >= 4 * workers:
                break
        try:
            while pending:
                result = pending.popleft().result()
                following = next(upcoming, None)
                if following is not None:
                    pending.append(pool.submit(function, following))
                yield result
        finally:
            for future in pending:
                future.cancel()  # Ctrl-C: wait only for the reads already running


def _read_capped(job: tuple[Path, Cap | None]) -> tuple[bytes | None, bool, str | None]:
    """`(path, cap)` → (bytes to store, whether they were re-encoded, None), or (None, False, why
    it is skipped): the whole file, capped with a `cap` (`vitdeep.data.capping`)."""
    path, cap = job
    data, problem = _read_image((path, None))
    if data is None or cap is None:
        return data, False, problem
    try:
        capped = cap_image(data, cap)
    except Exception:  # PIL raises many types for broken files
        return None, False, "undecodable image (cannot be capped)"
    return (data, False, None) if capped is None else (capped, True, None)


def _shard_pattern(split: str) -> re.Pattern:
    return re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")


def _write_split(split: str, images: list[_Image], skipped: Counter, out: Path, shard_size: str, workers: int,
                 progress: Progress | None, cap: Cap | None = None) -> dict:
    """Write one split's shards into a scratch folder, then move them into `out`. A file that
    changed since it was listed (gone, or no image any more) is skipped and counted; with a `cap`,
    so is one that cannot be decoded to be capped."""
    maxcount, maxsize = parse_shard_size(shard_size)
    task = progress.add_task(split, total=len(images)) if progress is not None else None
    counts: Counter = Counter()
    total_bytes = capped = 0
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{split}-") as scratch:
        with ShardWriter(f"{scratch}/{split}-%06d.tar", maxcount=maxcount, maxsize=maxsize, verbose=0,
                         encoder=False, mtime=0) as writer:
            for image, (data, recoded, problem) in zip(images, _in_order(_read_capped, [(i.path, cap) for i in images], workers)):
                if progress is not None:
                    progress.advance(task)
                if data is None:
                    skipped[problem if problem.startswith("undecodable") else f"{problem}, since listed"] += 1
                    continue
                writer.write({"__key__": image.key, "cls": str(image.label).encode(), "jpg" if recoded else image.ext: data})
                capped += recoded
                counts[os.path.basename(writer.fname)] += 1
                total_bytes += len(data)
        for stale in out.iterdir():
            if _shard_pattern(split).fullmatch(stale.name):
                stale.unlink()
        for name in counts:
            os.replace(Path(scratch) / name, out / name)
    names = sorted(counts)
    entry = {"name": split, "num_samples": sum(counts.values()), "filenames": names,
             "shard_lengths": [counts[n] for n in names], "bytes": total_bytes}
    return entry if cap is None else {**entry, **cap.record(), "capped_images": capped}


def write_shards(
    src: str | Path,
    out: str | Path,
    *,
    splits: Sequence[str] | None = None,
    shard_size: str = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    workers: int = 8,
    overwrite: bool = False,
    max_size: int | None = None,
    quality: int | None = None,
    progress: Progress | None = None,
    on_split: SplitWritten | None = None,
) -> dict:
    """ImageFolder tree at `src` → `out/{split}-{000000..}.tar` + `out/_info.json`; returns the info.

    Every input is checked before anything is written (OUT is not even created before); existing
    shards of a split, and an `_info.json` that `vitdeep shards` did not write, are replaced only
    with `overwrite`. Other splits already in `out/_info.json` are kept. `progress` (rich) counts
    the files written; `on_split(entry, skipped, seconds)` hears of each split done, `skipped`
    counting the files passed over by reason. `max_size` caps the images' shorter side, re-encoding
    those above it as JPEG of `quality` (`vitdeep.data.capping`); without it every file is stored
    as it came.
    """
    src, out = Path(src), Path(out)
    parse_shard_size(shard_size)
    cap = cap_options(max_size, quality)
    if workers < 1:
        raise UserError(f"`workers` must be >= 1, got {workers}", params=("workers",))
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    roots = _split_roots(src, splits)
    claim_outputs([out / INFO_NAMES[0]], [src], flag="OUT", overwrite=True)
    classes = _class_names(src, roots)
    info = _read_own_info(out, overwrite)
    kept = sorted(set(info.get("splits", {})) - set(roots))
    if kept and info.get("class_names") not in (None, classes):
        raise UserError(f"{out}/_info.json keeps split(s) {', '.join(kept)} with other classes than {src}; use an empty folder")
    planned = {}
    for split, root in roots.items():
        images, skipped = _list_images(root, classes, workers)
        if not images:
            passed = "; passed over: " + ", ".join(f"{n} {why}" for why, n in skipped.items()) if skipped else ""
            raise UserError(f"no images ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}) in {root}{passed}")
        if not overwrite and out.is_dir() and any(_shard_pattern(split).fullmatch(p.name) for p in out.iterdir()):
            raise UserError(f"{out} already holds {split} shards; pass `overwrite` to replace them", params=("overwrite",))
        random.Random(seed).shuffle(images)
        planned[split] = (images, skipped)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    info = {"name": info.get("name", src.resolve().name), "num_classes": len(classes), "class_names": classes,
            "splits": dict(info.get("splits", {}))}
    try:
        for split, (images, skipped) in planned.items():
            start = time.perf_counter()
            entry = _write_split(split, images, skipped, out, shard_size, workers, progress, cap)
            seconds = time.perf_counter() - start
            info["splits"][split] = {**entry, "seed": seed, "shard_size": shard_size, "source": str(src.resolve())}
            _save_info(out, info)
            if on_split is not None:
                on_split(entry, skipped, seconds)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # a stopped or failed first split leaves no empty OUT behind
        raise
    return info


def write_demo_shards(out: str | Path, shard_size: str = DEMO_SHARD_SIZE, overwrite: bool = False, **report: Any) -> dict:
    """The built-in demo set (scikit-learn's digits as real PNGs, fixed 1,500/297 split) as shards
    (`report`: `write_shards`' `progress` and `on_split`)."""
    from vitdeep.data.digits import write_digits_imagefolder

    with tempfile.TemporaryDirectory(prefix="vitdeep-digits-") as tmp:
        root = Path(tmp) / "digits"
        write_digits_imagefolder(root)
        return write_shards(root, out, shard_size=shard_size, seed=0, overwrite=overwrite, **report)


def _read_own_info(out: Path, overwrite: bool) -> dict:
    """The `_info.json` an earlier `vitdeep shards` wrote into OUT ({} when there is none). Any
    other file of that name (another tool's, or unreadable) is replaced only with `overwrite`."""
    path = out / INFO_NAMES[0]
    if not os.path.lexists(path):
        return {}
    try:
        info = check_info(read_document(path, "shard metadata"), str(path))
    except UserError:
        info = None
    splits = info.get("splits") if isinstance(info, dict) else None
    if isinstance(splits, dict) and all(isinstance(entry, dict) and "source" in entry for entry in splits.values()):
        return info
    if overwrite:
        return {}
    raise UserError(f"{path} was not written by `vitdeep shards`: pass `overwrite` to replace it, or use another OUT",
                    params=("overwrite",))


def _save_info(out: Path, info: dict) -> None:
    scratch = out / f".{INFO_NAMES[0]}.partial"
    scratch.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(scratch, out / INFO_NAMES[0])
