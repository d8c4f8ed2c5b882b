"""DeiT's augmentation, built from timm's transform factory.

`AugmentConfig` is the one place the recipe's defaults live (reference.md §4); the CLI makes a
flag of each field, with the field's `help`. The per-image transforms run in the loader workers and
stop at uint8 tensors (timm's "prefetcher" mode); normalisation and random erasing run on the whole
batch on the device (`pipeline.BatchPreprocessor`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from PIL import Image
from timm.data import auto_augment, create_transform

from vitdeep.errors import UserError

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "random")
ERASE_MODES = ("pixel", "rand", "const")

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass
class AugmentConfig:
    """DeiT's training augmentation; a zero / empty value turns a part off."""

    scale_min: float = field(default=0.08, metadata={"help": "Smallest RandomResizedCrop area, as a fraction of the image."})
    scale_max: float = field(default=1.0, metadata={"help": "Largest RandomResizedCrop area, as a fraction of the image."})
    interpolation: str = field(default="bicubic", metadata={"help": f"Resize interpolation: {', '.join(INTERPOLATIONS)}."})
    hflip: float = field(default=0.5, metadata={"help": "Horizontal flip probability (0 = off)."})
    rand_augment: str = field(
        default="rand-m9-mstd0.5-inc1",
        metadata={"help": "timm RandAugment policy ('' = off); while on, colour jitter is off, as in DeiT."},
    )
    color_jitter: float = field(default=0.3, metadata={"help": "Colour jitter strength (0 = off); used only without RandAugment."})
    reprob: float = field(default=0.25, metadata={"help": "Random erasing probability, applied to the batch on the device (0 = off)."})
    remode: str = field(default="pixel", metadata={"help": f"Random erasing fill: {', '.join(ERASE_MODES)}."})
    recount: int = field(default=1, metadata={"help": "Most random erasing boxes per image."})
    repeated_aug: int = field(default=1, metadata={"help": "Augmented views per decoded image, in the same batch (1 = off)."})
    crop_ratio: float = field(default=0.875, metadata={"help": "Evaluation: centre crop / resized shorter side."})

    def __post_init__(self) -> None:
        for name in ("hflip", "reprob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.scale_min <= self.scale_max <= 1.0:
            raise UserError(f"crop scale must satisfy 0 < min <= max <= 1, got ({self.scale_min}, {self.scale_max})")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.remode not in ERASE_MODES:
            raise UserError(f"--remode must be one of {', '.join(ERASE_MODES)}, got {self.remode!r}")
        if self.rand_augment and not self.rand_augment.startswith("rand"):
            raise UserError(f"--rand-augment must be a timm RandAugment policy like 'rand-m9-mstd0.5-inc1', got {self.rand_augment!r}")
        if self.color_jitter < 0:
            raise UserError(f"--color-jitter must be >= 0, got {self.color_jitter}")
        if self.recount < 1 or self.repeated_aug < 1:
            raise UserError("--recount and --repeated-aug must be >= 1")
        if not 0.0 < self.crop_ratio <= 1.0:
            raise UserError(f"--crop-ratio must be in (0, 1], got {self.crop_ratio}")

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name → help text (what the CLI shows for each flag)."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


def train_transform(cfg: AugmentConfig, img_size: int) -> Transform:
    """PIL image → augmented uint8 tensor [3, img_size, img_size] (no normalisation, no erasing)."""
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
    return with_zero_bit_posterize(transform)


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


def eval_transform(img_size: int, crop_ratio: float = 0.875, interpolation: str = "bicubic") -> Transform:
    """PIL image → uint8 tensor: shorter side resized to img_size / crop_ratio, centre crop."""
    if not 0.0 < crop_ratio <= 1.0:
        raise UserError(f"crop ratio must be in (0, 1], got {crop_ratio}")
    if interpolation == "random":
        interpolation = "bicubic"
    return create_transform(img_size, is_training=False, crop_pct=crop_ratio, interpolation=interpolation, use_prefetcher=True)
