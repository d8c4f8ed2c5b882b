"""The lane order (`vitdeep.data.lanes`): one global sequence of training samples for any number of
ranks, micro-batches and workers, read from real shards of real images with real DataLoader workers.

Ranks are simulated by building the loader with each rank in one process, which is all a rank is to
the data layer (it never asks torch.distributed).
"""

import collections
import itertools
import os
import shutil

import pytest
import torch

from vitdeep.data import lanes
from vitdeep.data.lane_layout import LaneLayout, choose_lanes
from vitdeep.data.lanes import LaneStream
from vitdeep.data.mixing import Mixer
from vitdeep.data.options import MixConfig
from vitdeep.data.pipeline import BatchPreprocessor, StreamReplay, lane_loader
from vitdeep.data.transforms import AugmentConfig
from vitdeep.errors import UserError
from vitdeep.models import create_model
from vitdeep.models.layers import drop_path_layers, sample_drop_paths
from tests.test_data_pipeline import _digit_samples, _write_tar, digit_shards  # noqa: F401 (a fixture)

IMG = 16
AUG = AugmentConfig(hflip=0.5, scale_min=0.3)
LAYOUT = LaneLayout(8, 32, paired=True)
# Some cases run 2-4 workers on this 2-core machine on purpose (lane/worker mappings).
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def _loader(urls, **overrides):
    options = dict(layout=LAYOUT, micro_batch=8, img_size=IMG, rank=0, world_size=1, seed=7, epoch=0, num_workers=0, aug=AUG)
    return lane_loader(urls, **{**options, **overrides})


def _global(urls, world_size: int, micro_batch: int, workers: int, steps: int | None = None, **overrides) -> dict:
    """(step, global position) → (key, image, seed, substitute) over all ranks."""
    out = {}
    for rank in range(world_size):
        loader = _loader(urls, rank=rank, world_size=world_size, micro_batch=micro_batch, num_workers=workers, **overrides)
        share = loader.share
        for index, batch in enumerate(loader):
            step = share.start_step + index // share.micro_per_step
            if steps is not None and step >= share.start_step + steps:
                break
            assert len(batch.positions) == micro_batch and batch.images.shape == (micro_batch, 3, IMG, IMG)
            for j, position in enumerate(batch.positions):
                out[step, position] = (batch.keys[j], batch.images[j].clone(), int(batch.seeds[j]), batch.substitutes[j])
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1]) and a[k][2:] == b[k][2:] for k in a)


@pytest.mark.parametrize("views", [1, 2])
def test_the_global_batches_do_not_depend_on_ranks_micro_batches_or_workers(digit_shards, views):
    aug = AugmentConfig(hflip=0.5, scale_min=0.3, repeated_aug=views, rand_augment="rand-m9-mstd0.5-inc1")
    one = _global(digit_shards, 1, 8, 0, steps=6, aug=aug)
    assert len(one) == 6 * 32
    for world_size, micro_batch, workers in [(1, 32, 2), (2, 16, 1), (2, 8, 2), (2, 16, 3), (4, 8, 1), (4, 4, 2)]:
        assert _same(_global(digit_shards, world_size, micro_batch, workers, steps=6, aug=aug), one), (world_size, micro_batch, workers)


@pytest.mark.parametrize("views", [1, 3])
def test_an_epoch_reads_no_sample_twice_and_leaves_out_less_than_a_global_batch(digit_shards, views):
    aug = AugmentConfig(hflip=0.0, rand_augment="", repeated_aug=views)
    layout = LaneLayout(8, 48, paired=True)
    seen = collections.Counter()
    for rank in range(2):
        for batch in _loader(digit_shards, layout=layout, rank=rank, world_size=2, micro_batch=24, num_workers=2, aug=aug):
            seen.update(batch.keys)
            assert not any(batch.substitutes)
    steps = 1500 // 48
    assert sum(seen.values()) == steps * 48
    assert set(seen.values()) == {views}, "each image once, as `views` views"
    if views == 1:
        assert 1500 - len(seen) == 1500 - steps * 48 < 48


def test_lanes_read_equal_contiguous_parts_of_the_shuffled_shard_order(digit_shards):
    share = _loader(digit_shards).share
    order = share.order
    pieces = [order.pieces(lane) for lane in range(8)]
    assert all(sum(len(p) for p in lane) == order.lane_images for lane in pieces)
    sequence = [(p.url, i) for lane in pieces for p in lane for i in range(p.start, p.stop)]
    assert len(sequence) == len(set(sequence)) == order.steps * 32
    shards = [order.urls[i] for i in order.shard_order()]
    assert [url for url, _ in sequence] == sorted((url for url, _ in sequence), key=shards.index), "parts follow the shard order"
    assert order.shard_order() != _loader(digit_shards, epoch=1).share.order.shard_order()


