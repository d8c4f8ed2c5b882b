"""The shard writer: an ImageFolder tree → webdataset tar shards and a timm-style `_info.json`.

Each sample is `KEY.cls` (the class index as text) and `KEY.<ext>` (the image file's bytes, never
re-encoded), the key being the file's path below the split folder without its extension. The file
list is shuffled once with a seed, so every shard is a random sample of its split: the training
stream reads one shard per stretch and relies on that. Files are read by a thread pool, written
in order by webdataset's `ShardWriter` into a scratch folder, and moved into place with the
`_info.json` only once a split is complete.
"""

from __future__ import annotations

import json
import os
import random
import re
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

from vitdeep.data.info import INFO_NAMES
from vitdeep.data.options import IMAGE_EXTENSIONS
from vitdeep.errors import UserError

#: Sub-folders of SRC taken as splits when no split is named (the ImageNet layout).
SPLIT_NAMES = ("train", "val", "validation", "test")
DEFAULT_SHARD_SIZE = "1000"
#: `on_split(entry, skipped files, seconds)`: a split's `_info.json` entry once it is written.
SplitWritten = Callable[[dict, int, float], None]
DEMO_SHARD_SIZE = "50"
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_shard_size(text: str) -> tuple[int, float]:
    """`"1000"` → at most 1000 samples per shard; `"256MB"` / `"1GiB"` → at most that many bytes.

    Returned as webdataset's ShardWriter (maxcount, maxsize).
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in _UNITS) or float(match.group(1)) <= 0:
        raise UserError(f"`shard_size` must be a sample count (1000) or a size (256MB, 1GiB), got {text!r}", params=("shard_size",))
    if not unit:
        if not match.group(1).isdigit():
            raise UserError(f"`shard_size` as a sample count must be a whole number, got {text!r}", params=("shard_size",))
        return int(match.group(1)), float("inf")
    return 10**12, float(match.group(1)) * _UNITS[unit]


@dataclass(frozen=True)
class _Image:
    path: Path
    label: int
    key: str
    ext: str


def _split_roots(src: Path, splits: Sequence[str] | None) -> dict[str, Path]:
    """Split name → folder holding its class sub-folders."""
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
    names = sorted({p.name for folder in folders for p in folder.iterdir() if p.is_dir()})
    if not names:
        raise UserError(f"no class sub-folders in {', '.join(sorted(str(f) for f in folders))}")
    return names


def _list_images(root: Path, classes: list[str]) -> tuple[list[_Image], int]:
    """Images of one split in a fixed (sorted) order, and how many other files were passed over."""
    images, skipped, keys = [], 0, Counter()
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for directory, subdirs, files in os.walk(folder, followlinks=True):
            subdirs.sort()
            for file in sorted(files):
                path = Path(directory) / file
                ext = path.suffix.lower().removeprefix(".")
                if ext not in IMAGE_EXTENSIONS:
                    skipped += 1
                    continue
                key = path.relative_to(root).with_suffix("").as_posix().replace(".", "_")
                keys[key] += 1
                images.append(_Image(path, label, key if keys[key] == 1 else f"{key}_{keys[key]}", ext))
    return images, skipped


def _read_ahead(paths: list[Path], workers: int) -> Iterator[bytes]:
    """File contents in order, read by a thread pool a bounded number of files ahead."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        upcoming = iter(paths)
        for path in upcoming:
            pending.append(pool.submit(path.read_bytes))
            if len(pending) >= 4 * workers:
                break
        while pending:
            data = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(following.read_bytes))
            yield data


def _shard_pattern(split: str) -> re.Pattern:
    return re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")


