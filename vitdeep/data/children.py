"""Processes that cannot outlive the process that started them.

A data-loader worker blocked on a stalled read, or a `pipe:` command waiting on its network,
never gets to notice that the run above it ended; if that run was killed (SIGKILL, the OOM killer,
a scheduler) nothing else tells it either, and it lives on as an orphan. Linux can: a process
that asks `prctl(PR_SET_PDEATHSIG, SIGKILL)` is killed by the kernel when its parent thread ends,
however it ends. The request survives `exec` (so the command itself, not just its shell, carries
it) but not `fork`: every process we start asks for itself. Elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
# Resolved once here: a subprocess's `preexec_fn` runs between fork and exec, where loading a
# library is not safe.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(parent: int, death_signal: int = signal.SIGKILL) -> None:
    """Have the kernel send `death_signal` to this process when its parent (pid `parent`) ends;
    if the parent has already gone (it may end before the request is made), take it now."""
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), death_signal)


def child_setup(death_signal: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen` that ties the child to this process's life."""
    return functools.partial(die_with_parent, os.getpid(), death_signal)
