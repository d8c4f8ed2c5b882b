"""Generated `_info.json` and `sizes.json` documents beside valid shards (issue 25): whatever a
metadata file holds, reading the shards ends in their counts (never negative) or in one line that
names the file, and a dry run of training on them exits 0 or 2.

Examples per test (`max_examples`): 200 mutated `_info.json`, 100 of any JSON, 60 `sizes.json`,
15 dry runs; about 15 s with the plain tests.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hostile import ANY_NUMBER, SETTINGS, check_outcome, note, run_cli
from vitdeep.data.info import read_dataset_info
from vitdeep.errors import UserError

JSON_SCALARS = st.one_of(ANY_NUMBER, st.text(max_size=20), st.booleans(), st.none())
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
                           max_leaves=15)
#: Where a mutation lands: a path of keys / indices into the document ("*" = a split).
_GIST = re.compile(r"\S*/\S*|\d+")
PLACES = [(), ("name",), ("num_classes",), ("class_names",), ("class_names", 0), ("splits",), ("splits", "*"),
          ("splits", "*", "filenames"), ("splits", "*", "filenames", 0), ("splits", "*", "shard_lengths"),
          ("splits", "*", "shard_lengths", 0), ("splits", "*", "shard_lengths", 1), ("splits", "*", "num_samples"),
          ("splits", "extra")]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, digit_shards) -> Path:
    """The digits' shards (links), whose `_info.json` each example replaces."""
    folder = tmp_path_factory.mktemp("info-shards")
    for shard in digit_shards.glob("*.tar"):
        (folder / shard.name).symlink_to(shard)
    return folder


@pytest.fixture(scope="module")
def good_info(digit_shards) -> dict:
    return json.loads((digit_shards / "_info.json").read_text())


def _mutated(doc: dict, place: tuple, value, split: str) -> object:
    if not place:
        return value
    doc = copy.deepcopy(doc)
    target = doc
    path = [split if part == "*" else part for part in place]
    for part in path[:-1]:
        try:
            target = target[part]
        except (KeyError, IndexError, TypeError):
            return doc
    last = path[-1]
    if isinstance(target, dict) or (isinstance(target, list) and isinstance(last, int) and last < len(target)):
        target[last] = value
    return doc


def _read(folder: Path, split: str):
    """read_dataset_info's result, or its refusal's message, with the property checked."""
    try:
        info = read_dataset_info(str(folder), split=split)
    except UserError as error:
        message = str(error)
        assert "\n" not in message and len(message.encode()) < 1024, message[:300]
        note("refused: " + " ".join(_GIST.sub("#", message).split()[:4]))
        return message
    note("read")
    assert info.num_samples is None or info.num_samples >= 0
    assert info.shard_sizes is None or all(size >= 0 for size in info.shard_sizes)
    assert info.num_classes is None or info.num_classes >= 1
    return info


@settings(max_examples=200, **SETTINGS)
@given(place=st.sampled_from(PLACES), value=JSON_VALUES, split=st.sampled_from(["train", "val"]))
@example(place=(), value=[1, 2], split="train")
@example(place=(), value="x", split="train")
@example(place=("splits", "*"), value={"name": "train"}, split="train")
@example(place=("splits", "*", "filenames"), value=[None], split="train")
@example(place=("splits", "*", "shard_lengths"), value=["x"] * 30, split="train")
@example(place=("num_classes",), value="10", split="train")
@example(place=("num_classes",), value=-3, split="train")
@example(place=("class_names",), value=5, split="train")
@example(place=("splits",), value=[1, 2], split="train")
@example(place=("num_classes",), value=math.nan, split="val")
def test_any_info_json_gives_counts_or_one_line_naming_it(place, value, split, shard_dir, good_info):
    doc = _mutated(good_info, place, value, split)
    (shard_dir / "_info.json").write_text(json.dumps(doc))
    result = _read(shard_dir, split)
    needle = _refusal(place, value, doc)
    if needle is not None:
        assert isinstance(result, str) and "_info.json" in result and needle in result, (needle, result)


def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _refusal(place: tuple, value, doc) -> str | None:
    """What a refusal of this mutation must name, where the document is surely malformed."""
    if not isinstance(doc, dict):
        return "must hold a JSON object"
    if place == ("num_classes",) and value is not None and not _whole(value, 1):
        return "num_classes"
    if place == ("class_names",) and value is not None and not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        return "class_names"
    if place[-2:] in (("shard_lengths", 0), ("shard_lengths", 1)) and not _whole(value, 0):
        return "shard_lengths"
    if place[-2:] == ("filenames", 0) and not (isinstance(value, str) and value):
        return "filenames"
    return None


def test_negative_shard_lengths_are_refused(shard_dir, good_info):
    """Issue 25: [-1000, -500] read as "train samples -1,500, steps per epoch -47"."""
    doc = copy.deepcopy(good_info)
    doc["splits"]["train"] = {"filenames": doc["splits"]["train"]["filenames"][:2], "shard_lengths": [-1000, -500]}
    (shard_dir / "_info.json").write_text(json.dumps(doc))
    assert _read(shard_dir, "train").endswith("_info.json: splits.train.shard_lengths[0] must be >= 0, got -1000")


@settings(max_examples=100, **SETTINGS)
@given(doc=JSON_VALUES)
def test_any_json_as_info_json(doc, shard_dir):
    (shard_dir / "_info.json").write_text(json.dumps(doc))
    _read(shard_dir, "train")


@settings(max_examples=60, **SETTINGS)
@given(counts=st.one_of(JSON_VALUES, st.dictionaries(st.sampled_from([f"train-{i:06d}.tar" for i in range(3)]), ANY_NUMBER, max_size=3)))
@example(counts={"train-000000.tar": -5})
@example(counts={"train-000000.tar": "12"})
@example(counts={"\n": math.nan})  # found: a file name with a newline made the message two lines
def test_any_sizes_json(counts, digit_shards, tmp_path):
    """open_clip's sizes.json beside shards without an _info.json."""
    folder = tmp_path / f"s{time.monotonic_ns()}"
    folder.mkdir()
    for index in range(3):
        (folder / f"train-{index:06d}.tar").symlink_to(digit_shards / f"train-{index:06d}.tar")
    (folder / "sizes.json").write_text(json.dumps(counts))
    _read(folder, "train")


@settings(max_examples=15, **SETTINGS)
@given(place=st.sampled_from(PLACES[1:]), value=JSON_VALUES)
@example(place=("splits", "*", "shard_lengths", 0), value=10**30)
def test_dry_run_on_shards_with_a_mutated_info_json(place, value, shard_dir, good_info, tmp_path):
    (shard_dir / "_info.json").write_text(json.dumps(_mutated(good_info, place, value, "train")))
    out = tmp_path / f"out-{time.monotonic_ns()}"
    check_outcome(run_cli(["train", "--data", str(shard_dir), "--out", str(out), "--model", "deit_tiny_12", "--depth", "2",
                           "--embed-dim", "64", "--num-heads", "2", "--img-size", "32", "--patch-size", "8", "--global-batch",
                           "32", "--micro-batch", "16", "--ds-config", "cpu_fp32", "--steps", "2", "--dry-run"]))
    assert not out.exists()
