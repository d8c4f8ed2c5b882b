"""Randomness drawn per sample from the sample's own seed, so it does not depend on the batch a
sample lands in (`vitdeep.data.lanes` gives every training sample a 64-bit seed).

`derive(seeds, purpose)` gives each sample an independent seed per purpose (erasing, drop path,
mixing), and `uniforms(seeds, purpose, count)` that many U[0, 1) numbers per sample, both by
splitmix64 (a 64-bit hash whose outputs on consecutive inputs pass BigCrush), vectorised in numpy:
a micro-batch's draws cost microseconds, with no generator to create per sample.
"""

from __future__ import annotations

import numpy as np

ERASE, DROP_PATH, MIX, AUGMENT = 1, 2, 3, 4
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64 of one Python int (the same finaliser as `splitmix64`, without numpy's per-call cost)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of `x + golden ratio` (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def as_uint64(seeds) -> np.ndarray:
    """Seeds as uint64 (they travel as int64 tensors: the same 64 bits)."""
    array = seeds.numpy() if hasattr(seeds, "numpy") else np.asarray(seeds)
    return array.astype(np.int64, copy=False).view(np.uint64)


def derive(seeds, purpose: int) -> np.ndarray:
    """One uint64 seed per sample for `purpose`."""
    with np.errstate(over="ignore"):
        return splitmix64(splitmix64(as_uint64(seeds)) + np.uint64(purpose) * _GOLDEN)


def uniforms(seeds, purpose: int, count: int) -> np.ndarray:
    """`[len(seeds), count]` float64 in [0, 1) for `purpose`, a row per sample."""
    base = derive(seeds, purpose)[:, None]
    with np.errstate(over="ignore"):
        bits = splitmix64(base + np.arange(count, dtype=np.uint64)[None, :] * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
