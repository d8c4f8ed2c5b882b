"""Which shards a data argument names, and what is known about them.

A data argument is one string or a list of them; a string may join several with `::`
(webdataset's convention). Each part is one of:

- a directory: its shards are listed by `_info.json` (timm's layout, which `vitdeep shards` writes)
  for the wanted split, or else are its `*.tar` files whose names contain the split;
- a local path with `{000..099}` braces and/or `*` globs;
- a URL (`https://…`, `gs://…`) with braces, opened by `vitdeep.data.storage` with timeouts and
  retries (`file:` URLs are local paths);
- a `pipe:COMMAND` URL, which runs a shell command: honoured only because the user wrote it,
  and logged as a warning first. Names read from `_info.json` are always joined to the local
  directory, so a file can never smuggle in a command.

Sample counts come, in order, from `--num-samples`, `_info.json`, open_clip's `sizes.json` or a
scan of local tar headers (no decoding). For remote shards the two files are read from the
shards' own location (as timm's WebDataset reader does); without either the counts stay unknown,
which is said once.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from webdataset.shardlists import expand_urls

from vitdeep.data.info_doc import check_info, check_sizes
from vitdeep.data.samples import count_samples, is_local
from vitdeep.data.storage import open_shard, read_policy
from vitdeep.documents import parse_document, read_document, read_text
from vitdeep.errors import UserError
from vitdeep.monitor import is_main_process

logger = logging.getLogger(__name__)

INFO_NAMES = ("_info.json", "info.json")
SIZES_NAME = "sizes.json"
SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")
#: A split asked for by its usual name also matches the names other writers use.
SPLIT_ALIASES = {"val": ("val", "validation"), "validation": ("validation", "val")}
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class DatasetInfo:
    """A resolved shard list and whatever is known of its contents."""

    urls: tuple[str, ...]
    shard_sizes: tuple[int, ...] | None = None
    num_samples: int | None = None
    class_names: tuple[str, ...] | None = None
    num_classes: int | None = None
    counted_from: str = ""

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    def require_num_samples(self) -> int:
        if self.num_samples is None:
            raise UserError(
                f"cannot tell how many samples the {self.num_shards} shards hold: put an _info.json or "
                "sizes.json beside them, or pass `num_samples`", params=("num_samples",)
            )
        return self.num_samples


def read_dataset_info(
    urls: str | os.PathLike | Sequence[str] | DatasetInfo,
    num_samples: int | None = None,
    split: str | None = None,
) -> DatasetInfo:
    """Resolve a data argument into shard URLs with their sample counts and class names.

    `split` picks the split when a part is a directory; a pattern or URL names its shards itself.
    Every mistake a user can make here (nothing matches, missing shards, an unknown split) is a
    `UserError`, raised before any data is read.
    """
    if isinstance(urls, DatasetInfo):
        return urls
    if num_samples is not None and num_samples <= 0:
        raise UserError(f"`num_samples` must be positive, got {num_samples}", params=("num_samples",))
    parts = _split_parts(urls)
    resolved: list[str] = []
    for part in parts:
        if part.startswith("file:"):
            part = urlparse(part).path
        if part.startswith("pipe:"):
            if is_main_process():
                logger.warning("shard URLs run a shell command: %s", part)
            resolved += _expand(part)
        elif _SCHEME.match(part):
            resolved += _expand(part)
        elif Path(part).is_dir():
            resolved += _directory_shards(Path(part), split)
        else:
            resolved += _local_shards(part)
    if not resolved:
        raise UserError(f"no shards in {_show(urls)}")
    twice = next((url for url, count in Counter(resolved).items() if count > 1), None)
    if twice is not None:
        raise UserError(f"shard {twice} is named more than once in {_show(urls)}")

    beside: dict[str, _Beside] = {}
    sizes: dict[str, int] = {}
    class_names, num_classes, counted_from = None, None, ""
    for url in resolved:
        if url.startswith("pipe:"):
            continue
        local = is_local(url)
        directory = os.path.dirname(url) if local else url.rsplit("/", 1)[0]
        if directory not in beside:
            beside[directory] = _read_beside(directory) if local else _read_remote_beside(directory, num_samples is None)
        known = beside[directory]
        class_names, num_classes = class_names or known.class_names, num_classes or known.num_classes
        name = os.path.basename(url) if local else url.rsplit("/", 1)[1]
        if name in known.sizes:
            sizes[url] = known.sizes[name]
            counted_from = counted_from or known.source
        elif local:
            sizes[url] = count_samples(url)
            counted_from = counted_from or "tar headers"
    shard_sizes = tuple(sizes[url] for url in resolved) if len(sizes) == len(resolved) else None
    total = sum(shard_sizes) if shard_sizes is not None else None
    if num_samples is not None:
        if total is not None and total != num_samples:
            shard_sizes = None
        if len(resolved) == 1:
            shard_sizes = (num_samples,)  # what a failed read of the one shard is counted against
        total, counted_from = num_samples, "--num-samples"
    if class_names is not None:
        num_classes = num_classes or len(class_names)
    return DatasetInfo(tuple(resolved), shard_sizes, total, class_names, num_classes, counted_from)


def _show(urls: str | os.PathLike | Sequence[str]) -> str:
    return repr(os.fspath(urls)) if isinstance(urls, (str, os.PathLike)) else repr([os.fspath(u) for u in urls])


def _split_parts(urls: str | os.PathLike | Sequence[str]) -> list[str]:
    items = [os.fspath(urls)] if isinstance(urls, (str, os.PathLike)) else [os.fspath(u) for u in urls]
    parts = [part.strip() for item in items for part in str(item).split("::")]
    if not parts or not all(parts):
        raise UserError(f"empty shard URL in {_show(urls)}")
    return parts


def _expand(pattern: str) -> list[str]:
    """Brace-expand one part (and `${WDS_*}` variables, as webdataset does)."""
    try:
        return expand_urls(pattern)
    except AssertionError as error:
        raise UserError(f"shard URL {pattern!r} names an unset environment variable ({error})") from None


def _local_shards(pattern: str) -> list[str]:
    found, missing = [], []
    for path in _expand(pattern):
        if _GLOB.search(path):
            found += sorted(glob.glob(path))
        elif os.path.isfile(path):
            found.append(path)
        else:
            missing.append(path)
    if missing:
        if not found:
            raise UserError(f"no shard matches {pattern!r}")
        raise UserError(f"{len(missing)} shards named by {pattern!r} do not exist, e.g. {missing[0]}")
    if not found:
        raise UserError(f"no shard matches {pattern!r}")
    return found


def _directory_shards(directory: Path, split: str | None) -> list[str]:
    """Shards of `split` in a directory: as listed by its `_info.json`, else by file name."""
    info = _load_info(str(directory))
    if "splits" in info:
        entry = info["splits"][_pick_split(directory, split, sorted(info["splits"]))]
        urls = [str(directory / _plain_name(directory, name)) for name in entry["filenames"]]
        missing = [url for url in urls if not os.path.isfile(url)]
        if missing:
            raise UserError(f"{len(missing)} shards listed in {directory}/_info.json do not exist, e.g. {missing[0]}")
        return urls
    shards = sorted(str(p) for p in directory.iterdir() if p.name.endswith(SHARD_SUFFIXES))
    if not shards:
        raise UserError(f"no shards (*.tar) in {directory}")
    if split is None:
        return shards
    named = [s for s in shards if any(_names_split(os.path.basename(s), w) for w in SPLIT_ALIASES.get(split, (split,)))]
    if named:
        return named
    if any(_names_split(os.path.basename(s), w) for s in shards for w in ("train", "val", "validation", "test")):
        raise UserError(f"no {split} shards in {directory}; name the shards explicitly, e.g. {directory}/NAME-*.tar")
    return shards


def _names_split(filename: str, split: str) -> bool:
    return re.search(rf"(^|[-_.]){re.escape(split)}([-_.]|$)", filename) is not None


def _pick_split(directory: Path, split: str | None, available: list[str]) -> str:
    if split is None:
        if len(available) == 1:
            return available[0]
        raise UserError(f"{directory} holds the splits {', '.join(available)}: name one")
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in available:
            return name
    raise UserError(f"{directory} has no {split!r} split (it has {', '.join(available)})")


def _plain_name(directory: Path, filename: str) -> str:
    if os.path.basename(filename) != filename or filename in ("", ".", ".."):
        raise UserError(f"{directory}/_info.json lists {filename!r}, which is not a plain file name")
    return filename


def _load_info(directory: str) -> dict:
    for name in INFO_NAMES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return _checked_info(path, read_text(Path(path), "shard metadata"))
    return {}


@functools.lru_cache(maxsize=64)
def _checked_info(path: str, text: str) -> dict:
    """An `_info.json`, parsed and checked once per content (checking a grid's plans reads the
    same one twice per cell); shared between callers, so read-only."""
    return check_info(parse_document(text, f"shard metadata {path}", as_json=True), path)


@dataclass(frozen=True)
class _Beside:
    sizes: dict
    source: str
    class_names: tuple[str, ...] | None
    num_classes: int | None


def _read_beside(directory: str) -> _Beside:
    """Per-file sample counts from the `_info.json` (all splits) or `sizes.json` next to shards."""
    info = _load_info(directory or ".")
    sizes = _info_sizes(info)
    source = "_info.json" if sizes else ""
    sizes_path = os.path.join(directory, SIZES_NAME)
    if not sizes and os.path.isfile(sizes_path):
        sizes = check_sizes(read_document(Path(sizes_path), "shard metadata"), sizes_path)
        source = SIZES_NAME
    return _beside(info, sizes, source)


def _info_sizes(info: dict) -> dict[str, int]:
    """Shard file name → sample count, from a checked `_info.json` (all splits)."""
    sizes: dict[str, int] = {}
    for entry in info.get("splits", {}).values():
        sizes.update(zip(entry["filenames"], entry.get("shard_lengths", [])))
    return sizes


def _beside(info: dict, sizes: dict[str, int], source: str) -> _Beside:
    names = tuple(info["class_names"]) if info.get("class_names") else None
    return _Beside(sizes, source, names, info.get("num_classes"))


#: Largest remote `_info.json` / `sizes.json` read (ImageNet's is a few KB).
MAX_REMOTE_INFO_BYTES = 16 << 20


def _fetch_json(url: str) -> dict | None:
    """A JSON object read from a remote location under the read policy (`vitdeep.data.storage`);
    None when it is not there, unreadable, too large or not a JSON object. Over HTTP "not there"
    is a 404 and is not retried; a command (gs://) cannot tell "not there" from "failed", so an
    optional file gets one try there rather than the retries a shard gets."""
    policy = read_policy()
    if urlparse(url).scheme not in ("http", "https"):
        policy = dataclasses.replace(policy, read_retries=0)
    try:
        with open_shard(url, policy) as stream:
            raw = stream.read(MAX_REMOTE_INFO_BYTES + 1)
        data = json.loads(raw) if len(raw) <= MAX_REMOTE_INFO_BYTES else None
    except (OSError, ValueError):  # not there, unreachable, or not JSON: the caller says so
        return None
    return data if isinstance(data, dict) else None


def _read_remote_beside(base: str, wanted: bool) -> _Beside:
    """`_info.json` (or `info.json`, `sizes.json`) at a remote shard location such as
    `https://host/imagenet/` or `gs://bucket/imagenet/`."""
    for name in INFO_NAMES:
        info = _fetch_json(f"{base}/{name}")
        if info is not None:
            info = check_info(info, f"{base}/{name}")
            return _beside(info, _info_sizes(info), name)
    counts = _fetch_json(f"{base}/{SIZES_NAME}")
    if counts is not None:
        return _Beside(check_sizes(counts, f"{base}/{SIZES_NAME}"), SIZES_NAME, None, None)
    if wanted and is_main_process():
        logger.warning("no _info.json or sizes.json at %s: sample counts unknown (pass --num-samples, --num-classes)", base)
    return _Beside({}, "", None, None)
