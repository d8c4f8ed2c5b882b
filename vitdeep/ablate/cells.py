"""A grid's folder and its cells' state: where each cell's run, status and log live, whether it is
trained or finished, and finishing one (evaluate, analyse). Shared by running the grid (`run.py`),
its one-launch training (`launch.py`), Slurm arrays (`slurm.py`) and the results (`results.py`).
The folder's layout is `run.py`'s docstring."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdeep.ablate.grid import CellRun, Grid
from vitdeep.errors import UserError

GRID_FILE = "grid.json"


@dataclass
class Ablation:
    """A grid resolved for one folder: the cells' runs and what they share."""

    grid: Grid
    out: Path
    runs: list[CellRun]
    data: str
    val: str
    ranks: int
    #: The demo recipe file the cells' options lie over (--demo), else None.
    recipe: Path | None = None

    def cell_dir(self, name: str) -> Path:
        return cell_dir(self.out, name)

    def number(self, run: CellRun) -> int:
        """The cell's place in the grid, from 1 (by name, which is unique: a list search per cell
        would be quadratic in a grid of thousands)."""
        return self._numbers[run.name]

    @functools.cached_property
    def _numbers(self) -> dict[str, int]:
        return {run.name: number for number, run in enumerate(self.runs, 1)}

    def cell_options(self, run: CellRun) -> dict[str, Any]:
        """The cell's full train options: its own and the shared ones, its data and folder, and
        `resume: auto` once its folder exists."""
        folder = self.cell_dir(run.name)
        return {"data": self.data, "val": self.val, "out": str(folder), **run.options,
                **({"resume": "auto"} if folder.exists() else {})}

    def train_args(self, run: CellRun) -> list[str]:
        """`vitdeep train …` of one cell, as its options say."""
        from vitdeep.launcher import option_flags

        return ["train", *(["--config", str(self.recipe)] if self.recipe else []), *option_flags(self.cell_options(run))]

    def record(self) -> dict[str, Any]:
        """`grid.json`: the layout `--collect` needs, and each cell's options (a rerun must match them)."""
        return {
            "grid": self.grid.describe(),
            "data": self.data,
            "val": self.val,
            "recipe": str(self.recipe) if self.recipe else None,
            "cells": [{"name": run.name, "group": run.group, "options": run.own, "train_options": run.options,
                       "columns": columns_of(self.grid, run)} for run in self.runs],
        }


def cell_dir(out: Path, name: str) -> Path:
    return Path(out) / "cells" / name


def status_file(out: Path, name: str) -> Path:
    return Path(out) / "status" / f"{name}.json"


def log_file(out: Path, name: str) -> Path:
    return Path(out) / "logs" / f"{name}.log"


def columns_of(grid: Grid, run: CellRun) -> dict[str, Any]:
    """The cell's value in each table column: the option it ran with, or its named-axis variant."""
    flat = run.config.flat()
    return {heading: flat[option] if option else run.cell.variants[heading] for heading, option in grid.columns}


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def is_trained(folder: Path) -> bool:
    return (folder / "summary.json").is_file()


def finish_files(folder: Path) -> list[Path]:
    """What finishing writes into a trained cell: eval.json, eval_ema.json (with an EMA), analysis."""
    config = read_json(folder / "config.json") or {}
    ema = config.get("optim", {}).get("ema_decay", 0) > 0
    return [folder / "eval.json", *([folder / "eval_ema.json"] if ema else []), folder / "analysis" / "metrics.json"]


def is_finished(folder: Path) -> bool:
    return is_trained(folder) and all(path.is_file() for path in finish_files(folder))


def finish_cell(folder: Path) -> None:
    """Evaluate a trained cell on its validation shards (raw and EMA) and analyse its
    over-smoothing there, with the crop ratio it was validated at: in one process, or on every
    rank of a launch (the evaluation split between them, the analysis on rank 0). A rerun
    replaces the cell's earlier evaluation and analysis: they are its own."""
    import torch.distributed as dist

    from vitdeep.commands.analyze import run_analyze
    from vitdeep.commands.eval import run_eval
    from vitdeep.monitor import is_main_process

    config = read_json(folder / "config.json")
    if config is None:
        raise UserError(f"{folder} has no readable config.json")
    val, crop_ratio, workers = config["data"]["val"], config["augment"]["crop_ratio"], config["data"]["workers"]
    if not val:
        raise UserError(f"{folder} was trained without --val: nothing to evaluate the cell on")
    run_eval(str(folder), val, out=folder / "eval.json", crop_ratio=crop_ratio, workers=workers, overwrite=True)
    if config["optim"]["ema_decay"] > 0:
        run_eval(str(folder), val, out=folder / "eval_ema.json", crop_ratio=crop_ratio, workers=workers, ema=True,
                 overwrite=True)
    if is_main_process():
        run_analyze(model=None, checkpoint=folder, images=None, data=val, out=folder / "analysis", crop_ratio=crop_ratio,
                    overwrite=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def update_status(out: Path, name: str, **changes: Any) -> dict[str, Any]:
    from vitdeep.paths import write_json_atomic

    path = status_file(out, name)
    status = {"status": "pending", "error": None, "attempts": 0, "wall_s": 0.0, **(read_json(path) or {}), **changes}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, status)
    return status


def finish_or_error(console, folder: Path) -> str | None:
    """Finish a trained cell; the error line when that fails (the grid goes on)."""
    try:
        finish_cell(folder)
    except UserError as error:
        return f"error: {error}"
    except Exception as error:
        console.print_exception()
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def clock(seconds: float | None) -> str:
    """`h:mm:ss`, or – when unknown."""
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
