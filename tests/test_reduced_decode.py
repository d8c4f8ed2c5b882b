"""Reduced JPEG decoding (`vitdeep.data.reduced_decode`): the crop box is the one full decoding
draws from the same seed, its pixels match up to the DCT scaling, and on large JPEGs it is faster
than decoding in full (a ratio measured in this process, not a wall-clock limit)."""

from __future__ import annotations

import io
import random
import time

import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from vitdeep.data.options import AugmentConfig
from vitdeep.data.reduced_decode import decode, draw_box, reduction
from vitdeep.data.samples import BadSample, decode_sample, open_lazy
from vitdeep.data.streams import reseed
from vitdeep.data.transforms import eval_transform, train_transform


def _jpeg(width: int, height: int, quality: int = 90) -> bytes:
    photo = Image.fromarray(load_sample_images().images[0]).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return _jpeg(2000, 1500)


def _full(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_reduction_needs_a_region_twice_the_output():
    assert reduction((447, 500), (224, 224)) == 1
    assert reduction((448, 448), (224, 224)) == 2
    assert reduction((900, 2000), (224, 224)) == 4
    assert reduction((5000, 5000), (224, 224)) == 8


def test_the_box_is_drawn_from_the_header_as_full_decoding_draws_it(large_jpeg):
    crop = train_transform(AugmentConfig(), 224).transforms[0].crop
    lazy = open_lazy(large_jpeg)
    for seed in range(50):
        reseed(seed)
        expected = crop.get_params(_full(large_jpeg), crop.scale, crop.ratio)
        after_full = random.random()
        reseed(seed)
        assert draw_box(crop, lazy)[0] == expected
        assert random.random() == after_full  # the draws after the crop are unchanged
    assert getattr(lazy, "_im", None) is None  # drawing read the header only


@pytest.mark.parametrize("k", [2, 4, 8])
def test_a_reduced_decode_covers_the_whole_image_up_to_the_scale_rounding(large_jpeg, k):
    decoded, scale = decode(open_lazy(large_jpeg), k)
    assert scale == k and decoded.mode == "RGB"
    assert all(0 <= side * scale - full < scale for side, full in zip(decoded.size, (2000, 1500)))


def test_reduced_crops_match_full_crops(large_jpeg):
    """Same seed: the same view up to the DCT scaling (a mean difference of a few levels of 255);
    another seed's view differs by far more."""
    full, reduced = train_transform(AugmentConfig(reduced_decode=False), 224), train_transform(AugmentConfig(), 224)
    differences = []
    for seed in range(12):
        reseed(seed)
        a = full(_full(large_jpeg)).float()
        reseed(seed)
        b = reduced(open_lazy(large_jpeg)).float()
        reseed(seed + 100)
        other = full(_full(large_jpeg)).float()
        differences.append(((a - b).abs().mean().item(), (a - other).abs().mean().item()))
    assert max(same for same, _ in differences) < 4
    assert sum(same for same, _ in differences) < sum(other for _, other in differences) / 5


def test_views_of_one_lazy_image_each_decode_their_own_copy(large_jpeg):
    """Repeated augmentation and substitutes transform one image several times: each view draws
    its box from the full size, whatever the view before it decoded."""
    reduced = train_transform(AugmentConfig(), 224)
    lazy = open_lazy(large_jpeg)
    views = []
    for _ in range(2):
        reseed(7)
        views.append(reduced(lazy))
    assert lazy.size == (2000, 1500) and views[0].equal(views[1])


def test_eval_keeps_full_decoding_unless_asked(large_jpeg):
    assert not getattr(eval_transform(224), "takes_lazy_images", False)
    full = eval_transform(224)(_full(large_jpeg)).float()
    reduced = eval_transform(224, reduced_decode=True)(open_lazy(large_jpeg)).float()
    assert (full - reduced).abs().mean() < 4


def test_only_complete_jpegs_stay_lazy(large_jpeg, tmp_path):
    """A truncated JPEG is decoded (and refused) where it is read, as without reduced decoding."""
    image, _ = decode_sample({"jpg": large_jpeg, "cls": b"3"}, 10, lazy=True)
    assert getattr(image, "_im", None) is None
    buffer = io.BytesIO()
    Image.open(io.BytesIO(large_jpeg)).convert("L").save(buffer, "PNG")
    png, _ = decode_sample({"png": buffer.getvalue(), "cls": b"3"}, 10, lazy=True)
    assert png.mode == "RGB"  # not a JPEG: decoded in full, in RGB
    with pytest.raises(BadSample, match="undecodable image"):
        decode_sample({"jpg": large_jpeg[: len(large_jpeg) // 2], "cls": b"3"}, 10, lazy=True)


def test_reduced_decoding_is_faster_on_large_jpegs(large_jpeg):
    """DeiT's crop of a 2000 × 1500 JPEG: at least 1.5× the rate of decoding in full (libjpeg's
    DCT scaling gives ~3.5× on the development machine), best of several repeats each."""
    full, reduced = train_transform(AugmentConfig(reduced_decode=False), 224), train_transform(AugmentConfig(), 224)

    def best(transform, open_image) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for seed in range(4):
                reseed(seed)
                transform(open_image(large_jpeg))
            times.append(time.perf_counter() - start)
        return min(times)

    assert best(full, _full) / best(reduced, open_lazy) >= 1.5


def _broken_past_the_header(data: bytes) -> bytes:
    """A JPEG whose header reads and which ends with its end marker, but whose Huffman table
    libjpeg refuses when it decodes (PIL's header parser skips that table)."""
    table = data.find(b"\xff\xc4")
    return data[: table + 5] + b"\xff" * 16 + data[table + 21 :]


def _jpeg_shards(root, out, images: dict[str, bytes]):
    from vitdeep.data.shards import write_shards

    for index, (name, data) in enumerate(images.items()):
        folder = root / "train" / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jpg").write_bytes(data)
    write_shards(root, out, shard_size="4", workers=1)
    return out


@pytest.fixture(scope="module")
def large_jpeg_shards(tmp_path_factory):
    """8 JPEGs of 1,200 × 900 (two classes) as shards."""
    return _jpeg_shards(tmp_path_factory.mktemp("large-photos"), tmp_path_factory.mktemp("large-shards"),
                        {str(index): _jpeg(1200 + 40 * index, 900) for index in range(8)})


def test_a_jpeg_broken_past_its_header_is_counted_bad_where_it_is_decoded(tmp_path):
    """Left undecodable until its crop, it is counted as an undecodable image and its views borrow
    the lane's last good image, in training; skipped and counted in evaluation."""
    from vitdeep.data.lane_layout import LaneLayout
    from vitdeep.data.pipeline import eval_loader, lane_loader

    good = _jpeg(1000, 800)
    broken = _broken_past_the_header(good)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(broken)).load()
    images = {f"{index}": good for index in range(7)} | {"broken": broken}
    shards = _jpeg_shards(tmp_path / "photos", tmp_path / "shards", images)
    positions = []
    for seed in (5, 3, 2):  # the broken one first in the lane (the next image stands in), amid, last (the one before)
        loader = lane_loader(shards, layout=LaneLayout(1, 8, paired=False), micro_batch=8, img_size=64, rank=0,
                             world_size=1, seed=seed, epoch=0, num_workers=0, aug=AugmentConfig(), max_bad_fraction=None,
                             shuffle_buffer=8)
        (batch,) = list(loader)
        assert sorted(batch.keys) == sorted(f"class_{i % 2}/{name}" for i, name in enumerate(images))
        broken_at = next(i for i, key in enumerate(batch.keys) if key.endswith("broken"))
        positions.append(broken_at)
        stand_in = batch.keys[broken_at + 1 if broken_at < 7 else broken_at - 1]
        assert batch.substitutes == [stand_in if i == broken_at else None for i in range(8)]
        assert batch.stats.bad == {"undecodable image": 1} and batch.stats.samples == 7
    assert positions == [0, 2, 7]
    evaluated = eval_loader(shards, micro_batch=4, img_size=64, crop_ratio=0.875, rank=0, world_size=1, num_workers=0,
                            split="train", reduced_decode=True, max_bad_fraction=None)
    assert sum(len(labels) for _, labels in evaluated) == 7 and evaluated.bad_samples == 1


def test_the_lane_loader_draws_the_same_views_with_reduced_decoding(large_jpeg_shards):
    """The training order on JPEG shards: the same samples, seeds and boxes (up to the DCT scaling's
    pixels) as full decoding, and reduced decoding is as deterministic as full decoding."""
    from vitdeep.data.lane_layout import LaneLayout
    from vitdeep.data.pipeline import lane_loader

    def batches(reduced: bool) -> list:
        loader = lane_loader(large_jpeg_shards, layout=LaneLayout(4, 8, paired=False), micro_batch=8, img_size=64, rank=0,
                             world_size=1, seed=0, epoch=0, num_workers=0, aug=AugmentConfig(reduced_decode=reduced))
        return list(loader)

    full, reduced, again = batches(False), batches(True), batches(True)
    assert [b.keys for b in full] == [b.keys for b in reduced] and all(b.seeds.equal(r.seeds) for b, r in zip(full, reduced))
    assert all(r.images.equal(a.images) for r, a in zip(reduced, again))
    difference = max((b.images.float() - r.images.float()).abs().mean().item() for b, r in zip(full, reduced))
    assert 0 < difference < 4


def test_the_eval_loader_decodes_reduced_only_when_asked(large_jpeg_shards):
    """At 64 px the 900 px photos decode at 1/8 (libjpeg's 8 × 8 block means, then bicubic to 73):
    a few levels of 255 from the full decode's bicubic downsample."""
    from vitdeep.data.pipeline import eval_loader

    def images(reduced: bool):
        loader = eval_loader(large_jpeg_shards, micro_batch=8, img_size=64, crop_ratio=0.875, rank=0, world_size=1,
                             num_workers=0, split="train", reduced_decode=reduced)
        return next(iter(loader))[0].float()

    full, reduced = images(False), images(True)
    assert full.equal(images(False)) and 0 < (full - reduced).abs().mean() < 8
