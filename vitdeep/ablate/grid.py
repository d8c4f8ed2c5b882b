"""Ablation grids: a bundled name or a YAML file → named cells, each one set of train options.

A grid file holds `base:` (train options every cell shares) and either `axes:` (the cartesian
product of its axes) or `cells:` (an explicit list). An axis is an option with a list of values
(`attnscale: [false, true]`, cells named `attnscale=false` …) or a label with named option sets
(`objective: {ce: {contrastive_weight: 0}, losses: {}}`, cells named by the set). Optional keys:
`title`, `paper` and `metric` (where the grid is a paper's table), `published` (cell name → the
paper's number), `columns` (option → column heading), `demo` (options laid over the demo recipe
for `--demo`). Every cell is checked against the run config before anything is written.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitdeep.documents import read_document
from vitdeep.errors import UserError
from vitdeep.fields import check_number, clip, shown, within

GRID_DIR = Path(__file__).resolve().parent.parent / "grids"
#: Under a grid's `demo` options: each cell validates once, after its last epoch, as the table
#: reads only that (and the cell's evaluation reads its checkpoint again). Training is unchanged:
#: the none and cos+cons cells of gong-table1 give the demo's two runs to the last digit.
DEMO_DEFAULTS = {"val_every": 0}
GRID_KEYS = ("title", "paper", "metric", "base", "demo", "axes", "cells", "published", "columns")
#: Options the ablation sets itself for every cell: the shared data, the cell's folder, resuming.
RESERVED = ("data", "val", "out", "resume")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]*$")
#: The most cells a grid may have unless `--max-cells` says more: each is a training run, and a
#: product of a few long axes quickly holds more than any machine runs (or has memory to list).
MAX_CELLS = 10_000
#: The longest cell name: it names a folder (file systems take 255 bytes).
MAX_NAME = 200
#: A paper's published number (a top-1 in %, or another metric of the grid's).
PUBLISHED = within(-1e9, 1e9)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its name, the options it sets, and its place on each named axis.
    With `--seeds N` a grid cell is N runs, `NAME,seed=S`, whose `group` is the grid cell's name."""

    name: str
    options: dict[str, Any]
    variants: dict[str, str] = field(default_factory=dict)
    group: str | None = None