def _write_split(split: str, images: list[_Image], out: Path, shard_size: str, workers: int, progress: Progress | None) -> dict:
    """Write one split's shards into a scratch folder, then move them into `out`."""
    maxcount, maxsize = parse_shard_size(shard_size)
    task = progress.add_task(split, total=len(images)) if progress is not None else None
    counts: Counter = Counter()
    total_bytes = 0
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{split}-") as scratch:
        with ShardWriter(f"{scratch}/{split}-%06d.tar", maxcount=maxcount, maxsize=maxsize, verbose=0,
                         encoder=False, mtime=0) as writer:
            for image, data in zip(images, _read_ahead([i.path for i in images], workers)):
                writer.write({"__key__": image.key, "cls": str(image.label).encode(), image.ext: data})
                counts[os.path.basename(writer.fname)] += 1
                total_bytes += len(data)
                if progress is not None:
                    progress.advance(task)
        for stale in out.iterdir():
            if _shard_pattern(split).fullmatch(stale.name):
                stale.unlink()
        for name in counts:
            os.replace(Path(scratch) / name, out / name)
    names = sorted(counts)
    return {"name": split, "num_samples": len(images), "filenames": names,
            "shard_lengths": [counts[n] for n in names], "bytes": total_bytes}


def write_shards(
    src: str | Path,
    out: str | Path,
    *,
    splits: Sequence[str] | None = None,
    shard_size: str = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    workers: int = 8,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_split: SplitWritten | None = None,
) -> dict:
    """ImageFolder tree at `src` → `out/{split}-{000000..}.tar` + `out/_info.json`; returns the info.

    Every input is checked before anything is written; existing shards of a split are replaced
    only with `overwrite`. Other splits already in `out/_info.json` are kept. `progress` (rich)
    counts the files written; `on_split(entry, skipped files, seconds)` hears of each split done.
    """
    src, out = Path(src), Path(out)
    parse_shard_size(shard_size)
    if workers < 1:
        raise UserError(f"`workers` must be >= 1, got {workers}", params=("workers",))
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    roots = _split_roots(src, splits)
    classes = _class_names(src, roots)
    info = _read_own_info(out)
    kept = sorted(set(info.get("splits", {})) - set(roots))
    if kept and info.get("class_names") not in (None, classes):
        raise UserError(f"{out}/_info.json keeps split(s) {', '.join(kept)} with other classes than {src}; use an empty folder")
    planned = {}
    for split, root in roots.items():
        images, skipped = _list_images(root, classes)
        if not images:
            raise UserError(f"no images ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}) in {root}")
        if not overwrite and out.is_dir() and any(_shard_pattern(split).fullmatch(p.name) for p in out.iterdir()):
            raise UserError(f"{out} already holds {split} shards; pass `overwrite` to replace them", params=("overwrite",))
        random.Random(seed).shuffle(images)
        planned[split] = (images, skipped)

    out.mkdir(parents=True, exist_ok=True)
    info = {"name": info.get("name", src.resolve().name), "num_classes": len(classes), "class_names": classes,
            "splits": dict(info.get("splits", {}))}
    for split, (images, skipped) in planned.items():
        start = time.perf_counter()
        entry = _write_split(split, images, out, shard_size, workers, progress)
        seconds = time.perf_counter() - start
        info["splits"][split] = {**entry, "seed": seed, "shard_size": shard_size, "source": str(src.resolve())}
        _save_info(out, info)
        if on_split is not None:
            on_split(entry, skipped, seconds)
    return info


def write_demo_shards(out: str | Path, shard_size: str = DEMO_SHARD_SIZE, overwrite: bool = False, **report: Any) -> dict:
    """The built-in demo set (scikit-learn's digits as real PNGs, fixed 1,500/297 split) as shards
    (`report`: `write_shards`' `progress` and `on_split`)."""
    from vitdeep.data.digits import write_digits_imagefolder

    with tempfile.TemporaryDirectory(prefix="vitdeep-digits-") as tmp:
        root = Path(tmp) / "digits"
        write_digits_imagefolder(root)
        return write_shards(root, out, shard_size=shard_size, seed=0, overwrite=overwrite, **report)


def _read_own_info(out: Path) -> dict:
    path = out / INFO_NAMES[0]
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    return info if isinstance(info.get("splits"), dict) else {}


def _save_info(out: Path, info: dict) -> None:
    scratch = out / f".{INFO_NAMES[0]}.partial"
    scratch.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(scratch, out / INFO_NAMES[0])
