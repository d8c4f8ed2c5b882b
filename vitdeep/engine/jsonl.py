"""JSON-lines logs keyed by optimizer step (`metrics.jsonl`, the sample ledger): read them, and drop
the rows past a checkpoint when a run resumes (the steps after it are logged again)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def step_rows(path: Path) -> list[dict[str, Any]]:
    """The file's rows that are objects with an integer `step`; a line cut off by an interruption is left out."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def trim_step_rows(path: Path, step: int) -> None:
    """Keep only the rows up to `step` (atomically; a missing file stays missing)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [json.dumps(row) for row in step_rows(path) if row["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)
