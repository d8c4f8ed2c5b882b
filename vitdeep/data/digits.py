"""The built-in demo data: scikit-learn's handwritten digits (1,797 real 8×8 scans, 10 classes)
written as real PNG files in ImageFolder layout. No download; scikit-learn is the `demo` extra."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vitdeep.errors import UserError

#: Fixed split of the 1,797 scans: 1,500 train / 297 held-out.
VAL_COUNT = 297
SPLIT_SEED = 0


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] scaled from 0..16 to 0..255, labels int [1797])."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise UserError("the demo data needs scikit-learn: pip install 'vitdeep[demo]'") from error
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def write_digits_imagefolder(out: str | Path, limit: int | None = None, size: int | None = None) -> dict[str, int]:
    """Write `out/train/<digit>/<index>.png` and `out/val/<digit>/<index>.png`.

    The split is fixed (seeded), so every machine builds the same held-out set. `limit` keeps
    only the first images of each split (for quick tests); `size` upscales the scans (bicubic) to
    `size`×`size` px, so the files decode like full-size images. Returns the count per split.
    """
    images, labels = load_digits_arrays()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    splits = {"val": order[:VAL_COUNT], "train": order[VAL_COUNT:]}
    counts = {}
    for split, indices in splits.items():
        indices = indices[:limit] if limit else indices
        for index in indices:
            folder = Path(out) / split / str(labels[index])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[index])
            if size:
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            image.save(folder / f"{index:04d}.png")
        counts[split] = len(indices)
    return counts
