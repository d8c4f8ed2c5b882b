"""The data options and their defaults: augmentation, batch mixing, bad-data limits, image formats,
how long a read may stall and how often it is retried.

Free of torch (the transforms, mixers and loaders that use them import this module, not the other
way round), so that the run config and the command line's `--help` read every default from here.
Errors name the option's field (`crop_ratio`); the command line shows it as its flag.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vitdeep.architecture import EVAL_CROP_RATIO, INTERPOLATION
from vitdeep.errors import UserError
from vitdeep.fields import FRACTION, PROBABILITY, Checked, above, at_least, check_number, option, shown

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "random")
ERASE_MODES = ("pixel", "rand", "const")
#: Image files a shard sample may carry and `vitdeep shards` / `analyze --images` read, in order of
#: preference (extensions without the dot, as webdataset names a sample's members).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Default limit on the fraction of bad samples before a loader (or `eval`) stops.
MAX_BAD_FRACTION = 0.01
#: `vitdeep shards --max-size`: JPEG quality of the images it re-encodes when --quality is not
#: given (FFCV's `jpeg_quality` default), and the smallest and largest cap of the shorter side.
DEFAULT_QUALITY, MIN_MAX_SIZE, MAX_MAX_SIZE = 90, 16, 65_536
#: Longest read timeout accepted: a socket's timeout must fit a C timeval, and a day is patience enough.
MAX_READ_TIMEOUT, MAX_READ_RETRIES = 86_400.0, 100


@dataclass(frozen=True)
class ReadPolicy(Checked):
    """How remote shards and their `_info.json` are read: a read that receives nothing for
    `read_timeout` seconds fails, and a failed read is retried `read_retries` times, after waits
    of 1, 2, 4 … seconds (never more than `read_timeout`), so a stalled server costs at most
    (retries + 1) × timeout plus the waits per shard."""

    read_timeout: float = option(60.0, "Seconds a remote shard or _info.json read may receive nothing before it is retried.",
                                 above(0, MAX_READ_TIMEOUT))
    read_retries: int = option(3, "Retries of a failed remote read (after 1, 2, 4 … s); then its unread samples count as missing.",
                               at_least(0, MAX_READ_RETRIES))

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1, 2, …)."""
        return min(2.0 ** (retry - 1), float(self.read_timeout))

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}


#: Largest colour jitter, Beta(α, α) of Mixup / CutMix, and erasing boxes or views per image.
MAX_JITTER, MAX_ALPHA, MAX_VIEWS = 100.0, 1e6, 1024


@dataclass
class AugmentConfig(Checked):
    """DeiT's training augmentation; a zero / empty value turns a part off."""

    scale_min: float = option(0.08, "Smallest RandomResizedCrop area, as a fraction of the image.", FRACTION)
    scale_max: float = option(1.0, "Largest RandomResizedCrop area, as a fraction of the image.", FRACTION)
    interpolation: str = option(INTERPOLATION, f"Resize interpolation: {', '.join(INTERPOLATIONS)}.")
    hflip: float = option(0.5, "Horizontal flip probability (0 = off).", PROBABILITY)
    rand_augment: str = option("rand-m9-mstd0.5-inc1", "timm RandAugment policy ('' = off); while on, colour jitter is off, as in DeiT.")
    color_jitter: float = option(0.3, "Colour jitter strength (0 = off); used only without RandAugment.", at_least(0, MAX_JITTER))
    reprob: float = option(0.25, "Random erasing probability, applied to the batch on the device (0 = off).", PROBABILITY)
    remode: str = option("pixel", f"Random erasing fill: {', '.join(ERASE_MODES)}.")
    recount: int = option(1, "Most random erasing boxes per image.", at_least(1, MAX_VIEWS))
    repeated_aug: int = option(1, "Augmented views per decoded image, in the same batch (1 = off).", at_least(1, MAX_VIEWS))
    crop_ratio: float = option(EVAL_CROP_RATIO, "Evaluation: centre crop / resized shorter side.", FRACTION)
    reduced_decode: bool = option(True, "Training: decode a JPEG at 1/2, 1/4 or 1/8 scale when its random crop's region is at least twice the output (the box is drawn first, from the header's size).")
    eval_reduced_decode: bool = option(False, "Validation: decode a JPEG at a reduced scale when its shorter side is at least twice the resize (off: numbers comparable with published ones).")

    def check(self) -> None:
        if self.scale_min > self.scale_max:
            raise UserError(f"crop scale must satisfy 0 < `scale_min` <= `scale_max` <= 1, got ({self.scale_min}, {self.scale_max})",
                            params=("scale_min", "scale_max"))
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"`interpolation` must be one of {', '.join(INTERPOLATIONS)}, got {shown(self.interpolation)}",
                            params=("interpolation",))
        if self.remode not in ERASE_MODES:
            raise UserError(f"`remode` must be one of {', '.join(ERASE_MODES)}, got {shown(self.remode)}", params=("remode",))
        if self.rand_augment and not self.rand_augment.startswith("rand"):
            raise UserError(f"`rand_augment` must be a timm RandAugment policy like 'rand-m9-mstd0.5-inc1', got {shown(self.rand_augment)}",
                            params=("rand_augment",))

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name → help text (what the CLI shows for each flag)."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


def check_crop_ratio(crop_ratio: float) -> None:
    check_number("crop_ratio", crop_ratio, FRACTION)


@dataclass
class MixConfig(Checked):
    """Batch mixing; DeiT's defaults. Alphas of 0 (or a probability of 0) turn mixing off."""

    mixup: float = option(0.8, "Mixup Beta(α, α) parameter (0 = off).", at_least(0, MAX_ALPHA))
    cutmix: float = option(1.0, "CutMix Beta(α, α) parameter (0 = off).", at_least(0, MAX_ALPHA))
    mix_prob: float = option(1.0, "Probability that a batch is mixed at all.", PROBABILITY)
    switch_prob: float = option(0.5, "Probability of CutMix rather than Mixup when both are on.", PROBABILITY)
    patch_aligned: bool = option(False, "Snap the CutMix box to the patch grid and return per-patch targets.")

    @property
    def enabled(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0
