"""Hostile input, generated: tar shards (member names, sizes, types, duplicates, labels) read through
`count_samples`, `shard_samples` + `decode_sample`, the evaluation loader and `vitdeep eval`; and
source trees (links, loops, FIFOs, odd names, non-images with image names) packed by
`vitdeep shards`. The examples hypothesis found, and the issue's probes, are kept below as plain
tests. Examples are derandomized (the same on every run) and no database is kept."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from vitdeep.cli import main
from vitdeep.data.digits import load_digits_arrays
from vitdeep.data.options import IMAGE_EXTENSIONS
from vitdeep.data.pipeline import eval_loader
from vitdeep.data.samples import BadDataLog, BadSample, ReadStats, count_samples, decode_sample, shard_samples

#: Every generated test: the same examples on every run, nothing stored between runs.
GENERATED = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
                     phases=[Phase.explicit, Phase.generate, Phase.shrink])
NUM_CLASSES = 10
#: Read errors of a broken tar are counted per error, not per sample (`vitdeep.data.samples`).
#: What a shard's read costs rather than a sample's decoding: tar-level errors, a shard that failed
#: with nothing said about its size, the samples its size promised and the read did not deliver.
READ_CAUSES = ("unreadable tar data", "unreadable shard", "missing samples")


def _png(index: int) -> bytes:
    """A real digit scan as PNG bytes."""
    images, _ = load_digits_arrays()
    buffer = io.BytesIO()
    Image.fromarray(images[index]).save(buffer, format="PNG")
    return buffer.getvalue()


PNGS = [_png(i) for i in range(4)]

# ---- tar shards --------------------------------------------------------------------------------

KEYS = st.one_of(
    st.sampled_from(["a", "b", "a/b", "x.y", "..", "../up", "/abs", "./a", "a/", "__key__", "x.__key__", "__meta__/x",
                     "ü/ñ", "sp ace", "new\nline", "k" * 300, "d/" * 60 + "deep", ".hidden", "a.b.c"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12),
)
EXTENSIONS = st.sampled_from(["png", "PNG", "cls", "cls", "jpg", "webp", "txt", "__key__", "__url__", "__bad__", ""])
LABELS = st.one_of(
    st.integers(0, NUM_CLASSES - 1).map(lambda n: str(n).encode()),
    st.integers(-10**30, 10**30).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b" ", b" 3\n", b"\xd9\xa3", b"1_0", b"+1", b"0x1", b"1e3", b"nan", b"9" * 5000]),
    st.binary(max_size=8),
)
IMAGES = st.one_of(st.sampled_from(PNGS), st.sampled_from([b"", b"not an image", PNGS[0][:30]]), st.binary(max_size=40))
KINDS = st.sampled_from([tarfile.REGTYPE] * 6 + [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE])


@st.composite
def tar_members(draw) -> tuple[str, bytes, bytes]:
    """(type, name, content) of one member."""
    kind = draw(KINDS)
    ext = draw(EXTENSIONS)
    name = draw(KEYS) + (f".{ext}" if ext else "")
    if kind != tarfile.REGTYPE:
        return kind, name, b""
    if ext.lower() == "cls":
        return kind, name, draw(LABELS)
    return kind, name, draw(IMAGES) if ext.lower() in ("png", "jpg", "webp") else draw(st.binary(max_size=16))


@st.composite
def shards(draw) -> dict:
    """A tar file's members (runs of samples, so that keys repeat side by side) and damage."""
    members = draw(st.lists(tar_members(), max_size=14))
    if draw(st.booleans()):  # well-formed samples among them, some twice over
        for index in range(draw(st.integers(1, 4))):
            label = draw(st.one_of(st.integers(0, NUM_CLASSES - 1).map(lambda n: str(n).encode()), LABELS))
            sample = [(tarfile.REGTYPE, f"s{index}.png", draw(st.sampled_from(PNGS))), (tarfile.REGTYPE, f"s{index}.cls", label)]
            members[draw(st.integers(0, len(members))):0] = sample * draw(st.integers(1, 2))
    return {
        "members": members,
        "format": draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])),
        # None: intact; else the fraction of the bytes kept (0: a zero-byte file)
        "cut": draw(st.one_of(st.none(), st.none(), st.floats(0, 1))),
    }