@pytest.mark.parametrize("start_step", [1, 7, 45])
def test_resume_yields_the_remaining_batches_decoding_only_what_it_uses(digit_shards, monkeypatch, start_step):
    full = _global(digit_shards, 2, 16, 0)
    decoded = []
    decode = lanes.decode_sample
    monkeypatch.setattr(lanes, "decode_sample", lambda sample, classes, **how: decoded.append(sample["__key__"]) or decode(sample, classes, **how))
    resumed = _global(digit_shards, 2, 16, 0, start_step=start_step)
    assert _same(resumed, {k: v for k, v in full.items() if k[0] >= start_step})
    assert len(decoded) == len(set(decoded)) == (46 - start_step) * 32, "every used image decoded once, no skipped one"


def test_a_bad_sample_keeps_its_position_filled_by_a_recorded_substitute(digits_dir, tmp_path):
    samples = _digit_samples(digits_dir)[:64]
    bad = {3: b"\x89PNG but not really", 17: b"", 40: b"broken"}
    for index, data in bad.items():
        samples[index] = {**samples[index], "png": data}
    out = tmp_path / "shards"
    out.mkdir()
    _write_tar(out / "train-000000.tar", samples[:32])
    _write_tar(out / "train-000001.tar", samples[32:])
    (out / "sizes.json").write_text('{"train-000000.tar": 32, "train-000001.tar": 32}')
    urls = [str(out / "train-000000.tar"), str(out / "train-000001.tar")]
    layout = LaneLayout(4, 16, paired=False)
    entries = _global(urls, 1, 16, 0, layout=layout, aug=AugmentConfig(hflip=0.0, rand_augment=""), num_classes=10)
    substituted = {key: used for key, _, _, used in entries.values() if used is not None}
    assert set(substituted) == {samples[i]["__key__"] for i in bad}
    good_keys = {s["__key__"] for i, s in enumerate(samples) if i not in bad}
    assert set(substituted.values()) <= good_keys
    assert len(entries) == 64 and len({key for key, *_ in entries.values()}) == 64, "every position filled, each key once"
    loader = _loader(urls, layout=layout, micro_batch=16, num_classes=10, max_bad_fraction=1.0)
    list(loader)
    assert loader.stats.bad_samples == 3 and loader.stats.samples == 61
    resumed = _global(urls, 2, 8, 1, layout=layout, aug=AugmentConfig(hflip=0.0, rand_augment=""), num_classes=10, start_step=2)
    assert _same(resumed, {k: v for k, v in entries.items() if k[0] >= 2})


