"""`vitdeep shards`: write the shards with a progress bar and a summary table (the writing itself
is `vitdeep.data.shards`, which prints nothing)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

from rich.table import Table

from vitdeep.data.shards import write_demo_shards, write_shards
from vitdeep.monitor import image_progress, make_console


def run_shards(src: str | Path, out: str | Path, **options: Any) -> dict:
    """`write_shards(src, out, **options)`, shown as it goes."""
    return _shown(lambda **report: write_shards(src, out, **options, **report), out)


def run_demo_shards(out: str | Path, **options: Any) -> dict:
    """`write_demo_shards(out, **options)`, shown as it goes."""
    return _shown(lambda **report: write_demo_shards(out, **options, **report), out)


def _shown(write: Callable[..., dict], out: str | Path) -> dict:
    rows: list[tuple[dict, Counter, float]] = []
    with image_progress() as progress:
        info = write(progress=progress, on_split=lambda entry, skipped, seconds: rows.append((entry, skipped, seconds)))
    table = Table(title=f"Shards written to {out} ({info['num_classes']} classes)")
    for column in ("split", "shards", "images", "size", "skipped files", "time", "images/s"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for entry, skipped, seconds in rows:
        table.add_row(
            entry["name"], str(len(entry["filenames"])), f"{entry['num_samples']:,}", f"{entry['bytes'] / 1e6:,.1f} MB",
            f"{sum(skipped.values()):,}", f"{seconds:.1f} s", f"{entry['num_samples'] / max(seconds, 1e-9):,.0f}",
        )
    console = make_console()
    console.print(table)
    for entry, skipped, _ in rows:
        if skipped:
            console.print(f"{entry['name']}: passed over " + ", ".join(f"{count:,} {why}" for why, count in skipped.items()),
                          markup=False)
    return info
