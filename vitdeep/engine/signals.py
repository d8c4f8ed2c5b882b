"""Stopping a run cleanly on SIGTERM, SIGUSR1 or SIGINT (preemption, a time limit, Ctrl-C).

Commands with nothing to keep (`eval`, `analyze`) stop where they are instead (`stop_at_once`).

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

from vitdeep.data.pipeline import STOP_SIGNALS, kill_workers
from vitdeep.errors import Terminated

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


@contextmanager
def stop_at_once() -> Iterator[None]:
    """For a command with nothing to keep: a stop signal raises `Terminated` wherever the command
    is, a stalled read included (a second one ends the process at once); its loader workers and
    commands die with it (`vitdeep.data.children`). The previous handlers come back afterwards."""

    def handle(number: int, frame: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        kill_workers()  # now: a loader on its way out would wait for them, seconds each
        raise Terminated(f"stopped by {signal_name(number)} before the end; run the command again")

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
