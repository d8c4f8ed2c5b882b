"""What a person sees: the rich console, progress bars, and (later) TensorBoard / JSON-lines logs.

Named `monitor` rather than the design's `logging` so it never shadows the standard library's
`logging` module inside the package.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from vitdeep.errors import UserError
from vitdeep.ranks import read_ranks

#: Width when output goes to a file or pipe (rich would assume 80 columns and cut tables and the
#: progress line's loss terms); on a terminal its own width is used.
LOG_WIDTH = 200


def global_rank() -> int:
    """This process's rank, 0 when alone. Also 0 in an environment `vitdeep.ranks` refuses, so
    that every process meeting that refusal prints it (the printer asks this: it never raises)."""
    try:
        return read_ranks().rank
    except UserError:
        return 0


def is_main_process() -> bool:
    """Global rank 0 prints progress and writes logs; other ranks stay quiet."""
    return global_rank() == 0


def make_console(stderr: bool = False) -> Console:
    probe = Console(stderr=stderr)
    width = probe.width if probe.is_terminal else LOG_WIDTH
    return Console(stderr=stderr, width=width, quiet=not is_main_process())


def progress_bar(console: Console | None = None, transient: bool = False):
    """A rich progress bar with count, rate and ETA (quiet on ranks other than 0)."""
    from rich.progress import TaskProgressColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console or make_console(stderr=True),
        transient=transient,
        disable=not is_main_process(),
    )


class ImageRateColumn(ProgressColumn):
    """Images per second (rich's own speed column counts bytes)."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.1f} img/s" if task.speed else "– img/s", style="progress.data.speed")


def image_progress(console: Console | None = None, show: bool = True) -> Progress:
    """Count, images/s and ETA, for jobs that stream images (writing shards, `analyze`)."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), ImageRateColumn(), TimeRemainingColumn(),
        console=console or make_console(stderr=True), disable=not show,
    )


class RunLogger:
    """TensorBoard scalars, a JSON-lines metrics file and, when `open_tracker` gives one, an
    experiment tracker (`vitdeep.trackers`): all written by global rank 0 only.

    `purge_step` (a resumed run: its checkpoint's step + 1) makes TensorBoard drop the events the
    interrupted run wrote from that step on, as they are logged again.
    """

    def __init__(self, out: str | Path, enabled: bool | None = None, purge_step: int | None = None,
                 open_tracker: Callable[[], Any] | None = None) -> None:
        self.enabled = is_main_process() if enabled is None else enabled
        self.out = Path(out)
        self._writer = None
        self._jsonl = None
        self._tracker = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.out.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.out / "tb"), purge_step=purge_step)
            self._jsonl = open(self.out / "metrics.jsonl", "a", buffering=1)
            self._tracker = open_tracker() if open_tracker is not None else None

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._writer.add_scalar(f"{kind}/{name}", value, step)
        self._jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        if self._tracker is not None:
            self._tracker.scalars(step, {f"{kind}/{name}": value for name, value in values.items()})

    def event(self, step: int, kind: str, message: str, values: dict[str, float]) -> None:
        """One event (e.g. the over-smoothing alarm): a TensorBoard text under `kind/event`, and a
        metrics row of that kind with the message and the values."""
        if not self.enabled:
            return
        self._writer.add_text(f"{kind}/event", message, step)
        self._jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), "message": message, **values}) + "\n")
        if self._tracker is not None:
            self._tracker.text(step, f"{kind}/event", message)

    def close(self, failed: bool = False) -> None:
        """Flush and close the logs; the tracker's run ends as finished, or as failed (`failed`:
        an error or a stop ended the run)."""
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
            if self._tracker is not None:
                self._tracker.close(failed)
