"""Batch mixing (timm's Mixup/CutMix, patch-aligned CutMix with per-patch targets) and the
augmentation config."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.mixup import mixup_target

from vitdeep.data.mixing import MixConfig, build_mixer
from vitdeep.data.transforms import AugmentConfig, _posterize, eval_transform, train_transform
from vitdeep.errors import UserError


def _batch(size: int, img: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, 3, img, img, generator=generator), torch.randint(0, 10, (size,), generator=generator)


@pytest.mark.parametrize("img, patch, batch", [(32, 8, 4), (224, 16, 6), (48, 16, 2)])
def test_patch_aligned_cutmix_targets_agree_with_pixels(img, patch, batch):
    mixer = build_mixer(MixConfig(mixup=0.0, cutmix=1.0, patch_aligned=True), 10, img, patch, label_smoothing=0.1)
    grid = img // patch
    cut = 0
    for seed in range(12):
        np.random.seed(seed)
        images, labels = _batch(batch, img, seed)
        out = mixer(images.clone(), labels)
        assert out.patch_source.shape == out.patch_labels.shape == (batch, grid * grid)
        assert torch.equal(out.patch_labels, labels[out.patch_source])
        for b in range(batch):
            for i, source in enumerate(out.patch_source[b].tolist()):
                rows, cols = slice(i // grid * patch, (i // grid + 1) * patch), slice(i % grid * patch, (i % grid + 1) * patch)
                assert torch.equal(out.images[b, :, rows, cols], images[source, :, rows, cols])
                assert source in (b, batch - 1 - b)
        own = (out.patch_source == torch.arange(batch).unsqueeze(1)).double().mean(1)
        assert torch.allclose(own, torch.full((batch,), out.lam, dtype=torch.float64))
        assert torch.allclose(out.targets, mixup_target(labels, 10, out.lam, 0.1))
        cut += out.lam < 1
    assert cut >= 6


def test_plain_mixing_is_timms():
    cfg = MixConfig()
    mixer = build_mixer(cfg, 10, 32, 8, label_smoothing=0.1)
    reference = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob, switch_prob=cfg.switch_prob,
                      label_smoothing=0.1, num_classes=10)
    for seed in range(8):
        images, labels = _batch(4, 32, seed)
        np.random.seed(seed)
        ours = mixer(images.clone(), labels)
        np.random.seed(seed)
        expected_images, expected_targets = reference(images.clone(), labels)
        assert torch.equal(ours.images, expected_images) and torch.allclose(ours.targets, expected_targets)
        assert ours.patch_labels is None and ours.patch_source is None


def test_mixup_batches_have_no_patch_targets():
    mixer = build_mixer(MixConfig(cutmix=0.0, patch_aligned=True), 10, 32, 8)
    images, labels = _batch(4, 32)
    out = mixer(images.clone(), labels)
    assert out.patch_labels is None and out.patch_source is None and 0 < out.lam < 1
    assert torch.allclose(out.images, out.lam * images + (1 - out.lam) * images.flip(0))


def test_an_unmixed_batch_keeps_its_own_patches():
    mixer = build_mixer(MixConfig(mix_prob=1e-12, patch_aligned=True), 10, 32, 8, label_smoothing=0.1)
    images, labels = _batch(4, 32)
    out = mixer(images.clone(), labels)
    assert out.lam == 1.0 and torch.equal(out.images, images)
    assert torch.equal(out.patch_source, torch.arange(4).unsqueeze(1).expand(4, 16))
    assert torch.allclose(out.targets, mixup_target(labels, 10, 1.0, 0.1))


def test_mixing_off_gives_no_mixer():
    assert build_mixer(MixConfig(mixup=0.0, cutmix=0.0), 10, 32, 8) is None
    assert build_mixer(MixConfig(mix_prob=0.0), 10, 32, 8) is None


def test_mixing_errors_are_user_errors():
    with pytest.raises(UserError, match="even micro-batch"):
        build_mixer(MixConfig(), 10, 32, 8)(*_batch(3, 32))
    with pytest.raises(UserError, match="multiple of the patch size"):
        build_mixer(MixConfig(patch_aligned=True), 10, 30, 8)
    with pytest.raises(UserError, match="switch_prob"):
        MixConfig(switch_prob=1.5)


def test_augment_defaults_are_deits_recipe():
    cfg = AugmentConfig()
    assert (cfg.scale_min, cfg.scale_max, cfg.interpolation, cfg.hflip) == (0.08, 1.0, "bicubic", 0.5)
    assert (cfg.rand_augment, cfg.color_jitter, cfg.reprob, cfg.remode, cfg.recount) == ("rand-m9-mstd0.5-inc1", 0.3, 0.25, "pixel", 1)
    assert (cfg.repeated_aug, cfg.crop_ratio) == (1, 0.875)
    for config in (AugmentConfig, MixConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(config))
    assert set(AugmentConfig.help()) == {f.name for f in dataclasses.fields(AugmentConfig)}


def _steps(transform) -> list[str]:
    return [type(step).__name__ for step in transform.transforms]


def test_zero_turns_augmentation_parts_off():
    assert _steps(train_transform(AugmentConfig(), 32)) == [
        "ReducedDecodeCrop", "RandomHorizontalFlip", "RandAugment", "MaybePILToTensor"]
    assert _steps(train_transform(AugmentConfig(rand_augment=""), 32)) == [
        "ReducedDecodeCrop", "RandomHorizontalFlip", "ColorJitter", "MaybePILToTensor"]
    assert _steps(train_transform(AugmentConfig(rand_augment="", color_jitter=0, hflip=0), 32)) == [
        "ReducedDecodeCrop", "MaybePILToTensor"]
    # without reduced decoding the crop is timm's own
    assert _steps(train_transform(AugmentConfig(rand_augment="", color_jitter=0, hflip=0, reduced_decode=False), 32)) == [
        "RandomResizedCropAndInterpolation", "MaybePILToTensor"]


def test_rand_augment_survives_its_strongest_posterize():
    """timm maps magnitude 10 to posterize with 0 bits, which Pillow >= 13 refuses."""
    transform = train_transform(AugmentConfig(rand_augment="rand-m10-mstd0-inc1"), 32)
    rng = np.random.default_rng(0)
    for _ in range(300):
        out = transform(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)))
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert not np.asarray(_posterize(Image.new("RGB", (4, 4), (200, 100, 50)), 0)).any()


def test_eval_transform_resizes_and_centre_crops_grayscale_digits(digits_dir):
    image = Image.open(next((digits_dir / "val").glob("*/*.png"))).convert("RGB")
    out = eval_transform(32, 0.5)(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


@pytest.mark.parametrize("overrides, needle", [
    (dict(hflip=1.5), "hflip"), (dict(reprob=-0.1), "reprob"), (dict(scale_min=0.9, scale_max=0.5), "crop scale"),
    (dict(interpolation="lanczos5"), "interpolation"), (dict(remode="zero"), "remode"),
    (dict(rand_augment="autoaug"), "rand_augment"), (dict(repeated_aug=0), "repeated_aug"),
    (dict(crop_ratio=1.2), "crop_ratio"),
])
def test_augment_config_rejects_bad_values(overrides, needle):
    with pytest.raises(UserError, match=needle):
        AugmentConfig(**overrides)


@pytest.mark.parametrize("img, patch, batch", [(32, 8, 8), (48, 16, 6)])
def test_pairs_mixed_by_their_seeds_agree_with_pixels_and_targets(img, patch, batch):
    """Mixing in pairs (2p, 2p+1), each from its own seed: CutMix boxes swap whole patches between
    the two, Mixup blends them, and every target says so."""
    mixer = build_mixer(MixConfig(mixup=0.8, cutmix=1.0, patch_aligned=True), 10, img, patch, label_smoothing=0.1)
    grid = img // patch
    kinds = set()
    for seed in range(10):
        images, labels = _batch(batch, img, seed)
        seeds = torch.randint(-2**62, 2**62, (batch,), generator=torch.Generator().manual_seed(seed))
        out = mixer(images.clone(), labels, seeds)
        again = mixer(images.clone(), labels, seeds)
        assert torch.equal(out.images, again.images) and torch.equal(out.targets, again.targets), "a seed decides"
        assert torch.allclose(out.targets.sum(1), torch.ones(batch))
        for b in range(batch):
            partner = b ^ 1
            # with smoothing 0.1 over 10 classes a sample's own label gets λ·0.9 + 0.01
            lam = (out.targets[b, labels[b]].item() - 0.01) / 0.9 if labels[b] != labels[partner] else None
            if out.patch_soft[b]:
                kinds.add("mixup")
                if lam is not None:
                    assert torch.allclose(out.images[b], lam * images[b] + (1 - lam) * images[partner], atol=1e-5)
                assert torch.equal(out.patch_labels[b], labels[b].repeat(grid * grid))
                continue
            for i, source in enumerate(out.patch_source[b].tolist()):
                rows, cols = slice(i // grid * patch, (i // grid + 1) * patch), slice(i % grid * patch, (i % grid + 1) * patch)
                assert torch.equal(out.images[b, :, rows, cols], images[source, :, rows, cols])
                assert source in (b, partner)
            own = (out.patch_source[b] == b).double().mean().item()
            kinds.add("cutmix" if own < 1 else "unmixed")
            if lam is not None:
                assert lam == pytest.approx(own, abs=1e-6), "λ is the kept area"
    assert {"mixup", "cutmix"} <= kinds
