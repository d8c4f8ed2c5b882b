"""Several cells in one DeepSpeed launch: the ranks train, evaluate and analyse them one after
another, so a grid pays the launcher's start (runner, per-node launcher, every rank importing
torch, timm and DeepSpeed) and its wind-down once, not once a cell.

The parent writes `DIR/launch.json` (the cells, each with its full train options) and starts
`vitdeep train-cells DIR/launch.json` under the launcher. Rank 0 prints a marker line as each cell
starts; the parent splits the output into the cells' logs by it and keeps their status. A cell
that fails ends the launch (as its own run would have ended); the parent records it and starts
the cells after it in a new launch.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Any

from vitdeep.errors import UserError

LAUNCH_FILE = "launch.json"
#: Rank 0's line as a cell starts: `ablate cell 2 of 7 (cos): vitdeep train …`.
MARKER = re.compile(r"ablate cell (\d+) of (\d+) \(")


def marker_line(index: int, total: int, name: str, command: str) -> str:
    return f"ablate cell {index} of {total} ({name}): {command}"


def marked_index(line: str) -> int | None:
    """The grid position (1-based) a marker line announces, else None."""
    found = MARKER.search(line)
    return int(found.group(1)) if found else None


def write_launch(out: Path, recipe: Path | None, total: int, cells: list[dict[str, Any]]) -> Path:
    """`DIR/launch.json`: per cell its grid position, name, train options and the command it equals."""
    from vitdeep.paths import write_json_atomic

    path = Path(out) / LAUNCH_FILE
    write_json_atomic(path, {"recipe": str(recipe) if recipe else None, "total": total, "cells": cells})
    return path


def train_cells(path: Path) -> None:
    """The ranks' side: each cell of `path` as `vitdeep train` would run it, then its evaluation
    (on every rank) and analysis (on rank 0); an error ends the launch like the cell's own run.
    The cells replay the training batches the first of them read (`vitdeep.data.replay`)."""
    import json

    import torch
    import torch.distributed as dist

    from vitdeep.ablate.cells import finish_cell
    from vitdeep.config import resolve_config
    from vitdeep.data.pipeline import StreamReplay
    from vitdeep.planner.memory import check_fits
    from vitdeep.engine.loop import plan_from_env, train
    from vitdeep.monitor import is_main_process

    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the cells to train from {path}: {error}") from None
    replay = StreamReplay()
    for cell in spec["cells"]:
        if is_main_process():
            print(marker_line(cell["index"], spec["total"], cell["name"], cell["command"]), flush=True)
        plan = plan_from_env(resolve_config(cell["options"], spec["recipe"]))
        check_fits(plan)
        if dist.is_initialized():
            # from the second cell on the process group exists: without this, rank 0 could lock the
            # cell's --out before a slower rank's plan checked it, which then sees a live holder
            dist.barrier()
        train(plan, replay)
        gc.collect()  # the cell's engine, optimizer and data before the next cell's
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        finish_cell(Path(cell["options"]["out"]))
