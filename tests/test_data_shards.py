"""Shard writer and shard-list resolution: byte-identical round trip, URL forms, sizes, CLI errors."""

import functools
import io
import json
import os
import shutil
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.datasets import ImageFolder

from vitdeep.cli import main
from vitdeep.data.info import read_dataset_info
from vitdeep.data.pipeline import eval_loader, train_loader
from vitdeep.data.samples import BadDataLog, ReadStats, count_samples, shard_samples
from vitdeep.data.shards import parse_shard_size, write_shards
from vitdeep.data.transforms import AugmentConfig, eval_transform
from vitdeep.errors import UserError


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Real photos (scikit-learn's two samples) cut into 24 images of ImageNet-like sizes, saved as
    JPEG (RGB, grayscale, CMYK, upper-case suffix), PNG (RGBA) and WEBP; awkward names included."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    for index in range(24):
        photo = photos[index % 2]
        h, w = rng.integers(160, 420), rng.integers(160, 620)
        y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        image = Image.fromarray(photo[y : y + h, x : x + w])
        split = "val" if index % 4 == 3 else "train"
        folder = root / split / ("dog.b" if index % 3 else "cat_a")
        folder.mkdir(parents=True, exist_ok=True)
        kind = index % 6
        if kind == 0:
            image.save(folder / f"img.v{index}.JPEG", quality=90)
        elif kind == 1:
            image.convert("L").save(folder / f"{index}.jpg", quality=85)
        elif kind == 2:
            image.convert("CMYK").save(folder / f"{index}.jpeg", quality=90)
        elif kind == 3:
            image.convert("RGBA").save(folder / f"{index}.png")
        elif kind == 4:
            image.save(folder / f"{index}.webp", quality=80)
        else:
            image.save(folder / f"{index}.jpg", quality=95)
    (root / "train" / "cat_a" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def digit_shards(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("digit-shards")
    write_shards(digits_dir, out, shard_size="100")
    return out


def _raw_samples(urls) -> dict:
    stats = ReadStats()
    samples = {}
    for url in urls:
        for sample in shard_samples(url, BadDataLog(stats)):
            assert sample["__key__"] not in samples
            samples[sample["__key__"]] = sample
    assert stats.bad_samples == 0
    return samples


def test_round_trip_keeps_bytes_and_labels(photo_dir, tmp_path):
    info = write_shards(photo_dir, tmp_path, shard_size="5", seed=3)
    assert info["class_names"] == ["cat_a", "dog.b"] == ImageFolder(photo_dir / "train").classes
    for split in ("train", "val"):
        folder = ImageFolder(photo_dir / split)
        samples = _raw_samples(read_dataset_info(str(tmp_path), split=split).urls)
        assert len(samples) == len(folder.samples) == info["splits"][split]["num_samples"]
        for path, label in folder.samples:
            relative = Path(path).relative_to(photo_dir / split)
            sample = samples[relative.with_suffix("").as_posix().replace(".", "_")]
            ext = relative.suffix.lower().lstrip(".")
            assert sample[ext] == Path(path).read_bytes()
            assert int(sample["cls"]) == label
    order = [s for s in _raw_samples(read_dataset_info(str(tmp_path), split="train").urls)]
    assert order != sorted(order), "the file list is shuffled once before writing"
    assert info["splits"]["train"]["shard_lengths"] == [5, 5, 5, 3]


def test_round_trip_through_the_eval_loader_decodes_like_the_source(photo_dir, tmp_path):
    write_shards(photo_dir, tmp_path, shard_size="2")
    loader = eval_loader(tmp_path, micro_batch=4, img_size=64, crop_ratio=0.875, rank=0, world_size=1,
                         num_workers=2, split="train", with_keys=True)
    transform = eval_transform(64, 0.875)
    folder = ImageFolder(photo_dir / "train")
    expected = {Path(p).relative_to(photo_dir / "train").with_suffix("").as_posix().replace(".", "_"): (p, y)
                for p, y in folder.samples}
    seen = 0
    for images, labels, keys in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
        for image, label, key in zip(images, labels, keys):
            path, target = expected[key]
            assert label == target
            assert torch.equal(image, transform(Image.open(path).convert("RGB")))
            seen += 1
    assert seen == len(expected) == loader.samples_total and loader.bad_samples == 0


def test_max_size_caps_the_shorter_side_and_keeps_smaller_images_as_they_came(photo_dir, tmp_path):
    info = write_shards(photo_dir, tmp_path, shard_size="5", max_size=200, quality=80)
    entry = json.loads((tmp_path / "_info.json").read_text())["splits"]["train"]
    assert entry["max_size"] == 200 and entry["quality"] == 80 and entry == info["splits"]["train"]
    samples = _raw_samples(read_dataset_info(str(tmp_path), split="train").urls)
    capped = 0
    for path, label in ImageFolder(photo_dir / "train").samples:
        relative = Path(path).relative_to(photo_dir / "train")
        sample = samples[relative.with_suffix("").as_posix().replace(".", "_")]
        width, height = Image.open(path).size
        if min(width, height) <= 200:
            assert sample[relative.suffix.lower().lstrip(".")] == Path(path).read_bytes()
            continue
        capped += 1
        stored = Image.open(io.BytesIO(sample["jpg"]))
        assert stored.format == "JPEG" and stored.mode == "RGB" and min(stored.size) == 200
        assert abs(stored.size[0] / stored.size[1] - width / height) < 0.01 * width / height
        assert int(sample["cls"]) == label
    assert 0 < capped == entry["capped_images"] < entry["num_samples"]
    loader = eval_loader(tmp_path, micro_batch=4, img_size=64, crop_ratio=0.875, rank=0, world_size=1, num_workers=0, split="train")
    assert sum(len(labels) for _, labels in loader) == entry["num_samples"] and loader.bad_samples == 0


def test_shards_without_a_cap_record_none(digit_shards):
    entry = json.loads((digit_shards / "_info.json").read_text())["splits"]["train"]
    assert "max_size" not in entry and "quality" not in entry


def test_shard_size_in_bytes(photo_dir, tmp_path):
    info = write_shards(photo_dir, tmp_path, splits=["train"], shard_size="60KB")
    sizes = [os.path.getsize(tmp_path / name) for name in info["splits"]["train"]["filenames"]]
    assert len(sizes) > 2 and sum(info["splits"]["train"]["shard_lengths"]) == 18
    largest_image = max(p.stat().st_size for p in (photo_dir / "train").rglob("*.*"))
    assert max(sizes) <= 60_000 + largest_image + 10_240


@pytest.mark.parametrize("text, expected", [("1000", (1000, float("inf"))), ("256MB", (10**12, 256e6)), ("1GiB", (10**12, 2**30))])
def test_parse_shard_size(text, expected):
    assert parse_shard_size(text) == expected


@pytest.mark.parametrize("text", ["0", "12XB", "1.5", "-3", "many"])
def test_parse_shard_size_rejects(text):
    with pytest.raises(UserError, match="shard_size"):
        parse_shard_size(text)


def _spec_forms(out: Path) -> dict:
    return {
        "directory": str(out),
        "braces": f"{out}/train-{{000000..000014}}.tar",
        "glob": f"{out}/train-*.tar",
        "joined": f"{out}/train-{{000000..000006}}.tar::{out}/train-{{000007..000014}}.tar",
        "list": [str(out / f"train-{i:06d}.tar") for i in range(15)],
        "pipe": f"pipe:cat {out}/train-{{000000..000014}}.tar",
        "file": f"file://{out}/train-{{000000..000014}}.tar",
    }


@pytest.mark.parametrize("form", ["directory", "braces", "glob", "joined", "list", "pipe", "file"])
def test_url_forms_resolve_to_the_same_shards(digit_shards, form, caplog):
    info = read_dataset_info(_spec_forms(digit_shards)[form], split="train")
    assert len(info.urls) == 15
    if form == "pipe":
        assert info.num_samples is None and info.shard_sizes is None and info.num_classes is None
        assert "shard URLs run a shell command: pipe:cat" in caplog.text  # a warning, never a print
        assert len(_raw_samples(info.urls[:2])) == 200
    else:
        assert info.num_samples == 1500 and info.shard_sizes == (100,) * 15 and info.counted_from == "_info.json"
        assert info.class_names == tuple("0123456789") and info.num_classes == 10


def test_counts_without_info_file(digit_shards, tmp_path):
    for path in digit_shards.glob("train-*.tar"):
        shutil.copy(path, tmp_path / path.name)
    scanned = read_dataset_info(str(tmp_path))
    assert scanned.num_samples == 1500 and scanned.counted_from == "tar headers" and scanned.num_classes is None
    (tmp_path / "sizes.json").write_text(json.dumps({p.name: 100 for p in tmp_path.glob("*.tar")}))
    assert read_dataset_info(f"{tmp_path}/train-*.tar").counted_from == "sizes.json"
    explicit = read_dataset_info(f"{tmp_path}/train-*.tar", num_samples=1200)
    assert explicit.num_samples == 1200 and explicit.shard_sizes is None


def test_public_imagenet_style_names_and_validation_split(digit_shards, tmp_path):
    """Shards named like the public ImageNet WebDataset ones (`imagenet1k-validation-00.tar`)."""
    for index, path in enumerate(sorted(digit_shards.glob("val-*.tar"))):
        shutil.copy(path, tmp_path / f"imagenet1k-validation-{index:02d}.tar")
    shutil.copy(digit_shards / "train-000000.tar", tmp_path / "imagenet1k-train-0000.tar")
    info = read_dataset_info(str(tmp_path), split="val")
    assert len(info.urls) == 3 and info.num_samples == 297


def test_remote_shards_need_a_sample_count(tmp_path):
    """A server that has the shards but no _info.json / sizes.json (every metadata read answers
    404, which is final, not retried): the count must come from `num_samples`."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with pytest.raises(UserError, match="num_samples"):
                train_loader(f"http://127.0.0.1:{server.server_port}/train-{{0000..0009}}.tar", micro_batch=2, img_size=8,
                             rank=0, world_size=1, seed=0, epoch=0, num_workers=0, aug=AugmentConfig())
        finally:
            server.shutdown()


def test_bad_shard_specs(digit_shards, tmp_path):
    with pytest.raises(UserError, match="no shard matches"):
        read_dataset_info(f"{tmp_path}/nothing-*.tar")
    with pytest.raises(UserError, match="2 shards named by .* do not exist"):
        read_dataset_info(f"{digit_shards}/train-{{000013..000016}}.tar")
    with pytest.raises(UserError, match="no shards"):
        read_dataset_info(str(tmp_path))
    with pytest.raises(UserError, match="no 'test' split"):
        read_dataset_info(str(digit_shards), split="test")
    with pytest.raises(UserError, match="holds the splits train, val"):
        read_dataset_info(str(digit_shards))
    with pytest.raises(UserError, match="named more than once"):
        read_dataset_info(f"{digit_shards}/train-000000.tar::{digit_shards}/train-00000{{0..1}}.tar")
    with pytest.raises(UserError, match="empty shard URL"):
        read_dataset_info(f"{digit_shards}/train-000000.tar::")
    (tmp_path / "_info.json").write_text(json.dumps({"splits": {"train": {"filenames": ["../x.tar"]}}}))
    with pytest.raises(UserError, match="not a plain file name"):
        read_dataset_info(str(tmp_path), split="train")


def test_count_samples_matches_the_reader(digit_shards, tmp_path):
    shard = digit_shards / "train-000000.tar"
    assert count_samples(str(shard)) == 100 == count_samples(f"pipe:cat {shard}")
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert count_samples(str(truncated)) == len(list(shard_samples(str(truncated), BadDataLog(ReadStats()))))


def test_cli_demo_writes_digits_shards(tmp_path, capsys):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "--demo", str(out)])
    assert exit_info.value.code == 0
    info = json.loads((out / "_info.json").read_text())
    assert {s: info["splits"][s]["num_samples"] for s in info["splits"]} == {"train": 1500, "val": 297}
    assert len(list(out.glob("train-*.tar"))) == 30 and len(list(out.glob("val-*.tar"))) == 6
    assert "Shards written" in capsys.readouterr().out
    with tarfile.open(out / "val-000000.tar") as archive:
        first = archive.getmembers()[:2]
    assert [m.name.split(".")[-1] for m in first] == ["cls", "png"]


def test_cli_writes_one_split_and_refuses_to_clobber(digits_dir, tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["shards", str(digits_dir), str(out), "--split", "val", "--shard-size", "100", "--workers", "2"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0 and len(list(out.glob("val-*.tar"))) == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:-4], "--shard-size", "200", "--overwrite"])
    assert exit_info.value.code == 0 and len(list(out.glob("val-*.tar"))) == 2


@pytest.mark.parametrize(
    "args, needle",
    [
        (["shards", "{missing}", "{out}"], "does not exist"),
        (["shards", "{src}", "{out}", "--shard-size", "12XB"], "--shard-size"),
        (["shards", "{src}", "{out}", "--split", "test"], "no split folder 'test'"),
        (["shards", "--demo"], "exactly one folder"),
        (["shards", "{src}"], "give SRC and OUT"),
        (["shards", "{src}", "{out}", "--quality", "80"], "give --max-size too"),
        (["shards", "{src}", "{out}", "--max-size", "8"], "--max-size"),
        (["shards", "{src}", "{out}", "--max-size", "256", "--quality", "101"], "--quality"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(digits_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    args = [a.format(missing=tmp_path / "missing", out=out, src=digits_dir) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
