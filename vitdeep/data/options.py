"""The data options and their defaults: augmentation, batch mixing, bad-data limits, image formats.

Free of torch (the transforms, mixers and loaders that use them import this module, not the other
way round), so that the run config and the command line's `--help` read every default from here.
Errors name the option's field (`crop_ratio`); the command line shows it as its flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from vitdeep.architecture import EVAL_CROP_RATIO, INTERPOLATION
from vitdeep.errors import UserError

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "random")
ERASE_MODES = ("pixel", "rand", "const")
#: Image files a shard sample may carry and `vitdeep shards` / `analyze --images` read, in order of
#: preference (extensions without the dot, as webdataset names a sample's members).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Default limit on the fraction of bad samples before a loader (or `eval`) stops.
MAX_BAD_FRACTION = 0.01


@dataclass
class AugmentConfig:
    """DeiT's training augmentation; a zero / empty value turns a part off."""

    scale_min: float = field(default=0.08, metadata={"help": "Smallest RandomResizedCrop area, as a fraction of the image."})
    scale_max: float = field(default=1.0, metadata={"help": "Largest RandomResizedCrop area, as a fraction of the image."})
    interpolation: str = field(default=INTERPOLATION, metadata={"help": f"Resize interpolation: {', '.join(INTERPOLATIONS)}."})
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
    crop_ratio: float = field(default=EVAL_CROP_RATIO, metadata={"help": "Evaluation: centre crop / resized shorter side."})

    def __post_init__(self) -> None:
        for name in ("hflip", "reprob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"`{name}` must be in [0, 1], got {getattr(self, name)}", params=(name,))
        if not 0.0 < self.scale_min <= self.scale_max <= 1.0:
            raise UserError(f"crop scale must satisfy 0 < `scale_min` <= `scale_max` <= 1, got ({self.scale_min}, {self.scale_max})",
                            params=("scale_min", "scale_max"))
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"`interpolation` must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}",
                            params=("interpolation",))
        if self.remode not in ERASE_MODES:
            raise UserError(f"`remode` must be one of {', '.join(ERASE_MODES)}, got {self.remode!r}", params=("remode",))
        if self.rand_augment and not self.rand_augment.startswith("rand"):
            raise UserError(f"`rand_augment` must be a timm RandAugment policy like 'rand-m9-mstd0.5-inc1', got {self.rand_augment!r}",
                            params=("rand_augment",))
        if self.color_jitter < 0:
            raise UserError(f"`color_jitter` must be >= 0, got {self.color_jitter}", params=("color_jitter",))
        if self.recount < 1 or self.repeated_aug < 1:
            raise UserError("`recount` and `repeated_aug` must be >= 1", params=("recount", "repeated_aug"))
        check_crop_ratio(self.crop_ratio)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name → help text (what the CLI shows for each flag)."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


def check_crop_ratio(crop_ratio: float) -> None:
    if not 0.0 < crop_ratio <= 1.0:
        raise UserError(f"`crop_ratio` must be in (0, 1], got {crop_ratio}", params=("crop_ratio",))


@dataclass
class MixConfig:
    """Batch mixing; DeiT's defaults. Alphas of 0 (or a probability of 0) turn mixing off."""

    mixup: float = field(default=0.8, metadata={"help": "Mixup Beta(α, α) parameter (0 = off)."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix Beta(α, α) parameter (0 = off)."})
    mix_prob: float = field(default=1.0, metadata={"help": "Probability that a batch is mixed at all."})
    switch_prob: float = field(default=0.5, metadata={"help": "Probability of CutMix rather than Mixup when both are on."})
    patch_aligned: bool = field(
        default=False, metadata={"help": "Snap the CutMix box to the patch grid and return per-patch targets."}
    )

    def __post_init__(self) -> None:
        if self.mixup < 0 or self.cutmix < 0:
            raise UserError(f"`mixup` and `cutmix` must be >= 0, got {self.mixup} and {self.cutmix}", params=("mixup", "cutmix"))
        for name in ("mix_prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"`{name}` must be in [0, 1], got {getattr(self, name)}", params=(name,))

    @property
    def enabled(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0
