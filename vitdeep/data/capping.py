"""Capped shards (`vitdeep shards --max-size N`): images whose shorter side exceeds N are stored
resized to N and re-encoded as JPEG, as FFCV's `max_resolution` and img2dataset's resize do.

Decoding is most of the input pipeline's cost and grows with the pixels, so a 224 px run reads a
shard capped at 256 or so far faster than one of full-size photos. Opt-in: without a cap the
shards keep every file's bytes as they came. Images already within the cap are stored untouched.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from vitdeep.data.options import DEFAULT_QUALITY, MAX_MAX_SIZE, MIN_MAX_SIZE
from vitdeep.errors import UserError
from vitdeep.fields import shown



@dataclass(frozen=True)
class Cap:
    """Shorter sides above `max_size` are resized to it and stored as JPEG of `quality`."""

    max_size: int
    quality: int = DEFAULT_QUALITY

    def __post_init__(self) -> None:
        if not isinstance(self.max_size, int) or not MIN_MAX_SIZE <= self.max_size <= MAX_MAX_SIZE:
            raise UserError(f"`max_size` must be a whole number of pixels in {MIN_MAX_SIZE}..{MAX_MAX_SIZE}, got {shown(self.max_size)}",
                            params=("max_size",))
        if not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise UserError(f"`quality` must be a JPEG quality in 1..100, got {shown(self.quality)}", params=("quality",))

    def record(self) -> dict:
        """What `_info.json` says of the cap."""
        return {"max_size": self.max_size, "quality": self.quality}


def cap_options(max_size: int | None, quality: int | None) -> Cap | None:
    """The cap asked for, or None (images stored as they came); a quality alone is refused, since
    only capped images are re-encoded."""
    if max_size is None:
        if quality is not None:
            raise UserError("`quality` sets the JPEG quality of images re-encoded by `max_size`: give `max_size` too",
                            params=("quality", "max_size"))
        return None
    return Cap(max_size, DEFAULT_QUALITY if quality is None else quality)


def capped_size(size: tuple[int, int], max_size: int) -> tuple[int, int] | None:
    """(width, height) with the shorter side at `max_size`, the aspect ratio kept (rounded); None
    when the image is within the cap."""
    width, height = size
    shorter = min(width, height)
    if shorter <= max_size:
        return None
    return max(1, round(width * max_size / shorter)), max(1, round(height * max_size / shorter))


def cap_image(data: bytes, cap: Cap) -> bytes | None:
    """The image resized to the cap (bicubic, antialiased) and re-encoded as RGB JPEG, or None
    when it is within the cap (stored as it came). Raises what PIL raises on a file it cannot
    decode."""
    with Image.open(io.BytesIO(data)) as image:
        target = capped_size(image.size, cap.max_size)
        if target is None:
            return None
        image.draft("RGB", (2 * target[0], 2 * target[1]))  # libjpeg's DCT scaling, keeping twice the target for the resize
        resized = image.convert("RGB").resize(target, Image.BICUBIC)
    out = io.BytesIO()
    resized.save(out, "JPEG", quality=cap.quality)
    return out.getvalue()