@dataclass(frozen=True)
class Grid:
    name: str
    title: str
    base: dict[str, Any]
    demo: dict[str, Any]
    cells: list[Cell]
    #: Table columns in order: (heading, option name, or None for a named axis).
    columns: list[tuple[str, str | None]]
    paper: str | None = None
    metric: str | None = None
    published: dict[str, float] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What `grid.json` records of the grid (the table layout `--collect` needs)."""
        return {"name": self.name, "title": self.title, "paper": self.paper, "metric": self.metric,
                "columns": [list(column) for column in self.columns], "published": self.published}


def bundled_grids() -> dict[str, Path]:
    return {path.stem: path for path in sorted(GRID_DIR.glob("*.yaml"))}


def load_grid(spec: str, max_cells: int = MAX_CELLS) -> Grid:
    """A bundled grid by name, or a grid YAML file."""
    bundled = bundled_grids()
    if spec in bundled:
        return parse_grid(spec, read_document(bundled[spec], "grid"), max_cells)
    path = Path(spec)
    if path.is_file():
        return parse_grid(path.stem, read_document(path, "grid"), max_cells)
    if path.suffix in (".yaml", ".yml") or "/" in spec:
        raise UserError(f"grid file not found: {clip(spec, 200)}")
    raise UserError(f"unknown grid {shown(spec)} (bundled: {', '.join(bundled)}; or give a YAML file)")


def parse_grid(name: str, raw: Any, max_cells: int = MAX_CELLS) -> Grid:
    """Check the grid's shape and expand it into cells (the options are checked by
    `resolve_cells`). The cells are counted first: a grid of more than `max_cells` is refused
    before any is built (a product of a few long axes grows past any machine's memory)."""
    where = f"grid {name}"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping with base: and axes: or cells:")
    unknown = [key for key in raw if key not in GRID_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key {shown(unknown[0])} (a grid has {', '.join(GRID_KEYS)})")
    if ("axes" in raw) == ("cells" in raw):
        raise UserError(f"{where}: give either axes: (a cartesian product) or cells: (an explicit list), not {'both' if 'axes' in raw else 'neither'}")
    base = _options(raw.get("base"), f"{where}, base")
    demo = _options(raw.get("demo"), f"{where}, demo")
    if "axes" in raw:
        cells, columns = _expand_axes(raw["axes"], where, max_cells)
    else:
        cells, columns = _explicit_cells(raw["cells"], where, max_cells)
    names = [cell.name for cell in cells]
    repeated = sorted(name for name, times in Counter(names).items() if times > 1)
    if repeated:
        raise UserError(f"{where}: two cells are named {shown(repeated[0])}")
    headings = _mapping(raw.get("columns"), f"{where}, columns")
    columns = [(str(headings.get(option, heading)), option) for heading, option in columns]
    published = _mapping(raw.get("published"), f"{where}, published")
    known = set(names)
    for cell_name, value in published.items():
        if cell_name not in known:
            raise UserError(f"{where}: published names no cell {shown(cell_name)} (cells: {clip(', '.join(names), 200)})")
        if value is not None:
            check_number(f"published {clip(str(cell_name), 60)}", value, PUBLISHED, where, flag=False)
    return Grid(
        name=name, title=str(raw.get("title") or name), base=base, demo=demo, cells=cells, columns=columns,
        paper=raw.get("paper"), metric=raw.get("metric"),
        published={cell: float(value) for cell, value in published.items() if value is not None},
    )


def _mapping(raw: Any, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping, got {shown(raw)}")
    return raw


def _options(raw: Any, where: str) -> dict[str, Any]:
    """A mapping of train options, none of them one the ablation sets itself."""
    options = _mapping(raw, where)
    for name in options:
        if not isinstance(name, str):
            raise UserError(f"{where}: option names must be strings, got {shown(name)}")
        if name in RESERVED:
            raise UserError(f"{where}: {shown(name)} is set by vitdeep ablate for every cell ({', '.join(RESERVED)} cannot be grid options)")
    return dict(options)


def _expand_axes(raw: Any, where: str, max_cells: int) -> tuple[list[Cell], list[tuple[str, str | None]]]:
    axes = _mapping(raw, f"{where}, axes")
    if not axes:
        raise UserError(f"{where}: axes: is empty")
    sizes = [len(values) if isinstance(values, (list, dict)) else 1 for values in axes.values()]
    _check_count(math.prod(sizes), f"{where} ({' × '.join(map(str, sizes))} axes)", max_cells)
    # Each axis → [(name part, options, variant or None)]
    choices, columns = [], []
    for axis, values in axes.items():
        if not isinstance(axis, str):
            raise UserError(f"{where}: axis names must be strings, got {shown(axis)}")
        if isinstance(values, list):
            if not values:
                raise UserError(f"{where}: axis {shown(axis)} has no values")
            if axis in RESERVED:
                raise UserError(f"{where}: {shown(axis)} is set by vitdeep ablate for every cell ({', '.join(RESERVED)} cannot be grid options)")
            choices.append([(f"{axis}={format_value(value)}", {axis: value}, None) for value in values])
            columns.append((axis, axis))
        elif isinstance(values, dict):
            if not values:
                raise UserError(f"{where}: axis {shown(axis)} has no values")
            choices.append([(str(variant), _options(options, f"{where}, axis {clip(axis)}: {shown(variant)}"), str(variant))
                            for variant, options in values.items()])
            columns.append((axis, None))
        else:
            raise UserError(f"{where}: axis {shown(axis)} must be a list of values or a mapping of named option sets")
    cells = []
    for combination in itertools.product(*choices):
        options, variants = {}, {}
        for (_, axis_options, variant), (heading, _) in zip(combination, columns):
            options.update(axis_options)
            if variant is not None:
                variants[heading] = variant
        cells.append(Cell(_checked_name(",".join(part for part, _, _ in combination), where), options, variants))
    return cells, columns


def _explicit_cells(raw: Any, where: str, max_cells: int) -> tuple[list[Cell], list[tuple[str, str | None]]]:
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: cells: must be a non-empty list of {{name: NAME, OPTION: VALUE, ...}}")
    _check_count(len(raw), where, max_cells)
    cells, columns = [], {}
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict) or "name" not in entry:
            raise UserError(f"{where}: cell {index + 1} needs a name: (got {shown(entry)})")
        name = _checked_name(str(entry["name"]), where)
        options = _options({k: v for k, v in entry.items() if k != "name"}, f"{where}, cell {name}")
        columns.update(dict.fromkeys(options))
        cells.append(Cell(name, options))
    return cells, [(option, option) for option in columns]


def _check_count(cells: int, where: str, max_cells: int) -> None:
    if cells > max_cells:
        raise UserError(f"{where} has {cells:,} cells, more than --max-cells {max_cells:,}: split the grid, or raise --max-cells "
                        "if you mean to run them all")


def _checked_name(name: str, where: str) -> str:
    if len(name) > MAX_NAME or not _NAME.match(name) or name in (".", ".."):
        raise UserError(f"{where}: cell name {shown(name)} must be 1 to {MAX_NAME} letters, digits and . _ + = , - (it names a folder)")
    return name


def format_value(value: Any) -> str:
    """A value as it appears in a cell name: `true`, `0.5`, `1` (for 1.0), `none` for ''."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    text = str(value) if value not in ("", None) else "none"
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


# ---- the cells as runs -------------------------------------------------------------------------


@dataclass(frozen=True)
class CellRun:
    """A cell resolved against the shared settings: the train options it runs with."""

    cell: Cell
    #: Flat train options given on the command line: the shared ones, then the cell's own.
    options: dict[str, Any]
    #: The run config they resolve to (over the recipe file, in demo mode).
    config: Any

    @property
    def name(self) -> str:
        return self.cell.name

    @property
    def own(self) -> dict[str, Any]:
        return {name: value for name, value in self.options.items() if name in self.cell.options}

    @property
    def group(self) -> str:
        """The grid cell this run is a seed of (its own name without `--seeds`)."""
        return self.cell.group or self.cell.name


def common_options(options: list[dict[str, Any]]) -> dict[str, Any]:
    """The options every one of the mappings has, with the same value (in the first one's order)."""
    return {name: value for name, value in options[0].items() if all(name in o and o[name] == value for o in options)} if options else {}


def resolve_cells(grid: Grid, overrides: dict[str, Any], recipe: Path | None = None, ds_config: str | None = None,
                  seeds: int = 1) -> list[CellRun]:
    """Every cell's train options, checked against the run config: shared = the grid's `base`
    (or, with a demo `recipe` file, the grid's `demo` options over it) ← `overrides` (the
    command's train flags) ← the cell's options. `ds_config` is the DeepSpeed config used when
    neither the grid nor the flags name one. With `seeds` > 1 every cell runs with the shared
    seed and the `seeds` − 1 after it (`seeded_cells`)."""
    if "resume" in overrides:
        raise UserError("--resume is not an ablate option: rerunning the grid resumes its unfinished cells by itself")
    shared = {**DEMO_DEFAULTS, **grid.demo} if recipe is not None else dict(grid.base)
    if ds_config is not None and "ds_config" not in shared:
        shared["ds_config"] = ds_config
    shared.update(overrides)
    first_seed = _resolve(shared, recipe, f"grid {grid.name}, shared options").run.seed
    runs = []
    for cell in seeded_cells(grid, seeds, first_seed):
        options = {**shared, **cell.options}
        config = _resolve(options, recipe, f"grid {grid.name}, cell {cell.name}")
        flat = config.flat()
        for name in options:
            if flat[name] is None:
                raise UserError(f"grid {grid.name}, cell {cell.name}: {name}: null cannot be passed as a flag (leave the option out for its default)")
        runs.append(CellRun(cell, {name: flat[name] for name in options}, config))
    return runs


def seeded_cells(grid: Grid, seeds: int, first_seed: int) -> list[Cell]:
    """The grid's cells, each `seeds` times as `NAME,seed=S` (S = first_seed …) when `seeds` > 1."""
    if seeds < 1:
        raise UserError(f"--seeds {seeds} must be at least 1")
    if seeds == 1:
        return grid.cells
    own_seed = next((cell.name for cell in grid.cells if "seed" in cell.options), None)
    if own_seed is not None:
        raise UserError(f"grid {grid.name}: cell {own_seed} sets its own seed, which --seeds {seeds} would replace")
    from vitdeep.config import MAX_SEED

    if first_seed + seeds - 1 > MAX_SEED:
        raise UserError(f"--seeds {seeds} from seed {first_seed} passes the largest seed, {MAX_SEED}")
    return [Cell(f"{cell.name},seed={seed}", {**cell.options, "seed": seed}, cell.variants, group=cell.name)
            for cell in grid.cells for seed in range(first_seed, first_seed + seeds)]


def _resolve(options: dict[str, Any], recipe: Path | None, where: str):
    from vitdeep.config import resolve_config

    try:
        return resolve_config(options, recipe)
    except UserError as error:
        raise UserError(f"{where}: {error}", params=error.params) from None


def grid_listing(grid: Grid) -> list[tuple[str, str, str]]:
    """(cell, its options, published) rows for `--list`."""
    rows = []
    for cell in grid.cells:
        options = ", ".join(f"{k}={format_value(v) if v != '' else repr(v)}" for k, v in cell.options.items()) or "(the base options)"
        published = grid.published.get(cell.name)
        rows.append((cell.name, options, f"{published:.1f}" if published is not None else ""))
    return rows
