"""Shared fixtures: real images (scikit-learn's digits written as PNG files); and the rule that
only a test marked `slow` starts another vitdeep process (`make test-fast` leaves those out)."""

import os
import subprocess
from pathlib import Path

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


#: Programs that start vitdeep ranks or another vitdeep process.
LAUNCHERS = {"deepspeed", "torchrun", "vitdeep"}
#: `python -m MODULE` forms of the same.
LAUNCHER_MODULES = {"vitdeep", "torch.distributed.run", "deepspeed.launcher.runner", "deepspeed.launcher.launch"}
_running_slow_test = False
_popen_init = subprocess.Popen.__init__


def launches_vitdeep(args) -> bool:
    """Whether a `subprocess.Popen` argument list starts a vitdeep process (directly or through a
    launcher). Tests that start ranks through a launch script say so with their own `slow` mark."""
    argv = [os.fspath(arg) for arg in args] if isinstance(args, (list, tuple)) else str(args).split()
    names = [Path(arg).name for arg in argv]
    if any(name in LAUNCHERS for name in names):
        return True
    return any(arg == "-m" and nxt in LAUNCHER_MODULES for arg, nxt in zip(argv, argv[1:]))


def _guarded_popen_init(self, args, *rest, **kwargs):
    if not _running_slow_test and launches_vitdeep(args):
        raise AssertionError(f"a test that starts vitdeep processes must be marked slow: {args}")
    _popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _guarded_popen_init


def pytest_runtest_setup(item):
    global _running_slow_test
    _running_slow_test = item.get_closest_marker("slow") is not None

