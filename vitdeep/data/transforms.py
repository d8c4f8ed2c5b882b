"""DeiT's augmentation, built from timm's transform factory.

`AugmentConfig` (in `vitdeep.data.options`, free of torch) is the one place the recipe's defaults
live (docs/method.md §4). The per-image transforms run in the loader workers and stop at uint8
tensors (timm's "prefetcher" mode); normalisation and random erasing run on the whole batch on the
device (`pipeline.BatchPreprocessor`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from timm.data import auto_augment, create_transform

from vitdeep.architecture import EVAL_CROP_RATIO, INTERPOLATION
from vitdeep.data.options import AugmentConfig, check_crop_ratio
from vitdeep.data.reduced_decode import with_reduced_decoding
from vitdeep.errors import UserError

Transform = Callable[[Image.Image], torch.Tensor]


def train_transform(cfg: AugmentConfig, img_size: int) -> Transform:
    """PIL image → augmented uint8 tensor [3, img_size, img_size] (no normalisation, no erasing);
    with `cfg.reduced_decode` it takes lazily opened JPEGs and decodes them at the scale the crop allows."""
    try:
        transform = create_transform(
            img_size,
            is_training=True,
            scale=(cfg.scale_min, cfg.scale_max),
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter or None,
            auto_augment=cfg.rand_augment or None,
            interpolation=cfg.interpolation,
            use_prefetcher=True,
        )
    except (AssertionError, ValueError, KeyError) as error:
        raise UserError(f"cannot build the augmentation {cfg.rand_augment!r}: {error}") from None
    transform = with_zero_bit_posterize(transform)
    return with_reduced_decoding(transform, train=True) if cfg.reduced_decode else transform


def _posterize(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """Posterize that keeps 0 bits (a black image), as Pillow did before 13.0 rejected it."""
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return auto_augment.posterize(image, bits_to_keep, **kwargs)


def with_zero_bit_posterize(transform: Transform) -> Transform:
    """Let timm's RandAugment posterize to 0 bits again (its level 10 under Pillow >= 13).

    timm maps magnitude 10 of `PosterizeIncreasing` to 0 bits, which Pillow 13 refuses with a
    ValueError; DeiT's `m9-mstd0.5` reaches it for ~2% of draws. Patched on this instance only.
    """
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def eval_transform(img_size: int, crop_ratio: float = EVAL_CROP_RATIO, interpolation: str = INTERPOLATION,
                   reduced_decode: bool = False) -> Transform:
    """PIL image → uint8 tensor: shorter side resized to img_size / crop_ratio, centre crop
    (`reduced_decode`: from a JPEG decoded at the reduced scale that resize allows)."""
    check_crop_ratio(crop_ratio)
    if interpolation == "random":
        interpolation = INTERPOLATION
    transform = create_transform(img_size, is_training=False, crop_pct=crop_ratio, interpolation=interpolation, use_prefetcher=True)
    return with_reduced_decoding(transform, train=False) if reduced_decode else transform
