"""Reduced JPEG decoding: decode only as many pixels as the crop will keep.

A random-resized crop often keeps a region several times larger than its output (DeiT's crop of
a 500 px photo to 224 px), and libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size almost
that much faster (DCT scaling; PIL's `Image.draft`). So the crop box is drawn first, from the
size in the JPEG's header, with exactly the random draws of timm's
`RandomResizedCropAndInterpolation` (the same per-sample seed gives the same box, and the draws
after it are unchanged); then the image is decoded at the largest reduction that still leaves the
box at least the output size, and the box, mapped onto the reduced image in fractional pixels, is
resized to the output. A box less than twice the output decodes in full, exactly as before.

The loaders open JPEGs without decoding them (`samples.decode_sample(..., lazy=True)`)
only for a transform that takes them (`takes_lazy_images`); everything else gets decoded images.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from typing import Any

from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation, ResizeKeepRatio
from torchvision.transforms import CenterCrop, Resize
from torchvision.transforms import functional as F

from vitdeep.data.samples import LAZY_BYTES, BadSample

#: libjpeg's DCT scalings PIL's `draft` can ask for, largest first.
REDUCTIONS = (8, 4, 2)


def reduction(region: tuple[float, float], output: tuple[int, int]) -> int:
    """The largest DCT reduction (8, 4, 2, else 1) that leaves `region` (width, height) at least
    `output` (width, height) in both directions: 1 below twice the output."""
    return next((k for k in REDUCTIONS if region[0] / k >= output[0] and region[1] / k >= output[1]), 1)


def decode(image: Image.Image, k: int = 1) -> tuple[Image.Image, float]:
    """`image` decoded in RGB, from its own copy at 1/`k` of its size where it was opened lazily
    (else as it is), and the size of one decoded pixel in the original's pixels. A lazy image
    whose data cannot be decoded is a `BadSample`, as it would have been where it was read."""
    data = getattr(image, LAZY_BYTES, None)
    if data is None:
        return (image.convert("RGB") if image.mode != "RGB" else image), 1.0
    try:
        return _decode_copy(data, k)
    except Exception as error:  # PIL raises many types for broken data
        raise BadSample(f"undecodable image: {error}") from None


def _decode_copy(data: bytes, k: int) -> tuple[Image.Image, float]:
    scale = 1.0
    image = Image.open(io.BytesIO(data))
    if k > 1:
        width = image.size[0]
        drafted = image.draft("RGB", (max(width // k, 1), max(image.size[1] // k, 1)))
        if drafted is not None:
            scale = width / drafted[1][2]
    if image.mode != "RGB":
        return image.convert("RGB"), scale
    image.load()
    return image, scale


def draw_box(crop: RandomResizedCropAndInterpolation, image: Image.Image) -> tuple[tuple[int, int, int, int], Any]:
    """timm's crop box (top, left, height, width) for `image` (its size alone is read: a lazy JPEG
    stays undecoded), and its interpolation: the same random draws, in the same order, as its
    `__call__`."""
    box = crop.get_params(image, crop.scale, crop.ratio)
    interpolation = random.choice(crop.interpolation) if isinstance(crop.interpolation, (tuple, list)) else crop.interpolation
    return box, interpolation


class ReducedDecodeCrop:
    """timm's random-resized crop that decodes a lazy JPEG at a reduced scale where its box allows."""

    def __init__(self, crop: RandomResizedCropAndInterpolation) -> None:
        self.crop = crop

    def __call__(self, image: Image.Image) -> Image.Image:
        (top, left, height, width), interpolation = draw_box(self.crop, image)
        out_h, out_w = self.crop.size
        decoded, scale = decode(image, reduction((width, height), (out_w, out_h)))
        if scale == 1.0:
            return F.resized_crop(decoded, top, left, height, width, self.crop.size, interpolation)
        box = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
        return decoded.resize((out_w, out_h), F.pil_modes_mapping[interpolation], box=box)

    def __repr__(self) -> str:
        return f"ReducedDecodeCrop({self.crop!r})"


class ReducedDecodeResize:
    """An evaluation resize of the shorter side to `size`, decoding a lazy JPEG at the largest
    reduction that keeps the shorter side at least `size` (the centre crop after it shifts by at
    most half a pixel of the reduced image)."""

    def __init__(self, resize: Resize) -> None:
        self.resize = resize

    def __call__(self, image: Image.Image) -> Image.Image:
        target = self.resize.size if isinstance(self.resize.size, int) else min(self.resize.size)
        shorter = min(image.size)
        decoded, _ = decode(image, reduction((shorter, shorter), (target, target)))
        return self.resize(decoded)

    def __repr__(self) -> str:
        return f"ReducedDecodeResize({self.resize!r})"


def with_reduced_decoding(transform: Callable, train: bool) -> Callable:
    """`transform` (a timm Compose) with its first step decoding lazy JPEGs at a reduced scale:
    the random-resized crop for training, the shorter-side resize for evaluation."""
    steps = transform.transforms
    first = steps[0]
    if train and isinstance(first, RandomResizedCropAndInterpolation):
        steps[0] = ReducedDecodeCrop(first)
    elif not train and isinstance(first, Resize) and not isinstance(first, ResizeKeepRatio) and isinstance(steps[1], CenterCrop):
        steps[0] = ReducedDecodeResize(first)
    else:
        raise ValueError(f"reduced decoding needs timm's crop or resize first, got {first!r}")
    transform.takes_lazy_images = True
    return transform


def takes_lazy_images(transform: Callable) -> bool:
    """Whether `transform` decodes the JPEGs it is given (so the loader may hand them over unread)."""
    return bool(getattr(transform, "takes_lazy_images", False))
