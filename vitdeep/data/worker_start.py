"""Loader workers that are known to have started, or are started again.

A DataLoader forks its workers from a rank that already runs other threads (gloo's, the
DataLoader's own queue feeders, TensorBoard's writer). On CPython before 3.11.8 (and 3.10.15,
3.9.20) such a fork can deadlock in the child before any of its code runs: the child needs a
runtime lock that another thread held at the instant of the fork, and waits for it forever
(python/cpython#112275, fixed by reinitialising that lock first). The worker then stays alive and
silent, its rank waits for its first batch, and every other rank waits in the next collective:
the run hangs. This project's test suite met it on 3.11.7, in a 2-rank run whose cores another
test's ranks shared.

So every worker reports when its start-up function runs (`mark_started`), and `start_workers`
waits for all of them before handing out the iterator. A worker that does not report within
`START_TIMEOUT` seconds while it lives is taken for such a fork: all workers of that iterator are
killed and started again. No batch has been taken from it yet, so the new workers deliver exactly
what the first ones would have.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.sharedctypes import RawArray
from typing import Any

from vitdeep.errors import UserError

log = logging.getLogger(__name__)

#: Seconds a forked worker may take to reach its start-up function (it needs milliseconds; seconds
#: on cores shared by several ranks).
START_TIMEOUT = 30.0
#: Starts of one iterator's workers before the loader gives up.
START_ATTEMPTS = 3
_POLL = 0.005


def started_flags(workers: int) -> Any:
    """One byte per worker in shared memory, set by the worker itself. Lock-free: a worker
    killed mid-write must not leave a lock held for the next start."""
    return RawArray("b", max(workers, 1))


def mark_started(flags: Any, worker_id: int) -> None:
    """Called first in a worker's start-up function: this worker got past its fork."""
    flags[worker_id] = 1


def start_workers(new_iterator: Callable[[], Iterator], flags: Any, workers: int) -> Iterator:
    """`new_iterator()` (a DataLoader's `iter`), once each of its `workers` has reported through
    `flags`; workers that do not report are killed and all of them started again, up to
    `START_ATTEMPTS` times."""
    if workers == 0:
        return new_iterator()
    for attempt in range(1, START_ATTEMPTS + 1):
        flags[:workers] = [0] * workers
        before = set(multiprocessing.active_children())
        iterator = new_iterator()
        children = [child for child in multiprocessing.active_children() if child not in before]
        silent = _wait_for_flags(flags, workers, children)
        if not silent:
            return iterator
        log.warning("loader worker(s) %s did not start within %.0f s (a fork that deadlocked: python/cpython#112275, "
                    "before CPython 3.11.8); %s", ", ".join(map(str, silent)), START_TIMEOUT,
                    f"starting the workers again (attempt {attempt + 1} of {START_ATTEMPTS})" if attempt < START_ATTEMPTS else "giving up")
        with _kills_unreported():
            for child in children:
                child.kill()
            for child in children:
                child.join()
            iterator = None  # the DataLoader's `__del__` shuts it down and forgets the pids
    raise UserError(f"the data loader's workers did not start in {START_ATTEMPTS} attempts of {START_TIMEOUT:.0f} s each "
                    "(a fork that deadlocks: CPython before 3.11.8 has python/cpython#112275); "
                    "upgrade Python, or run with `workers` 0", params=("workers",))


def _wait_for_flags(flags: Any, workers: int, children: list) -> list[int]:
    """Workers still silent after `START_TIMEOUT` (empty once all reported). A worker that dies
    while starting ends the wait too: the DataLoader reports why on the first batch."""
    deadline = time.monotonic() + START_TIMEOUT
    while not all(flags[:workers]):
        if any(not child.is_alive() for child in children):
            return []
        if time.monotonic() > deadline:
            return [worker for worker in range(workers) if not flags[worker]]
        time.sleep(_POLL)
    return []


@contextlib.contextmanager
def _kills_unreported() -> Iterator[None]:
    """SIGCHLD at its default while a loader's workers are killed: the DataLoader's handler would
    report the kills as a crash. (A stuck worker ignores SIGTERM: its signal handlers are the
    rank's Python ones, which never run in it; hence SIGKILL.)"""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if in_main else None
    try:
        yield
    finally:
        if in_main:
            signal.signal(signal.SIGCHLD, previous)
