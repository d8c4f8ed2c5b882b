"""The shape of the metadata files beside shards, checked once as a whole: `_info.json` (timm's
layout, which `vitdeep shards` writes) and open_clip's `sizes.json`.

Whoever wrote the file, the reader then only meets what it expects: a mapping of split names to
`filenames` (plain strings) with `shard_lengths` (whole numbers, one per file), a class count of at
least one, class names that are strings and agree with it. Anything else is one line naming the
file and the field (`…/_info.json: splits.train.shard_lengths[1] must be a whole number >= 0, got
-500`), instead of a traceback or a negative sample count reported as if true.
"""

from __future__ import annotations

from typing import Any

from vitdeep.errors import UserError
from vitdeep.fields import MAX_CLASSES, MAX_SAMPLES, Range, check_number, clip, shown

#: Shards one split may list, and the longest file name.
MAX_SHARDS, MAX_NAME = 10**7, 1024
COUNT = Range(0, limit=MAX_SAMPLES, integer=True)
CLASSES = Range(1, limit=MAX_CLASSES, integer=True)


def check_info(doc: Any, where: str) -> dict[str, Any]:
    """`doc` (an `_info.json`'s content) when it has the shape above; `where` names the file."""
    if not isinstance(doc, dict):
        raise UserError(f"{where} must hold a JSON object (with splits, num_classes, class_names), got {_kind(doc)}")
    splits = doc.get("splits", {})
    if not isinstance(splits, dict):
        raise UserError(f"{where}: splits must map split names to {{filenames, shard_lengths}}, got {_kind(splits)}")
    for split, entry in splits.items():
        _check_split(entry, f"splits.{clip(split, 40)}", where)
    if doc.get("num_classes") is not None:
        check_number("num_classes", doc["num_classes"], CLASSES, where, flag=False)
    names = doc.get("class_names")
    if names is not None:
        _strings(names, "class_names", where, limit=MAX_CLASSES)
        if doc.get("num_classes") is not None and names and len(names) != doc["num_classes"]:
            raise UserError(f"{where}: class_names lists {len(names):,} names but num_classes is {doc['num_classes']:,}")
    return doc


def _check_split(entry: Any, field: str, where: str) -> None:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: {field} must be an object with filenames and shard_lengths, got {_kind(entry)}")
    if "filenames" not in entry:
        raise UserError(f"{where}: {field} has no filenames (the list of its shards)")
    filenames = _strings(entry["filenames"], f"{field}.filenames", where, limit=MAX_SHARDS)
    lengths = entry.get("shard_lengths")
    if lengths is not None:
        if not isinstance(lengths, list):
            raise UserError(f"{where}: {field}.shard_lengths must be a list of sample counts, got {_kind(lengths)}")
        if len(lengths) != len(filenames):
            raise UserError(f"{where}: {field} lists {len(filenames):,} filenames but {len(lengths):,} shard_lengths")
        for index, length in enumerate(lengths):
            check_number(f"{field}.shard_lengths[{index}]", length, COUNT, where, flag=False)
        check_number(f"{field} (the sum of its shard_lengths)", sum(lengths), COUNT, where, flag=False)
    if entry.get("num_samples") is not None:
        check_number(f"{field}.num_samples", entry["num_samples"], COUNT, where, flag=False)


def _strings(value: Any, field: str, where: str, limit: int) -> list[str]:
    if not isinstance(value, list):
        raise UserError(f"{where}: {field} must be a list of strings, got {_kind(value)}")
    if len(value) > limit:
        raise UserError(f"{where}: {field} lists {len(value):,} entries, more than {limit:,}")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item or len(item) > MAX_NAME:
            raise UserError(f"{where}: {field}[{index}] must be a non-empty string, got {shown(item)}")
    return value


def check_sizes(doc: Any, where: str) -> dict[str, int]:
    """`doc` (a `sizes.json`'s content: shard file name → sample count) when it has that shape."""
    if not isinstance(doc, dict):
        raise UserError(f"{where} must hold a JSON object of shard name → sample count, got {_kind(doc)}")
    for name, size in doc.items():
        check_number(f"the count of {clip(name, 60)}", size, COUNT, where, flag=False)
    return doc


def _kind(value: Any) -> str:
    """What a value is, for a message: `a list`, `a string ('10')`."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    kind = kinds.get(type(value), type(value).__name__ if value is not None else "null")
    return kind if isinstance(value, (dict, list)) or value is None else f"{kind} ({shown(value)})"
