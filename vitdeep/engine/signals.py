"""Stopping a run cleanly on SIGTERM, SIGUSR1 or SIGINT (preemption, a time limit, Ctrl-C).

A handler only records the signal. The ranks agree on it with a collective at the next step
boundary (and between validation batches), save a checkpoint there together and exit with
`EXIT_STOPPED`, so a scheduler can requeue the job and `--resume auto` continue it. The one
exception to "record only": while the process waits for data, the handler interrupts the wait
(`StopFlag.interruptible`), because a stalled loader would otherwise keep the run from ever
reaching the boundary. A second SIGINT stops the process at once (the default action).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from vitdeep.data.pipeline import STOP_SIGNALS

#: Exit code of a run stopped by a signal after saving (EX_TEMPFAIL: try again, i.e. resume).
EXIT_STOPPED = 75


class WaitInterrupted(Exception):
    """Raised inside an interruptible wait when a stop signal arrives."""


class StopFlag:
    """Records the first stop signal; `number` is 0 until one arrives."""

    def __init__(self, announce: bool) -> None:
        self.number = 0
        self._announce = announce
        self._waiting = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: object) -> None:
        first = not self.number
        self.number = self.number or number
        if number == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops at once
        if first and self._announce:
            again = " (Ctrl-C again stops at once, without it)" if number == signal.SIGINT else ""
            os.write(2, f"\n{signal_name(number)}: stopping at the next step boundary with a checkpoint{again}\n".encode())
        if self._waiting:
            raise WaitInterrupted

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A wait (for data) that a stop signal cuts short with `WaitInterrupted`."""
        if self.number:
            raise WaitInterrupted
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False


def signal_name(number: int) -> str:
    return signal.Signals(number).name


@contextmanager
def stop_flag(announce: bool) -> Iterator[StopFlag]:
    """Install the handlers for the duration of a run; the previous ones come back afterwards."""
    flag = StopFlag(announce)
    flag.install()
    try:
        yield flag
    finally:
        flag.restore()


class StopRequested(Exception):
    """Every rank has agreed that a stop signal arrived (`number` is the signal)."""

    def __init__(self, number: int) -> None:
        super().__init__(signal_name(number))
        self.number = number