def test_a_shard_that_vanishes_is_counted_as_missing_exactly_and_the_rest_is_unchanged(digit_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(digit_shards, copy)
    before = _global(copy, 1, 32, 0)
    gone = "train-000007.tar"
    loader = _loader(copy, micro_batch=32, max_bad_fraction=1.0)
    order = loader.share.order
    planned = sum(len(p) for lane in range(8) for p in order.pieces(lane) if p.url.endswith(gone))
    assert planned > 0
    (copy / gone).unlink()
    after = {}
    for index, batch in enumerate(loader):
        for j, position in enumerate(batch.positions):
            after[index, position] = (batch.keys[j], batch.substitutes[j])
    stats = loader.stats
    assert stats.bad_samples == planned, (stats.bad, planned)
    assert set(stats.bad) <= {"missing samples", "unreadable shard", "unreadable tar data"}
    missing = [k for k, (key, used) in after.items() if key.endswith("#missing")]
    assert len(missing) == planned and all(after[k][1] is not None for k in missing)
    untouched = [k for k in before if not after[k][0].endswith("#missing")]
    assert all(before[k][0] == after[k][0] for k in untouched) and len(untouched) == len(before) - planned


def test_layouts_say_which_worlds_fit():
    LANE = LAYOUT
    assert LANE.world_sizes() == [1, 2, 4] and LANE.worker_counts(2) == [0, 1, 2, 3, 4] and LANE.micro_batches(4) == [2, 4, 8]
    assert LaneLayout(8, 32, paired=False).world_sizes() == [1, 2, 4, 8]
    assert LANE.problem(2, 2, 16) is None
    assert "runs on 1, 2, 4 ranks, not 8" in LANE.problem(8, 0, 4)
    assert "at most 4 `workers` per rank, not 5" in LANE.problem(2, 5, 16)
    assert "`micro_batch` must be one of 2, 4, 8" in LANE.problem(4, 1, 3)
    with pytest.raises(UserError, match="must divide the global batch"):
        LaneLayout(6, 32, paired=False)
    assert choose_lanes(1024, 64, 8, paired=True) == 512 and choose_lanes(1024, 8, 4, paired=True) == 64
    assert choose_lanes(1024, 16, 4, paired=True) == 128, "room to grow: 8 × the starting ranks"
    assert choose_lanes(252, 1, 4, paired=True) == 42, "workers need not divide the lanes"
    assert choose_lanes(32, 2, 1, paired=True) == 32 and choose_lanes(64, 1, 0, paired=False) == 64
    with pytest.raises(UserError, match="multiple of 10 with at least 1 lanes per rank"):
        choose_lanes(36, 5, 1, paired=True)


@pytest.mark.parametrize("overrides, needle", [
    (dict(world_size=8, micro_batch=4), "runs on 1, 2, 4 ranks"),
    (dict(num_workers=9), "at most 8 `workers` per rank, not 9"),
    (dict(micro_batch=6), "`micro_batch` must be one of"),
    (dict(start_step=47), "outside the epoch of 46 steps"),
    (dict(layout=LaneLayout(8, 2048, paired=True)), "make no global batch of 2048"),
])
def test_lane_loader_checks_its_arguments(digit_shards, overrides, needle):
    with pytest.raises(UserError, match=needle):
        _loader(digit_shards, **overrides)


def test_lanes_need_every_shards_count(digit_shards):
    with pytest.raises(UserError, match="needs every shard's sample count"):
        _loader(f"pipe:cat {digit_shards}/train-{{000000..000029}}.tar")


def test_per_sample_randomness_follows_the_sample_not_its_batch(digit_shards):
    """Erasing, pair mixing and drop path give a sample (a pair) the same draws in any batch."""
    batch = next(iter(_loader(digit_shards, micro_batch=32, aug=AugmentConfig(hflip=0.5, reprob=1.0, recount=3))))
    pairs = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    order = torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()
    preprocess = BatchPreprocessor(AugmentConfig(reprob=0.5, recount=2), "cpu")
    erased = preprocess(batch.images, train=True, seeds=batch.seeds)
    assert torch.equal(preprocess(batch.images[order], train=True, seeds=batch.seeds[order]), erased[order])
    assert torch.equal(preprocess(batch.images[:10], train=True, seeds=batch.seeds[:10]), erased[:10])
    state = torch.get_rng_state()
    mixer = Mixer(MixConfig(mixup=0.8, cutmix=1.0, patch_aligned=True), 10, IMG, 4, label_smoothing=0.1)
    whole = mixer(erased.clone(), batch.labels, batch.seeds)
    shuffled = mixer(erased[order].clone(), batch.labels[order], batch.seeds[order])
    part = mixer(erased[:8].clone(), batch.labels[:8], batch.seeds[:8])
    for mixed, index in ((shuffled, order), (part, torch.arange(8))):
        assert torch.equal(mixed.images, whole.images[index]) and torch.equal(mixed.targets, whole.targets[index])
        assert torch.equal(mixed.patch_soft, whole.patch_soft[index])
        assert torch.equal(mixed.patch_labels, whole.patch_labels[index])
    assert torch.equal(torch.get_rng_state(), state), "the callers' generators are left alone"
    model = create_model("deit_tiny_12", depth=2, embed_dim=32, num_heads=2, img_size=IMG, patch_size=4, num_classes=10,
                         drop_path_rate=0.5).train()
    draws = torch.rand(32, len(drop_path_layers(model)))
    with torch.no_grad(), sample_drop_paths(model, draws):
        full = model(erased)
    with torch.no_grad(), sample_drop_paths(model, draws[order]):
        assert torch.allclose(model(erased[order]), full[order], atol=1e-5)
    assert all(layer.draws is None for layer in drop_path_layers(model))


def test_a_kept_epoch_is_replayed_exactly_without_reading(digit_shards, monkeypatch):
    replay = StreamReplay()
    loader = _loader(digit_shards, replay=replay)
    read = [batch.clone() for batch in loader]
    assert len(read) == 46 * 4 and replay.kept_bytes == sum(b.nbytes for b in read)

    def refuse(self):
        raise AssertionError("the stream was read")
        yield
    monkeypatch.setattr(LaneStream, "__iter__", refuse)
    again = [b.clone() for b in _loader(digit_shards, replay=replay)]
    assert all(torch.equal(a.images, b.images) and a.keys == b.keys and a.positions == b.positions for a, b in zip(again, read))
    assert len(again) == len(read) and _loader(digit_shards, replay=replay).share.start_step == 0
    later = list(_loader(digit_shards, replay=replay, start_step=40))
    assert len(later) == 6 * 4 and all(torch.equal(a.images, b.images) for a, b in zip(later, read[40 * 4:]))
    first = next(iter(_loader(digit_shards, replay=replay)))
    first.images.zero_()
    assert torch.equal(next(iter(_loader(digit_shards, replay=replay))).images, read[0].images), "replays hand out copies"
    for other in (dict(epoch=1), dict(seed=8), dict(rank=1, world_size=2, micro_batch=16), dict(img_size=IMG + 8),
                  dict(aug=AugmentConfig(hflip=0.0))):
        with pytest.raises(AssertionError, match="the stream was read"):
            next(iter(_loader(digit_shards, **{"replay": replay, **other})))


def test_an_epoch_is_kept_only_when_read_whole_clean_unchanged_and_within_the_budget(digit_shards, tmp_path):
    replay = StreamReplay()
    resumed = _loader(digit_shards, replay=replay, start_step=1)
    list(resumed)
    assert replay.kept_bytes == 0 and resumed.replay_key not in replay, "a resumed epoch is not whole"
    partial = _loader(digit_shards, replay=replay)
    list(itertools.islice(partial, 46 * 4 - 1))
    assert partial.replay_key not in replay, "one micro-batch short"
    small = StreamReplay(max_bytes=10 * 8 * 3 * IMG * IMG)
    over = _loader(digit_shards, replay=small)
    list(over)
    assert over.replay_key not in small and small.kept_bytes == 0 and small.full
    copy = tmp_path / "shards"
    shutil.copytree(digit_shards, copy)
    first = _loader(copy, replay=replay)
    list(first)
    assert first.replay_key in replay
    os.utime(copy / "train-000003.tar", ns=(1, 1))
    assert _loader(copy, replay=replay).replay_key not in replay
    (copy / "train-000004.tar").write_bytes(b"")
    dirty = _loader(copy, replay=replay, max_bad_fraction=1.0)
    list(dirty)
    assert dirty.stats.bad_samples and dirty.replay_key not in replay


def test_workers_split_the_lanes_of_a_rank():
    order = lanes.EpochOrder(urls=(), sizes=(), seed=0, epoch=0, layout=LAYOUT, views=1, shuffle_buffer=1)
    share = lanes.RankShare(order, rank=1, world_size=2, micro_batch=8, readers=2, start_step=0, num_classes=None)
    assert [share.lane(i) for i in range(4)] == [4, 5, 6, 7]
    assert share.reader_lanes(0) == [0, 2] and share.reader_lanes(1) == [1, 3]
    slots = [share.reader_slots(r, 0) for r in range(2)]
    assert sorted(place for reader in slots for place, _, _ in reader) == list(range(8))
    assert {lane for place, lane, entry in slots[0]} == {4, 6} and {lane for _, lane, _ in slots[1]} == {5, 7}
    assert share.positions(0) == [4, 5, 6, 7, 12, 13, 14, 15] and share.positions(1) == [20, 21, 22, 23, 28, 29, 30, 31]
    assert [entry for _, _, entry in slots[0]] == [0, 0, 1, 1]


def test_a_lane_enters_a_local_shard_at_its_piece_without_reading_the_samples_before(digit_shards, monkeypatch):
    from vitdeep.data.samples import BadDataLog, ReadStats, shard_samples

    url = str(digit_shards / "train-000003.tar")
    expected = [sample["__key__"] for sample in itertools.islice(shard_samples(url, BadDataLog(ReadStats())), 30, None)]

    def refuse(*args, **kwargs):
        raise AssertionError("read from the start")
    monkeypatch.setattr(lanes, "shard_samples", refuse)
    log = lanes._PieceLog(BadDataLog(ReadStats()))
    assert [sample["__key__"] for sample in lanes._samples_from(url, 30, log)] == expected
    assert log.counting and log.stats.bad_samples == 0