def _write(path: Path, shard: dict) -> bool:
    """Write the shard; False when the tar format cannot hold a member's name."""
    buffer = io.BytesIO()
    try:
        with tarfile.open(fileobj=buffer, mode="w", format=shard["format"]) as archive:
            for kind, name, data in shard["members"]:
                member = tarfile.TarInfo(name)
                member.type = kind
                member.size = len(data) if kind == tarfile.REGTYPE else 0
                member.linkname = "a.png" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                archive.addfile(member, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    except ValueError:
        return False  # e.g. a 300-character name in a ustar archive
    data = buffer.getvalue()
    path.write_bytes(data if shard["cut"] is None else data[: int(len(data) * shard["cut"])])
    return True


def _read(url: str, num_classes: int | None = NUM_CLASSES) -> tuple[list[int], Counter]:
    """Labels of the good samples and bad ones by cause, as every reader decodes them."""
    stats = ReadStats()
    log = BadDataLog(stats, log_limit=0)
    labels = []
    for sample in shard_samples(url, log):
        try:
            labels.append(decode_sample(sample, num_classes)[1])
        except BadSample as error:
            log.sample(sample, str(error))
    return labels, stats.bad


EXAMPLES = Counter()


@settings(GENERATED, max_examples=300)
@given(shard=shards())
@example(shard={"members": [(tarfile.REGTYPE, n, d) for n, d in [("a.png", PNGS[0]), ("a.cls", b"1"), ("a.png", PNGS[0]),
                                                                  ("a.cls", b"1")]], "format": tarfile.GNU_FORMAT, "cut": None})
@example(shard={"members": [(tarfile.REGTYPE, "a.__key__", b"x"), (tarfile.REGTYPE, "a.png", PNGS[1]),
                            (tarfile.REGTYPE, "a.cls", b"99999999999999999999999")], "format": tarfile.PAX_FORMAT, "cut": None})
def test_tar_members_are_samples_or_counted_bad(shard, tmp_path_factory):
    """Whatever a tar holds, reading it raises nothing: every sample decodes or is one counted bad
    sample, and an intact tar's good + bad samples are exactly what `count_samples` says (a broken
    one's read errors are counted as they occur, and what they cost is never more than counted)."""
    path = tmp_path_factory.mktemp("tar") / "val-000000.tar"
    assume(_write(path, shard))
    EXAMPLES["tar"] += 1
    count = count_samples(str(path))
    labels, bad = _read(str(path))
    assert all(0 <= label < NUM_CLASSES for label in labels)
    samples_bad = sum(n for cause, n in bad.items() if cause not in READ_CAUSES)
    read_errors = sum(bad[cause] for cause in READ_CAUSES)
    if shard["cut"] is None:
        assert read_errors == 0 and len(labels) + samples_bad == count, (count, len(labels), dict(bad))
    else:
        assert len(labels) + samples_bad <= count + read_errors, (count, len(labels), dict(bad))


@settings(GENERATED, max_examples=80)
@given(shard=shards())
def test_the_eval_loader_reads_what_the_reader_reads(shard, tmp_path_factory):
    """The evaluation stream (one reader, in process) decodes the same samples and counts the same
    bad ones as the plain reader, with no class count known (as for shards without _info.json:
    a label of 10**22 once overflowed the batch in a worker); it is told to judge nothing here."""
    folder = tmp_path_factory.mktemp("shards")
    assume(_write(folder / "val-000000.tar", shard))
    EXAMPLES["eval loader"] += 1
    labels, bad = _read(str(folder / "val-000000.tar"), num_classes=None)
    loader = eval_loader(str(folder), micro_batch=4, img_size=16, crop_ratio=1.0, rank=0, world_size=1, num_workers=0,
                         num_classes=None, max_bad_fraction=None, log_bad=False)
    read = [int(label) for _, batch in loader for label in batch]
    samples_bad = Counter({cause: n for cause, n in bad.items() if cause not in READ_CAUSES})
    assert read == labels and Counter({c: n for c, n in loader.stats.bad.items() if c not in READ_CAUSES}) == samples_bad
    if not any(bad[cause] for cause in READ_CAUSES):
        assert loader.stats.bad == bad, "an intact tar costs the loader what it costs the reader"


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """A 2-block ViT as a vitdeep export: the checkpoint `vitdeep eval` reads."""
    from vitdeep.engine.weights import Weights, export_weights
    from vitdeep.models import create_model

    options = dict(depth=2, embed_dim=32, num_heads=2, img_size=16, patch_size=8, num_classes=NUM_CLASSES)
    model = create_model("deit_tiny_12", **options)
    path = tmp_path_factory.mktemp("export") / "tiny.safetensors"
    export_weights(Weights(model.state_dict(), "test", "test", "deit_tiny_12", options), path)
    return path


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`vitdeep ARGV` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as done:
            return done.code or 0, err.getvalue()
    return 0, err.getvalue()


def assert_refusal_or_success(code: int, err: str) -> None:
    """Exit 0, or 2 with one line under 1 KB on stderr; never a traceback."""
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and len(lines[0]) < 1024, err


@settings(GENERATED, max_examples=20)
@given(shard=shards())
@example(shard={"members": [], "format": tarfile.GNU_FORMAT, "cut": None})
@example(shard={"members": [], "format": tarfile.GNU_FORMAT, "cut": 0.0})
def test_vitdeep_eval_on_foreign_shards_succeeds_or_refuses_in_one_line(shard, tiny_export, tmp_path_factory):
    """`vitdeep eval` on any tar: exit 0 with eval.json, or exit 2 with one line and nothing written."""
    folder = tmp_path_factory.mktemp("eval")
    (folder / "shards").mkdir()
    assume(_write(folder / "shards" / "val-000000.tar", shard))
    EXAMPLES["vitdeep eval"] += 1
    out = folder / "eval.json"
    code, err = run_cli(["eval", "--checkpoint", str(tiny_export), "--data", str(folder / "shards"), "--out", str(out),
                         "--workers", "0", "--max-bad-fraction", "1"])
    assert_refusal_or_success(code, err)
    EXAMPLES[f"vitdeep eval, exit {code}"] += 1
    assert out.exists() == (code == 0)
    if code == 0:
        result = json.loads(out.read_text())
        assert result["count"] > 0 and result["read"] == result["count"] + sum(result["bad"].values())


# ---- source trees for `vitdeep shards` ---------------------------------------------------------

CLASSES = ("cat", "dog", "c.1")
FILE_NAMES = st.one_of(
    st.sampled_from(["0.png", "x.PNG", "a.b.jpg", ".hidden.png", "sp ace.png", "new\nline.png", "ü.webp", "-dash.png",
                     "y" * 200 + ".png", "notes.txt", "noext"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), min_size=1, max_size=10)
    .map(lambda s: s + ".png").filter(lambda s: s not in (".png",) and len(s.encode()) < 250),
)
#: What an entry of a class folder is: a real image (its content says which), a non-image with an
#: image's name, an empty file, a FIFO, a broken link, or a folder link (to where, below); or a
#: class folder beside it that is a link.
ENTRIES = st.sampled_from(["image", "image", "image", "text", "empty", "fifo", "broken", "link", "class link"])
LINK_TARGETS = st.sampled_from(["..", "../..", "../../..", ".", "../dog", "../cat/sub", "sub", "/outside", "../loop"])


@st.composite
def source_trees(draw) -> list[tuple]:
    """Entries (class, sub-folder or '', entry kind, file name, link target)."""
    return draw(st.lists(st.tuples(st.sampled_from(CLASSES), st.sampled_from(["", "sub", "sub/deeper"]), ENTRIES,
                                   FILE_NAMES, LINK_TARGETS), max_size=12))


def _digit_png(identity: int) -> bytes:
    """A real digit scan whose first pixel row says which file it is."""
    images, _ = load_digits_arrays()
    image = images[identity % len(images)].copy()
    image[0, :2] = identity // 256, identity % 256
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _identity(png: bytes) -> int:
    row = np.asarray(Image.open(io.BytesIO(png)))[0]
    return int(row[0]) * 256 + int(row[1])


def _build(root: Path, entries: list[tuple]) -> tuple[dict[int, set[str]], set[int]]:
    """The tree under root/SRC (and an image in root/outside, linked into); returns each image's
    identity → the classes it may be labelled with, and the images that must be packed (those
    with an image's name inside a class folder)."""
    src, outside = root / "SRC" / "train", root / "outside"
    outside.mkdir()
    allowed: dict[int, set[str]] = {}
    required: set[int] = set()
    (outside / "o.png").write_bytes(_digit_png(9999))
    for index, (label, sub, kind, name, target) in enumerate(entries):
        folder = src / label / sub
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if os.path.lexists(path):
            continue
        if kind == "image":
            path.write_bytes(_digit_png(index))
            allowed[index] = {label}
            if path.suffix.lower().removeprefix(".") in IMAGE_EXTENSIONS:
                required.add(index)
        elif kind == "text":
            path.write_text("not an image\n")
        elif kind == "empty":
            path.touch()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "broken":
            path.symlink_to("nowhere.png")
        else:
            link = src / f"{label}{index}" if kind == "class link" else folder / f"link{index}"
            if not os.path.lexists(link):
                link.symlink_to(outside if target == "/outside" else target)
                if target == "/outside":
                    allowed.setdefault(9999, set()).add(link.name if kind == "class link" else label)
    return allowed, required


@settings(GENERATED, max_examples=100)
@given(entries=source_trees())
@example(entries=[("cat", "", "image", "0.png", ""), ("cat", "", "link", "", ".."), ("dog", "", "image", "1.png", "")])
@example(entries=[("cat", "", "fifo", "x.jpg", ""), ("cat", "", "broken", "b.png", ""), ("cat", "", "text", "t.png", ""),
                  ("dog", "", "image", "0.png", "")])
@example(entries=[("cat", "", "image", "0.png", ""), ("dog", "", "link", "", "/outside"), ("dog", "", "link", "", "/outside")])
@example(entries=[("cat", "", "image", "a.b.jpg", "")])
def test_shards_of_a_hostile_source_tree(entries, tmp_path_factory):
    """`vitdeep shards` on any source tree: exit 0 with every image once under its own class (a
    linked outside folder under one of the classes linking it), or exit 2 with one short line
    and no OUT; never a traceback, a hang or a wrong label."""
    root = tmp_path_factory.mktemp("tree")
    allowed, required = _build(root, entries)
    EXAMPLES["source tree"] += 1
    out = root / "OUT"
    code, err = run_cli(["shards", str(root / "SRC"), str(out), "--workers", "2"])
    assert_refusal_or_success(code, err)
    EXAMPLES[f"source tree, exit {code}"] += 1
    if code == 2:
        assert not out.exists(), err
        return
    info = json.loads((out / "_info.json").read_text())
    classes = info["class_names"]
    seen = Counter()
    for name in info["splits"]["train"]["filenames"]:
        stats = ReadStats()
        for sample in shard_samples(str(out / name), BadDataLog(stats)):
            identity = _identity(next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample))
            assert classes[int(sample["cls"])] in allowed[identity], (identity, sample["__key__"])
            seen[identity] += 1
        assert not stats.bad
    assert set(seen) <= set(allowed) and all(n == 1 for n in seen.values()), seen
    assert required <= set(seen), "an image inside a class folder was left out"


