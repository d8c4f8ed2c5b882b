"""`vitdeep ablate` once parsed: its modes (run here, `--emit slurm`, `--dry-run`, `--collect`,
`--list`), every check before anything is written, and what it prints; the grid machinery is the
package `vitdeep.ablate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitdeep.ablate.grid import MAX_CELLS
from vitdeep.errors import UserError

EMIT_FORMATS = ("slurm",)


def run_command(
    grid: str | None,
    options: dict[str, Any],
    *,
    ranks: int | None = None,
    emit: str | None = None,
    dry_run: bool = False,
    demo: bool = False,
    collect: Path | None = None,
    list_grids: bool = False,
    max_cells: int = MAX_CELLS,
    seeds: int = 1,
    config: str | Path | None = None,
) -> None:
    """Dispatch the modes of `vitdeep ablate`; every check runs before anything is written.
    `config` is a train config file (or bundled recipe) whose options every cell takes."""
    if list_grids:
        print_bundled_grids()
        return
    if collect is not None:
        if grid is not None or options or config is not None:
            raise UserError("--collect DIR takes no GRID, --config or train options: it rebuilds the table of DIR's grid")
        from vitdeep.ablate.results import collect as collect_results

        collect_results(collect)
        return
    if grid is None:
        raise UserError("give a GRID (a bundled name, see `vitdeep ablate --list`, or a YAML file), or --collect DIR")
    if emit is not None and emit not in EMIT_FORMATS:
        raise UserError(f"--emit {emit}: the one format is {', '.join(EMIT_FORMATS)}")
    if emit and (demo or dry_run):
        raise UserError(f"--emit {emit} writes a job script for a cluster; it takes neither --demo nor --dry-run")
    ablation = prepare(grid, options, ranks=ranks, demo=demo, local=emit is None, max_cells=max_cells, seeds=seeds, config=config)
    if dry_run:
        from vitdeep.ablate.run import print_dry_run

        print_dry_run(ablation)
    elif emit:
        from vitdeep.ablate.run import write_record
        from vitdeep.ablate.slurm import sbatch_script, write_sbatch
        from vitdeep.monitor import make_console

        script = sbatch_script(ablation)  # every check of the script before anything is written
        write_record(ablation)
        path = write_sbatch(ablation.out, script)
        make_console().print(f"wrote {path}: {len(ablation.runs)} cells as a Slurm job array; submit it with "
                             f"`sbatch {path}`, then `vitdeep ablate --collect {ablation.out}`", soft_wrap=True, markup=False)
    else:
        from vitdeep.ablate.run import run_grid

        if demo:
            _write_demo_shards(ablation.out / "shards")
        run_grid(ablation)


def prepare(grid_spec: str, options: dict[str, Any], *, ranks: int | None, demo: bool, local: bool, max_cells: int = MAX_CELLS,
            seeds: int = 1, config: str | Path | None = None):
    """The grid resolved for its folder, every cell's options checked (and, to run here, every
    cell's full run plan); raises `UserError` before anything is written. The options of a
    `config` file lie under the `options` given as flags, as in `vitdeep train`, and over the
    grid's shared ones; every cell gets them as flags (its command and `grid.json` say them all,
    so a rerun after the file changed is caught as a changed grid)."""
    from vitdeep.ablate.grid import load_grid, resolve_cells
    from vitdeep.ablate.cells import Ablation
    from vitdeep.ablate.run import check_plans, check_same_grid
    from vitdeep.config import load_config_file
    from vitdeep.launcher import default_ds_config, default_ranks

    overrides = {**(load_config_file(config) if config is not None else {}), **options}
    out = overrides.pop("out", None)
    data, val = overrides.pop("data", None), overrides.pop("val", None)
    if not out:
        raise UserError("no output folder: pass --out DIR (the grid's cells, results.json, results.md, results.png)")
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if ranks is not None and ranks < 1:
        raise UserError(f"--ranks {ranks} must be at least 1")
    recipe = None
    if demo:
        from vitdeep.commands.demo import RECIPE

        if data or val:
            raise UserError("--demo trains on the built-in digits: it takes no --data / --val")
        recipe = RECIPE
        data = val = str(Path(out) / "shards")
    elif not data or not val:
        raise UserError("pass --data SHARDS and --val SHARDS (every cell trains on the one and is evaluated on the other), or --demo")
    grid = load_grid(grid_spec, max_cells)
    if len(grid.cells) * seeds > max_cells:
        raise UserError(f"grid {grid.name}: {len(grid.cells)} cells × {seeds} seeds is more than --max-cells {max_cells}")
    runs = resolve_cells(grid, overrides, recipe, ds_config=default_ds_config() if local else None, seeds=seeds)
    ablation = Ablation(grid, Path(out), runs, data, val, ranks or default_ranks(), recipe)
    check_same_grid(ablation)
    if local and not demo:
        check_plans(ablation)
    return ablation


def _write_demo_shards(path: Path) -> None:
    from vitdeep.commands.shards import run_demo_shards

    if not (path / "_info.json").is_file():
        run_demo_shards(path)


def print_bundled_grids() -> None:
    """`--list`: each bundled grid, its cells, their options and the paper's numbers."""
    from rich.table import Table

    from vitdeep.ablate.grid import bundled_grids, grid_listing, load_grid
    from vitdeep.monitor import make_console

    console = make_console()
    for name in bundled_grids():
        grid = load_grid(name)
        table = Table(title=f"{name}: {grid.title}", title_justify="left", caption=grid.paper or "", caption_justify="left")
        for column in ("cell", "options", "published"):
            table.add_column(column, overflow="fold")
        for row in grid_listing(grid):
            table.add_row(*row)
        console.print(table)
