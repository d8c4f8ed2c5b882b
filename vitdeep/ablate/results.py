"""An ablation grid's results, rebuilt from its folder alone: `results.json` (every number of
every cell), `results.md` (the table in the paper's layout, with ✓ / × for switches and the
paper's numbers beside ours) and `results.png` (top-1 per cell, patch CosSim against depth).
With `--seeds N` each grid cell is N runs: the table and figure show the mean ± the sample
standard deviation over the seeds that finished (`seed_groups`), and the runs' own table follows.

Everything is read from the cells' run folders and `grid.json`, so `--collect` gives the same
files as the run that wrote them, and cells trained elsewhere (a Slurm array) are finished
(evaluated and analysed) here first.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
from pathlib import Path
from typing import Any

from vitdeep.ablate.grid import common_options
from vitdeep.ablate.cells import (
    GRID_FILE,
    cell_dir,
    clock,
    finish_or_error,
    is_finished,
    is_trained,
    read_json,
    status_file,
    update_status,
)
from vitdeep.errors import UserError

RESULT_FILES = ("results.json", "results.md", "results.png")


def collect(out: str | Path, finish: bool = True) -> dict[str, Any]:
    """Write the three result files of the grid folder `out`; with `finish`, first evaluate and
    analyse every trained cell that lacks it. Returns the results."""
    from vitdeep.paths import write_json_atomic
    from vitdeep.monitor import make_console

    out = Path(out)
    record = read_json(out / GRID_FILE)
    if record is None:
        raise UserError(f"{out} is not an ablation folder (no readable {GRID_FILE}): give the --out of a vitdeep ablate run")
    console = make_console()
    if finish:
        for cell in record["cells"]:
            folder = cell_dir(out, cell["name"])
            if is_trained(folder) and not is_finished(folder):
                console.print(f"{cell['name']}: trained, evaluating and analysing it")
                error = finish_or_error(console, folder)
                update_status(out, cell["name"], status="failed" if error else "done", error=error)
    results = {
        "grid": record["grid"], "data": record["data"], "val": record["val"], "recipe": record["recipe"],
        "shared": common_options([cell["train_options"] for cell in record["cells"]]),
        "cells": [cell_result(out, cell, record["grid"]) for cell in record["cells"]],
    }
    results["groups"] = seed_groups(results["cells"])
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(markdown_table(results))
    _write_figure(out / "results.png", results)
    print_table(console, results)
    console.print("wrote " + ", ".join(str(out / name) for name in RESULT_FILES))
    return results


def cell_result(out: Path, cell: dict[str, Any], grid: dict[str, Any]) -> dict[str, Any]:
    folder = cell_dir(out, cell["name"])
    status = read_json(status_file(out, cell["name"])) or {}
    evaluation = read_json(folder / "eval.json") or {}
    ema = read_json(folder / "eval_ema.json") or {}
    summary = read_json(folder / "summary.json") or {}
    analysis = read_json(folder / "analysis" / "metrics.json") or {}
    curves = next(iter(analysis.get("sources", {}).values()), {})
    if is_finished(folder):
        state = "done"
    elif status.get("status") == "failed":
        state = "failed"
    else:
        state = "unfinished" if folder.exists() else "pending"
    group = cell.get("group", cell["name"])
    return {
        "name": cell["name"],
        "group": group,
        "status": state,
        "error": status.get("error") if state == "failed" else None,
        "options": cell["options"],
        "columns": cell["columns"],
        "top1": evaluation.get("top1"),
        "top5": evaluation.get("top5"),
        "ema_top1": ema.get("top1"),
        "ema_top5": ema.get("top5"),
        "published_top1": grid["published"].get(group),
        "last_layer_cossim": curves["cossim"][-1] if curves else None,
        "last_layer_attn_std": curves["attn_std"][-1] if curves else None,
        "cossim": curves.get("cossim"),
        "attn_std": curves.get("attn_std"),
        "images_per_s": _images_per_s(folder),
        "steps": summary.get("steps"),
        "wall_s": status.get("wall_s") or summary.get("seconds"),
    }


def _images_per_s(folder: Path) -> float | None:
    """Median training throughput over the run's logged windows (all ranks together)."""
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    rates = [row["images_per_s"] for row in map(json.loads, lines) if row.get("kind") == "train" and "images_per_s" in row]
    return round(statistics.median(rates), 1) if rates else None


