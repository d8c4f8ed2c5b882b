"""Evaluation loaders, and the per-rank training stream of runs started before the lane order
(`tests/test_data_lanes.py` tests the lane order), over real shards with real DataLoader workers.

Ranks are simulated by building the loader with rank=0 and rank=1 in one process, which is all a
rank is to the data layer (it never asks torch.distributed).
"""

import itertools
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import functional as F
from webdataset.writer import TarWriter

from vitdeep.data.pipeline import BatchPreprocessor, eval_loader, read_dataset_info, train_loader
from vitdeep.data.shards import write_shards
from vitdeep.data.streams import TrainPlan
from vitdeep.data.transforms import AugmentConfig
from vitdeep.errors import UserError

AUG = AugmentConfig(hflip=0.0)
IMG = 16
# Some cases run 3 workers on this 2-core machine on purpose (reader/worker mappings).
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def digit_shards(digits_dir, tmp_path_factory):
    """30 train shards of 50 and 6 val shards (50 × 5 + 47), with _info.json."""
    out = tmp_path_factory.mktemp("digit-shards")
    write_shards(digits_dir, out, shard_size="50")
    return out


def _digit_samples(digits_dir: Path, split: str = "train") -> list[dict]:
    files = sorted((digits_dir / split).glob("*/*.png"))
    return [{"__key__": f"{p.parent.name}/{p.stem}", "png": p.read_bytes(), "cls": p.parent.name.encode()} for p in files]


def _write_tar(path: Path, samples: list[dict]) -> str:
    with TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


@pytest.fixture(scope="module")
def uneven_shards(digits_dir, tmp_path_factory):
    """Eight shards of 3 to 400 samples (952 in all), no _info.json: counted from tar headers."""
    out = tmp_path_factory.mktemp("uneven")
    samples = iter(_digit_samples(digits_dir))
    for index, size in enumerate([3, 150, 20, 7, 400, 60, 12, 300]):
        _write_tar(out / f"part-{index}.tar", list(itertools.islice(samples, size)))
    return f"{out}/part-{{0..7}}.tar"


def _train(urls, **overrides):
    options = dict(micro_batch=8, img_size=IMG, rank=0, world_size=2, seed=7, epoch=0, num_workers=2, aug=AUG)
    return train_loader(urls, **{**options, **overrides})


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (3, 2), (2, 0)])
def test_every_rank_gets_the_same_batch_count_from_uneven_shards(uneven_shards, world_size, num_workers):
    counts = []
    for rank in range(world_size):
        loader = _train(uneven_shards, rank=rank, world_size=world_size, num_workers=num_workers)
        assert len(loader) == 952 // (8 * world_size)
        batches = _batches(loader)
        counts.append(len(batches))
        for images, labels in batches:
            assert images.dtype == torch.uint8 and images.shape == (8, 3, IMG, IMG)
            assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
        assert loader.bad_samples == 0 and loader.stats.samples == len(batches) * 8
    assert counts == [952 // (8 * world_size)] * world_size


def test_first_cycle_splits_shards_by_rank_then_worker():
    urls = tuple(f"s{i}.tar" for i in range(13))
    plan = dict(urls=urls, world_size=2, readers=3, seed=1, epoch=4, batches=10, start_batch=0,
                images_per_batch=4, views=1, shuffle_buffer=10, num_classes=None)
    owned = [TrainPlan(rank=r, **plan).reader_shards(w) for r in range(2) for w in range(3)]
    assert all(not reshuffled for _, reshuffled in owned)
    flat = [url for shards, _ in owned for url in shards]
    assert sorted(flat) == sorted(urls) and len(flat) == len(set(flat))
    assert owned != [TrainPlan(rank=r, **{**plan, "epoch": 5}).reader_shards(w) for r in range(2) for w in range(3)]


@pytest.mark.parametrize("start_batch", [1, 6, 17])
def test_resume_yields_exactly_the_remaining_batches_without_decoding_the_skipped(digit_shards, start_batch):
    full = _batches(_train(digit_shards, rank=1))
    assert len(full) == 93
    resumed_loader = _train(digit_shards, rank=1, start_batch=start_batch)
    resumed = _batches(resumed_loader)
    assert len(resumed_loader) == 93 and _same(resumed, full[start_batch:])
    assert resumed_loader.stats.samples == (93 - start_batch) * 8


def test_resume_with_repeated_augmentation_and_tiny_shards(uneven_shards):
    aug = AugmentConfig(hflip=0.5, repeated_aug=2)
    full = _batches(_train(uneven_shards, aug=aug, num_workers=3))
    assert _same(_batches(_train(uneven_shards, aug=aug, num_workers=3, start_batch=20)), full[20:])
    for images, labels in full:
        assert torch.equal(labels[0::2], labels[1::2])
    assert any(not torch.equal(images[0], images[1]) for images, _ in full)


def test_seed_and_epoch_decide_the_stream(digit_shards):
    first = _batches(_train(digit_shards, epoch=0))
    assert _same(first, _batches(_train(digit_shards, epoch=0)))
    assert not torch.equal(first[0][0], _batches(_train(digit_shards, epoch=1))[0][0])
    assert not torch.equal(first[0][0], _batches(_train(digit_shards, seed=8))[0][0])


def test_pipe_urls_give_the_same_stream(digit_shards):
    direct = _batches(_train(f"{digit_shards}/train-{{000000..000029}}.tar", start_batch=40))
    piped = _batches(_train(f"pipe:cat {digit_shards}/train-{{000000..000029}}.tar", num_samples=1500, start_batch=40))
    assert _same(direct, piped)


def test_train_loader_leaves_the_callers_random_streams_alone(digit_shards):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(iter(_train(digit_shards, num_workers=0)))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(rank=2), "rank 2 is not in a world of 2"),
        (dict(start_batch=94), "outside the epoch of 93"),
        (dict(micro_batch=800), "make no global batch"),
        (dict(micro_batch=9, aug=AugmentConfig(repeated_aug=3, hflip=0)), None),
        (dict(micro_batch=8, aug=AugmentConfig(repeated_aug=3, hflip=0)), "multiple of `repeated_aug`"),
        (dict(seed=-1), "seed and epoch"),
        (dict(max_bad_fraction=2.0), "max_bad_fraction"),
    ],
)
def test_train_loader_checks_its_arguments(digit_shards, overrides, needle):
    if needle is None:
        assert len(_train(digit_shards, **overrides)) == 1500 // 18
        return
    with pytest.raises(UserError, match=needle):
        _train(digit_shards, **overrides)