# ---- the probes of `vitdeep shards`, kept as they were found ---------------------------


@pytest.fixture()
def twelve(tmp_path) -> Path:
    """SRC/train/{cat,dog}/ with six real digit scans each."""
    for index in range(12):
        folder = tmp_path / "SRC" / "train" / ("cat" if index < 6 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}.png").write_bytes(_digit_png(index))
    return tmp_path / "SRC"


def test_the_shard_writer_passes_over_what_is_no_image_and_says_why(twelve, tmp_path):
    """A broken link was a traceback (and left an empty OUT); `ln -s .. cat/loop` made 492 samples
    with wrong labels of 12 images; a FIFO named x.jpg hung; a text file named .png was packed."""
    cat = twelve / "train" / "cat"
    (cat / "broken.png").symlink_to("nowhere.png")
    (cat / "loop").symlink_to("..")
    os.mkfifo(cat / "x.jpg")
    (cat / "text.png").write_text("hello\n")
    skipped = {}
    from vitdeep.data.shards import write_shards

    info = write_shards(twelve, tmp_path / "OUT", on_split=lambda entry, why, seconds: skipped.update(why))
    assert info["splits"]["train"]["num_samples"] == 12
    assert skipped == {"broken link": 1, "not a regular file": 1, "not an image (no JPEG, PNG or WebP header)": 1,
                       "folder link to a folder listed elsewhere or to another class": 1}
    stats = ReadStats()
    labels = {_identity(s["png"]): int(s["cls"]) for s in shard_samples(str(tmp_path / "OUT" / "train-000000.tar"), BadDataLog(stats))}
    assert labels == {index: 0 if index < 6 else 1 for index in range(12)}