# ---- seeds -------------------------------------------------------------------------------------

#: The numbers of a run averaged over a grid cell's seeds (each also gets a `_std`).
SEED_AVERAGED = ("top1", "top5", "ema_top1", "ema_top5", "last_layer_cossim", "last_layer_attn_std")


def seed_groups(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per grid cell over its seeds (`--seeds`): the mean and the sample standard
    deviation of each number over the seeds that finished, the per-layer CosSim mean and std, the
    range of top-1. Empty when every grid cell is one run."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault(cell["group"], []).append(cell)
    if all(len(members) == 1 for members in groups.values()):
        return []
    return [_group_result(name, members) for name, members in groups.items()]


def _group_result(name: str, members: list[dict[str, Any]]) -> dict[str, Any]:
    done = [cell for cell in members if cell["status"] == "done"]
    result: dict[str, Any] = {"name": name, "seeds": len(members), "done": len(done), "columns": members[0]["columns"],
                              "published_top1": members[0]["published_top1"]}
    for key in SEED_AVERAGED:
        result[key], result[f"{key}_std"] = mean_and_std([cell[key] for cell in done])
    top1 = [cell["top1"] for cell in done if _finite(cell["top1"])]
    result["top1_range"] = [min(top1), max(top1)] if top1 else None
    curves = [cell["cossim"] for cell in done if cell["cossim"]]
    if curves and len({len(curve) for curve in curves}) == 1:
        per_layer = [mean_and_std(values) for values in zip(*curves)]
        result["cossim"], result["cossim_std"] = [m for m, _ in per_layer], [s for _, s in per_layer]
    else:
        result["cossim"] = result["cossim_std"] = None
    return result


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def mean_and_std(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1; 0 for one value) of the finite values; Nones
    when there are none."""
    finite = [float(value) for value in values if _finite(value)]
    if not finite:
        return None, None
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


# ---- the table ---------------------------------------------------------------------------------


def switch_columns(cells: list[dict[str, Any]], headings: list[str]) -> set[str]:
    """Columns shown as ✓ / ×: booleans, and options that are either off (0, '') or one value."""
    switches = set()
    for heading in headings:
        values = {json.dumps(cell["columns"][heading]) for cell in cells}
        decoded = [json.loads(value) for value in values]
        if all(isinstance(v, bool) for v in decoded) or (len(decoded) <= 2 and sum(not v for v in decoded) == 1):
            switches.add(heading)
    return switches


def _shown(value: Any, switch: bool) -> str:
    if switch:
        return "✓" if value else "×"
    if isinstance(value, float):
        return format(value, "g")
    return str(value) if value not in ("", None) else "–"


def _number(value: float | None, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if value is not None else "–"


def _layout(grid: dict[str, Any], entries: list[dict[str, Any]]) -> tuple[list[str], Any, bool, bool]:
    """The option headings, a function showing an entry's option columns, and whether the table
    has EMA and published columns: what the runs' and the seed-averaged tables share."""
    headings = [heading for heading, _ in grid["columns"]]
    switches = switch_columns(entries, headings)

    def options(entry: dict[str, Any]) -> list[str]:
        return [_shown(entry["columns"][h], h in switches) for h in headings]

    return headings, options, any(e["ema_top1"] is not None for e in entries), bool(grid["paper"] or grid["published"])


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the results table, shared by results.md and the console."""
    cells = results["cells"]
    headings, options, with_ema, with_paper = _layout(results["grid"], cells)
    header = ["cell", *headings, "top-1 %", "top-5 %", *(["EMA top-1 %", "EMA top-5 %"] if with_ema else []),
              *(["published top-1 %"] if with_paper else []), "patch CosSim (last layer)", "attention std (last block)",
              "images/s", "wall", "status"]
    rows = []
    for cell in cells:
        rows.append([
            cell["name"], *options(cell), _number(cell["top1"]), _number(cell["top5"]),
            *([_number(cell["ema_top1"]), _number(cell["ema_top5"])] if with_ema else []),
            *([_number(cell["published_top1"])] if with_paper else []),
            _number(cell["last_layer_cossim"], 3), _number(cell["last_layer_attn_std"], 4),
            _number(cell["images_per_s"], 0), clock(cell["wall_s"]), cell["status"],
        ])
    return header, rows


def _spread(mean: float | None, std: float | None, digits: int) -> str:
    return "–" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def group_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the seed-averaged table: mean ± std per grid cell."""
    groups = results["groups"]
    headings, options, with_ema, with_paper = _layout(results["grid"], groups)
    header = ["cell", *headings, "seeds done", "top-1 %", *(["EMA top-1 %"] if with_ema else []),
              *(["published top-1 %"] if with_paper else []), "patch CosSim (last layer)", "attention std (last block)"]
    rows = [[
        group["name"], *options(group), f"{group['done']}/{group['seeds']}",
        _spread(group["top1"], group["top1_std"], 1),
        *([_spread(group["ema_top1"], group["ema_top1_std"], 1)] if with_ema else []),
        *([_number(group["published_top1"])] if with_paper else []),
        _spread(group["last_layer_cossim"], group["last_layer_cossim_std"], 3),
        _spread(group["last_layer_attn_std"], group["last_layer_attn_std_std"], 4),
    ] for group in groups]
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def markdown_table(results: dict[str, Any]) -> str:
    from vitdeep.launcher import option_flags

    grid = results["grid"]
    header, rows = table_rows(results)
    recipe = ["--config", results["recipe"]] if results["recipe"] else []
    command = shlex.join(["vitdeep", "train", *recipe, "--data", results["data"], "--val", results["val"], *option_flags(results["shared"])])
    lines = [
        f"# {grid['title']}",
        "",
        f"Every cell: `{command}`, plus the cell's options (the columns before top-1). "
        "Top-1 / top-5 on the validation shards; patch CosSim and attention std from `vitdeep analyze` there.",
        "",
    ]
    if results.get("groups"):
        seeds = max(group["seeds"] for group in results["groups"])
        lines += [f"Mean ± sample standard deviation over {seeds} seeds (the seeds that finished):", "",
                  *_markdown(*group_rows(results)), "", "Every run:", ""]
    lines += _markdown(header, rows)
    if grid["paper"] or grid["published"]:
        source = grid["paper"] or "the paper"
        lines += ["", f"Published: {source}" + (f", {grid['metric']}" if grid["metric"] else "")
                  + ". A blank (–) where no published number was found for the cell."]
    failures = [cell for cell in results["cells"] if cell["status"] == "failed"]
    if failures:
        lines += ["", "Failed cells:", *(f"- {cell['name']}: {cell['error']}" for cell in failures)]
    return "\n".join(lines) + "\n"


def print_table(console, results: dict[str, Any]) -> None:
    from rich.table import Table

    header, rows = group_rows(results) if results.get("groups") else table_rows(results)
    table = Table(title=results["grid"]["title"])
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _write_figure(path: Path, results: dict[str, Any]) -> None:
    from vitdeep.plots import ablation_figure

    groups = results.get("groups")
    if groups:
        figure = ablation_figure({group["name"]: group["top1"] for group in groups},
                                 {group["name"]: group["cossim"] for group in groups if group["cossim"]}, results["grid"]["title"],
                                 top1_std={group["name"]: group["top1_std"] for group in groups},
                                 cossim_std={group["name"]: group["cossim_std"] for group in groups if group["cossim"]})
    else:
        cells = results["cells"]
        figure = ablation_figure({cell["name"]: cell["top1"] for cell in cells},
                                 {cell["name"]: cell["cossim"] for cell in cells if cell["cossim"]}, results["grid"]["title"])
    figure.savefig(path, dpi=110, metadata={"Software": None})
