"""The sample ledger (`--sample-ledger`): which samples every optimizer step consumed, and where.

Each rank appends one JSON line per step to `OUT/ledger/rank_NNNNN.jsonl`:
`{"step": s, "epoch": e, "samples": [[position, key, substitute], …]}` with the global position
of each sample in the step's batch (`vitdeep.data.lanes`), its key, and the key of the image used
in its place when it was bad or missing (else null). A resumed run first drops the rows past its
checkpoint, as it does for the metrics, so the files always tell one run's history; `read_ledger`
merges the ranks' rows by step, whatever number of ranks wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitdeep.data.lanes import TrainBatch
from vitdeep.engine.jsonl import step_rows, trim_step_rows

LEDGER = "ledger"


class SampleLedger:
    """One rank's ledger file, a row per optimizer step."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path = Path(out) / LEDGER / f"rank_{rank:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: list[list[Any]] = []

    def add(self, batch: TrainBatch) -> None:
        """Note a micro-batch of the step under way."""
        self._rows += [[position, key, substitute] for position, key, substitute in zip(batch.positions, batch.keys, batch.substitutes)]

    def write_step(self, step: int, epoch: int) -> None:
        """Append the finished step's row."""
        row = {"step": step, "epoch": epoch, "samples": sorted(self._rows)}
        with self.path.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        self._rows = []


def trim_ledgers(out: Path, step: int) -> None:
    """Drop every rank's rows past `step` (a resumed run records those steps again)."""
    for path in sorted((Path(out) / LEDGER).glob("rank_*.jsonl")):
        trim_step_rows(path, step)


def read_ledger(out: Path) -> dict[int, dict[str, Any]]:
    """Step → {"epoch", "samples": [[position, key, substitute], …] of all ranks, by position}."""
    merged: dict[int, dict[str, Any]] = {}
    for path in sorted((Path(out) / LEDGER).glob("rank_*.jsonl")):
        for row in step_rows(path):
            entry = merged.setdefault(row["step"], {"epoch": row["epoch"], "samples": []})
            entry["samples"] += row["samples"]
    for entry in merged.values():
        entry["samples"].sort()
    return merged