@pytest.mark.parametrize("world_size, num_workers, sharding, by_shards",
                         [(2, 2, "shards", True), (2, 2, "modulo", False), (2, 3, "auto", True), (3, 3, "auto", False), (1, 0, "auto", True)])
def test_eval_sees_every_sample_exactly_once_over_ranks(digit_shards, world_size, num_workers, sharding, by_shards):
    keys, total = [], 0
    for rank in range(world_size):
        loader = eval_loader(digit_shards, micro_batch=16, img_size=IMG, crop_ratio=0.875, rank=rank, world_size=world_size,
                             num_workers=num_workers, sharding=sharding, with_keys=True)
        assert loader.plan.by_shards is by_shards and loader.samples_total == 297
        batches = list(loader)
        mine = [key for _, _, batch_keys in batches for key in batch_keys]
        assert len(batches) == len(loader) and len(mine) == loader.samples_rank == loader.stats.samples
        assert all(images.dtype == torch.uint8 and len(images) == len(labels) <= 16 for images, labels, _ in batches)
        keys += mine
        total += loader.samples_rank
    assert len(keys) == len(set(keys)) == total == 297


def test_eval_keys_are_the_val_images(digit_shards, digits_dir):
    keys = {key for _, _, batch in eval_loader(digit_shards, micro_batch=64, img_size=IMG, crop_ratio=1.0, rank=0,
                                                world_size=1, num_workers=2, with_keys=True) for key in batch}
    assert keys == {s["__key__"] for s in _digit_samples(digits_dir, "val")}


def _stuck_in_start(marker: Path | None):
    """A stand-in for `mark_started` whose worker 1 never returns, as a worker whose fork
    deadlocked in the child (python/cpython#112275) never reaches its start-up function: once
    (the first call creates `marker`), or always (`marker` None)."""
    from vitdeep.data import worker_start

    def stuck(flags, worker_id):
        if worker_id == 1 and (marker is None or not marker.exists()):
            if marker is not None:
                marker.touch()
            time.sleep(60)
        worker_start.mark_started(flags, worker_id)
    return stuck


def test_a_worker_that_never_starts_is_started_again_with_the_same_batches(digit_shards, tmp_path, monkeypatch, caplog):
    from vitdeep.data import pipeline, worker_start

    def batches():
        loader = eval_loader(digit_shards, micro_batch=16, img_size=IMG, crop_ratio=0.875, rank=0, world_size=1,
                             num_workers=2, with_keys=True)
        return [(images, labels, keys) for images, labels, keys in loader]

    expected = batches()
    monkeypatch.setattr(worker_start, "START_TIMEOUT", 1.0)
    monkeypatch.setattr(pipeline, "mark_started", _stuck_in_start(tmp_path / "stuck-once"))
    children_before = set(multiprocessing.active_children())
    got = batches()
    assert (tmp_path / "stuck-once").exists(), "the first start did not hang: the test tests nothing"
    assert "did not start within 1 s" in caplog.text and "attempt 2 of 3" in caplog.text
    assert [keys for *_, keys in got] == [keys for *_, keys in expected]
    assert all(torch.equal(a, b) for (*pair_a, _), (*pair_b, _) in zip(got, expected) for a, b in zip(pair_a, pair_b))
    assert not set(multiprocessing.active_children()) - children_before, "a killed worker was left behind"


