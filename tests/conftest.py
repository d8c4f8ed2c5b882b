"""Shared fixtures: real images (scikit-learn's digits written as PNG files)."""

import os

import pytest

from vitdeep.data.digits import write_digits_imagefolder

# DeepSpeed selects its accelerator from the environment; this suite runs on the CPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """ImageFolder tree `train/<digit>/*.png` (1,500) and `val/<digit>/*.png` (297) of real scans."""
    root = tmp_path_factory.mktemp("digits")
    write_digits_imagefolder(root)
    return root


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory):
    """The built-in demo set as real tar shards: `train-*.tar` (1,500) and `val-*.tar` (297)."""
    from vitdeep.data.shards import write_demo_shards

    out = tmp_path_factory.mktemp("digit-shards")
    write_demo_shards(out)
    return out
