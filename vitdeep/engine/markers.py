"""Checkpoint markers: which steps of a run were saved whole, read without torch.

Rank 0 writes a checkpoint's marker `vitdeep.json` (step, epoch, data position, config, and the
size of every file) only after every rank has written its part, so a directory with a well-formed
marker is a complete save. The CLI's light commands (`vitdeep fit-world`, the planner) read them
here without importing torch; `vitdeep.engine.checkpoint` checks the files themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "vitdeep.json"
CHECKPOINTS = "checkpoints"
#: Marker fields every checkpoint has, with their types (a marker without them is damaged).
MARKER_FIELDS = {"step": int, "epoch": int, "batch_in_epoch": int, "model": str, "model_kwargs": dict,
                 "zero_stage": int, "world_size": int, "config": dict}


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def marker_problem(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(marker, None) for a well-formed marker, else (None, what is wrong with it)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except FileNotFoundError:
        return None, f"no {MARKER} (an interrupted save?)"
    except (OSError, json.JSONDecodeError) as error:
        return None, f"{MARKER} is unreadable ({first_line(error)})"
    if not isinstance(marker, dict):
        return None, f"{MARKER} is not a JSON object"
    wrong = [name for name, kind in MARKER_FIELDS.items() if not isinstance(marker.get(name), kind) or isinstance(marker.get(name), bool)]
    if wrong:
        return None, f"{MARKER} lacks {', '.join(wrong)}"
    return marker, None


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of a checkpoint directory when it is well formed, else None."""
    return marker_problem(path)[0]


def marked(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, marker) of each checkpoint with a well-formed marker under `out/checkpoints`, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(p, read_marker(p)) for p in root.iterdir() if p.is_dir()]
    return sorted(((p, m) for p, m in found if m is not None), key=lambda pm: pm[1]["step"])


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints whose save finished (well-formed marker) under `out/checkpoints`, oldest first."""
    return [path for path, _ in marked(out)]