def test_workers_that_never_start_end_in_one_error_naming_workers(digit_shards, monkeypatch):
    from vitdeep.data import pipeline, worker_start

    monkeypatch.setattr(worker_start, "START_TIMEOUT", 0.3)
    monkeypatch.setattr(pipeline, "mark_started", _stuck_in_start(None))
    loader = eval_loader(digit_shards, micro_batch=16, img_size=IMG, crop_ratio=0.875, rank=0, world_size=1, num_workers=2)
    with pytest.raises(UserError, match=r"did not start in 3 attempts") as raised:
        next(iter(loader))
    assert raised.value.params == ("workers",)
    assert not [child for child in multiprocessing.active_children() if child.is_alive()]


def test_exact_eval_with_too_few_shards_fails_before_reading(digit_shards):
    with pytest.raises(UserError, match=r"needs at least ranks × workers = 2 × 4 shards, but there are 6"):
        eval_loader(digit_shards, micro_batch=8, img_size=IMG, crop_ratio=0.875, rank=0, world_size=2, num_workers=4,
                    sharding="shards")


@pytest.fixture(scope="module")
def damaged_shards(digits_dir, tmp_path_factory):
    """A good shard, a shard with five bad samples among good ones, a truncated shard and a file
    that is no tar at all. Returns (urls, keys of the good samples)."""
    out = tmp_path_factory.mktemp("damaged")
    samples = _digit_samples(digits_dir)
    good = samples[:40]
    mixed = samples[40:60] + [
        {"__key__": "bad/undecodable", "png": b"\x89PNG but not really", "cls": b"1"},
        {"__key__": "bad/no_cls", "png": samples[60]["png"]},
        {"__key__": "bad/out_of_range", "png": samples[61]["png"], "cls": b"99"},
        {"__key__": "bad/not_a_number", "png": samples[62]["png"], "cls": b"seven"},
        {"__key__": "bad/no_image", "cls": b"3"},
    ] + samples[63:83]
    urls = [_write_tar(out / "good.tar", good), _write_tar(out / "mixed.tar", mixed)]
    whole = Path(_write_tar(out / "whole.tar", samples[100:140]))
    cut = out / "truncated.tar"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 5])
    garbage = out / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive" * 100)
    keys = {s["__key__"] for s in good + samples[40:60] + samples[63:83]}
    return [*urls, str(cut), str(garbage)], keys


def test_bad_data_is_skipped_counted_and_logged(damaged_shards, caplog):
    urls, good_keys = damaged_shards
    loader = eval_loader(urls, micro_batch=8, img_size=IMG, crop_ratio=0.875, rank=0, world_size=1, num_workers=2,
                         num_classes=10, with_keys=True, max_bad_fraction=0.2)
    keys = [key for _, _, batch in loader for key in batch]
    truncated_complete = set(keys) - good_keys
    assert len(keys) == len(set(keys)) and good_keys <= set(keys)
    assert 0 < len(truncated_complete) < 40 and all(not k.startswith("bad/") for k in truncated_complete)
    bad = loader.stats.bad
    for reason in ("undecodable image", "no cls member", "cls out of range", "cls is not an integer", "no image member"):
        assert bad[reason] >= 1, reason
    # the garbage; the truncated shard ends at a header, where its listing (its own headers) says it does
    assert bad["unreadable shard"] == 1
    assert loader.bad_samples == sum(bad.values())
    in_process = eval_loader(urls[1], micro_batch=8, img_size=IMG, crop_ratio=0.875, rank=0, world_size=1, num_workers=0,
                             num_classes=10, max_bad_fraction=1.0)
    list(in_process)
    logged = [r.getMessage() for r in caplog.records if r.name == "vitdeep.data.samples"]
    assert len(logged) == 5 and any("bad/no_cls in " in m and "no cls member" in m for m in logged)


@pytest.mark.parametrize("index, delivered, reasons", [(2, range(1, 40), None), (3, range(0, 1), {"unreadable shard": 1})])
def test_a_truncated_or_unreadable_shard_is_counted(damaged_shards, index, delivered, reasons):
    urls, _ = damaged_shards
    loader = eval_loader(urls[index], micro_batch=8, img_size=IMG, crop_ratio=0.875, rank=0, world_size=1,
                         num_workers=0, max_bad_fraction=1.0)
    assert sum(len(labels) for _, labels in loader) in delivered
    assert loader.bad_samples >= 1 and (reasons is None or loader.stats.bad == reasons)


