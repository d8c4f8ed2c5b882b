"""Running a grid on this machine: every cell a normal vitdeep run under the DeepSpeed launcher,
one after another (in one launch, `vitdeep.ablate.launch`), resumable, a failing cell recorded
and passed over.

Layout of the grid's folder:

    DIR/grid.json              the grid as run: its table layout, every cell's train options
    DIR/cells/<name>/          the cell's vitdeep run, then eval.json (eval_ema.json) and analysis/
    DIR/status/<name>.json     attempts, wall time, and the error line of a failed attempt
    DIR/launch.json            the cells the last launch was asked to run
    DIR/logs/<name>.log        the cell's console output
    DIR/shards/                the digits (--demo)
    DIR/results.{json,md,png}  the table (vitdeep.ablate.results)

A cell is trained once its run wrote `summary.json` and finished once it was evaluated and
analysed (by the launch's ranks right after training). Rerunning skips finished cells, finishes
trained ones, and launches the others with `--resume auto` wherever their folder exists (from the
newest complete checkpoint, or afresh).
"""

from __future__ import annotations

import shlex
import statistics
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from vitdeep.ablate.cells import (
    GRID_FILE,
    Ablation,
    clock,
    finish_or_error,
    is_finished,
    is_trained,
    log_file,
    read_json,
    status_file,
    update_status,
)
from vitdeep.ablate.grid import CellRun, format_value
from vitdeep.ablate.launch import LAUNCH_FILE, marked_index, write_launch
from vitdeep.ablate.results import RESULT_FILES, collect
from vitdeep.ablate.slurm import SBATCH_NAME
from vitdeep.errors import TrainingStopped, UserError

# ---- preparing: everything checked before anything is written --------------------------------


def check_same_grid(ablation: Ablation) -> None:
    """A folder holds one grid: a rerun must ask for the same cells with the same options. A folder
    without `grid.json` holds nothing under the names a grid writes (they are not a grid's), and
    no grid writes into the shards it reads."""
    from vitdeep.paths import claim_outputs, data_folders

    recorded = read_json(ablation.out / GRID_FILE)
    outputs = [ablation.out / name for name in ("cells", "status", "logs", LAUNCH_FILE, SBATCH_NAME, *RESULT_FILES)]
    claim_outputs(outputs, [*data_folders(ablation.data), *data_folders(ablation.val)], flag="--out",
                  overwrite=None if recorded is None else True)
    if recorded is None:
        return
    now = ablation.record()
    for key in ("data", "val", "recipe"):
        if recorded.get(key) != now[key]:
            raise UserError(f"{ablation.out} holds a grid run with {key}={recorded.get(key)}, not {now[key]}: use another --out")
    theirs = {cell["name"]: cell["train_options"] for cell in recorded.get("cells", [])}
    ours = {cell["name"]: cell["train_options"] for cell in now["cells"]}
    if list(theirs) != list(ours):
        raise UserError(f"{ablation.out} holds the grid {recorded['grid']['name']} with other cells "
                        f"({', '.join(theirs)}): use another --out")
    for name, options in ours.items():
        if theirs[name] != options:
            changed = sorted(k for k in set(options) | set(theirs[name]) if options.get(k) != theirs[name].get(k))
            raise UserError(f"{ablation.out}: cell {name} ran with other options ({', '.join(f'{k}={theirs[name].get(k)}' for k in changed)}): use another --out")


def check_plans(ablation: Ablation) -> None:
    """Each unfinished cell's full run plan (model, data, batch arithmetic over the ranks, DeepSpeed
    config, its folder), as `vitdeep train` will check it, before any cell starts."""
    from vitdeep.config import resolve_config
    from vitdeep.data.info import DatasetInfo, read_dataset_info
    from vitdeep.engine.run_plan import make_plan

    infos: dict[tuple, DatasetInfo] = {}

    def read_once(urls: Any, num_samples: int | None = None, split: str | None = None) -> DatasetInfo:
        """The cells share their shards: each (shards, count, split) is read once per check."""
        key = (repr(urls), num_samples, split)
        if key not in infos:
            infos[key] = read_dataset_info(urls, num_samples=num_samples, split=split)
        return infos[key]

    for run in ablation.runs:
        folder = ablation.cell_dir(run.name)
        if is_finished(folder):
            continue
        try:
            make_plan(resolve_config(ablation.cell_options(run), ablation.recipe), ablation.ranks, read_info=read_once)
        except UserError as error:
            raise UserError(f"grid {ablation.grid.name}, cell {run.name}: {error}", params=error.params) from None


def write_record(ablation: Ablation) -> None:
    from vitdeep.paths import write_json_atomic

    ablation.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ablation.out / GRID_FILE, ablation.record())


# ---- running -----------------------------------------------------------------------------------


def run_grid(ablation: Ablation) -> dict[str, Any]:
    """Run every unfinished cell, then write the results; returns them.

    Trained cells are finished here; the others train in one launch, and after a cell that
    fails, the cells behind it in a new one."""
    from vitdeep.monitor import make_console

    console = make_console()
    write_record(ablation)
    waiting = []
    for index, run in enumerate(ablation.runs):
        folder = ablation.cell_dir(run.name)
        if is_finished(folder):
            console.print(f"[green]{escape(run.name)}: finished earlier, skipped")
        elif is_trained(folder):
            _show_progress(console, ablation, index)
            _finish_trained(console, ablation, run)
        else:
            waiting.append(run)
    while waiting:
        waiting = _launch(console, ablation, waiting)
    return collect(ablation.out, finish=False)