@pytest.mark.parametrize("args, needle", [
    (["--split", "../../escape"], "--split '../../escape' is not a folder name"),
    (["--split", "a/b"], "--split 'a/b' is not a folder name"),
])
def test_split_names_are_folder_names(twelve, tmp_path, args, needle):
    out = tmp_path / "OUT"
    code, err = run_cli(["shards", str(twelve), str(out), *args])
    assert_refusal_or_success(code, err)
    assert code == 2 and needle in err and not out.exists()


def test_out_is_never_in_src_and_a_foreign_info_file_is_kept(twelve, tmp_path):
    code, err = run_cli(["shards", str(twelve), str(twelve / "train" / "shards")])
    assert code == 2 and "lies inside the input folder" in err and not (twelve / "train" / "shards").exists()
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "_info.json").write_text('{"name": "another tool\'s"}')
    code, err = run_cli(["shards", str(twelve), str(out)])
    assert code == 2 and "was not written by `vitdeep shards`: pass --overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["_info.json"]
    assert run_cli(["shards", str(twelve), str(out), "--overwrite"])[0] == 0
    assert json.loads((out / "_info.json").read_text())["splits"]["train"]["num_samples"] == 12


def test_zz_report_generated_examples():
    """How many generated examples the tests above ran (shown with -s)."""
    print(f"generated examples run: {dict(EXAMPLES)}")