def test_training_reads_past_bad_data_keeping_batches_full(damaged_shards):
    urls, _ = damaged_shards
    loader = _train(urls, world_size=1, num_samples=120, num_classes=10, max_bad_fraction=0.5)
    batches = _batches(loader)
    assert len(batches) == len(loader) == 15 and all(len(labels) == 8 for _, labels in batches)
    stats = loader.stats
    assert stats.bad_samples > 0
    assert stats.samples + stats.bad_samples - stats.bad["unreadable shard"] == 15 * 8, "every slot read once"
    assert _same(_batches(_train(urls, world_size=1, num_samples=120, num_classes=10, max_bad_fraction=0.5,
                                 start_batch=7)), batches[7:])


def test_a_batch_of_only_bad_samples_borrows_the_next_good_image(digits_dir, tmp_path):
    good = _digit_samples(digits_dir)[:10]
    bad = [{"__key__": f"bad/{i}", "png": b"broken", "cls": b"1"} for i in range(2)]
    url = _write_tar(tmp_path / "one.tar", good[:2] + bad + good[2:])
    options = dict(micro_batch=2, world_size=1, num_samples=12, shuffle_buffer=0, max_bad_fraction=0.5)
    batches = _batches(_train(url, **options))
    assert len(batches) == 6 and torch.equal(batches[1][1], batches[2][1][:1].repeat(2))
    for start in (1, 2, 4):
        assert _same(_batches(_train(url, start_batch=start, **options)), batches[start:])


def test_too_much_bad_data_stops_with_one_clear_error(damaged_shards):
    """7 bad of ~130 read: judged against at least MIN_JUDGED = 1000 samples, 0.005 allows 5."""
    urls, _ = damaged_shards
    loader = eval_loader(urls, micro_batch=8, img_size=IMG, crop_ratio=0.875, rank=0, world_size=1, num_workers=2,
                         num_classes=10, max_bad_fraction=0.005)
    with pytest.raises(UserError, match=r"samples read were bad \(.*\), more than `max_bad_fraction` 0.005"):
        list(loader)
    assert list(eval_loader(urls, micro_batch=8, img_size=IMG, crop_ratio=0.875, rank=0, world_size=1, num_workers=2,
                            num_classes=10, max_bad_fraction=0.01)), "7 bad samples are within 1% of 1000"


def test_unreadable_training_shards_stop_with_one_clear_error(damaged_shards):
    urls, _ = damaged_shards
    with pytest.raises(UserError, match="no readable sample in any of the 1 shards"):
        list(_train([urls[-1]], world_size=1, num_samples=100, max_bad_fraction=1.0))


def test_a_shard_vanishing_mid_epoch_leaves_the_reader_on_the_other(digit_shards, tmp_path):
    """The per-rank stream cycles through a reader's shards: one removed after the start is counted
    each time it comes round, and the reader goes on with the shard that is left (an empty stretch
    on each side of a cycle boundary once ended it: "no readable sample in any of the 2 shards")."""
    for name in ("train-000000.tar", "train-000001.tar"):
        shutil.copy(digit_shards / name, tmp_path / name)
    loader = _train(f"{tmp_path}/train-{{000000..000001}}.tar", world_size=1, num_workers=0, max_bad_fraction=1.0,
                    num_samples=400)
    (tmp_path / "train-000001.tar").unlink()
    batches = _batches(loader)
    assert len(batches) == 50 and loader.stats.bad_samples >= 3 and loader.stats.samples == 400


def test_batch_preprocessor_matches_timm_normalisation(digit_shards):
    images, labels = next(iter(eval_loader(digit_shards, micro_batch=8, img_size=IMG, crop_ratio=0.875, rank=0,
                                           world_size=1, num_workers=0)))
    expected = torch.stack([F.normalize(F.convert_image_dtype(im, torch.float32), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
                            for im in images])
    x = BatchPreprocessor(None, "cpu")(images)
    assert x.dtype == torch.float32 and torch.allclose(x, expected, atol=1e-5)
    x16 = BatchPreprocessor(None, "cpu", torch.bfloat16)(images, train=True)
    assert x16.dtype == torch.bfloat16 and torch.allclose(x16.float(), expected, atol=0.05)
    preprocess = BatchPreprocessor(AugmentConfig(reprob=1.0), "cpu")
    assert torch.allclose(preprocess(images, train=False), expected, atol=1e-5), "no erasing outside training"
    changed = (preprocess(images, train=True) != expected).flatten(1).any(1)
    assert changed.all() and images.dtype == torch.uint8


def test_dataset_info_passes_through(digit_shards):
    info = read_dataset_info(digit_shards, split="train")
    assert len(_train(info)) == 93