def _finish_trained(console, ablation: Ablation, run: CellRun) -> None:
    """Finish a cell trained earlier (a grid stopped between its training and its evaluation)."""
    before = read_json(status_file(ablation.out, run.name)) or {}
    update_status(ablation.out, run.name, status="running", attempts=before.get("attempts", 0) + 1)
    start = time.perf_counter()
    error = finish_or_error(console, ablation.cell_dir(run.name))
    _record_end(console, ablation, run, error, before.get("wall_s", 0.0) + time.perf_counter() - start)


def _launch(console, ablation: Ablation, runs: list[CellRun]) -> list[CellRun]:
    """Train, evaluate and analyse `runs` in one DeepSpeed launch; returns the cells it did not
    reach because one before them failed."""
    from vitdeep.launcher import deepspeed_command, run_logged

    cells = [{"index": ablation.number(run), "name": run.name, "options": ablation.cell_options(run),
              "command": shlex.join(["vitdeep", *ablation.train_args(run)])} for run in runs]
    spec = write_launch(ablation.out, ablation.recipe, len(ablation.runs), cells)
    cmd = deepspeed_command(["train-cells", str(spec)], ablation.ranks)
    console.print(f"{len(runs)} cells in one launch: {shlex.join(cmd)}", soft_wrap=True, markup=False, highlight=False)
    tracker = _LaunchTracker(console, ablation, runs)
    try:
        code, line = run_logged(cmd, log_file(ablation.out, runs[0].name), tracker.switch)
    except KeyboardInterrupt:
        raise TrainingStopped(f"interrupted in cell {tracker.current.name}: rerun the same command to resume the grid") from None
    return tracker.end(code, line)


class _LaunchTracker:
    """Follows a launch's cells by rank 0's marker lines: each cell's log, attempts and wall time."""

    def __init__(self, console, ablation: Ablation, runs: list[CellRun]) -> None:
        self.console, self.ablation, self.runs = console, ablation, runs
        self.positions = {ablation.number(run): position for position, run in enumerate(runs)}  # grid's → launch's
        self._begin(0)

    @property
    def current(self) -> CellRun:
        return self.runs[self.position]

    def _begin(self, position: int) -> None:
        """Cell `position` starts (the first one as the launch starts)."""
        self.position, self.started = position, time.perf_counter()
        self.before = read_json(status_file(self.ablation.out, self.current.name)) or {}
        update_status(self.ablation.out, self.current.name, status="running", attempts=self.before.get("attempts", 0) + 1)

    def switch(self, line: str) -> Path | None:
        """The log of the cell a marker line starts (and the previous cell recorded), else None."""
        position = self.positions.get(marked_index(line))
        if position is None:
            return None
        if position != self.position:
            self._end_current(None)
            self._begin(position)
        _show_progress(self.console, self.ablation, self.ablation.number(self.current) - 1)
        return log_file(self.ablation.out, self.current.name)

    def _end_current(self, error: str | None) -> None:
        folder = self.ablation.cell_dir(self.current.name)
        if error is None and not is_finished(folder):
            error = "the launch went on without this cell's evaluation and analysis"
        wall = self.before.get("wall_s", 0.0) + time.perf_counter() - self.started
        _record_end(self.console, self.ablation, self.current, error, wall)

    def end(self, code: int, line: str | None) -> list[CellRun]:
        """Record the last cell once the launch has exited; the cells behind a failed one."""
        failed = code != 0 and not is_finished(self.ablation.cell_dir(self.current.name))
        self._end_current((line or f"the launch exited with code {code}") if failed else None)
        return self.runs[self.position + 1:]


def _record_end(console, ablation: Ablation, run: CellRun, error: str | None, wall_s: float) -> None:
    update_status(ablation.out, run.name, status="failed" if error else "done", error=error, wall_s=round(wall_s, 1))
    if error:
        console.print(f"[red]{escape(run.name)} failed: {escape(error)}[/] (the grid goes on)", soft_wrap=True)


def _show_progress(console, ablation: Ablation, index: int) -> None:
    """The grid's progress above the cell's own: cell i of N, and an ETA from the wall times of
    the cells finished so far (this session's and earlier ones')."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    names = [run.name for run in ablation.runs]
    done = [name for name in names if is_finished(ablation.cell_dir(name))]
    walls = [(read_json(status_file(ablation.out, name)) or {}).get("wall_s") for name in done]
    walls = [seconds for seconds in walls if seconds]
    left = len(names) - len(done)
    eta = clock(statistics.mean(walls) * left if walls and left else None)
    progress = Progress(TextColumn("[bold]ablate {task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                        TextColumn("cells done · ETA {task.fields[eta]}"), console=console)
    progress.add_task(ablation.grid.name, total=len(names), completed=len(done), eta=eta)
    console.rule(f"[bold]cell {index + 1} of {len(names)}: {escape(names[index])}")
    console.print(progress.make_tasks_table(progress.tasks))


def print_dry_run(ablation: Ablation) -> None:
    """`--dry-run`: the cells, their options and state, and the command each would run (nothing is
    written). Plain lines, printed at once: a grid of 10,000 cells lists in a second or two."""
    from vitdeep.launcher import deepspeed_command
    from vitdeep.monitor import make_console

    lines = [f"vitdeep ablate {ablation.grid.name} --dry-run: {len(ablation.runs)} cells in {ablation.out}"]
    for index, run in enumerate(ablation.runs, 1):
        folder = ablation.cell_dir(run.name)
        state = "finished" if is_finished(folder) else "trained" if is_trained(folder) else "resumes" if folder.exists() else "new"
        options = ", ".join(f"{k}={format_value(v)}" for k, v in run.own.items()) or "(shared options only)"
        lines += [f"{index}. {run.name} [{state}]: {options}",
                  f"   {shlex.join(deepspeed_command(ablation.train_args(run), ablation.ranks))}"]
    make_console().print("\n".join(lines), soft_wrap=True, markup=False, highlight=False)
