"""Generated grid files for `vitdeep ablate` (issue 25): any axes, cells, values and sizes end in
one line, exit 2 and nothing written (there are no shards here); a grid over --max-cells is
refused by counting, before any cell is built; a 100 × 100 grid's dry run takes seconds.

Examples per test (`max_examples`): 120 grids; with the plain tests about 25 s (the 10,000-cell
dry run is 10-15 s of it).
"""

from __future__ import annotations

import json
import math
import time

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hostile import ANY_NUMBER, MISSING, SETTINGS, check_outcome, run_cli
from vitdeep.ablate.grid import RESERVED
from vitdeep.config import flat_fields

OPTION_NAMES = sorted(flat_fields())
NAMES = st.one_of(*[st.sampled_from(OPTION_NAMES)] * 3, st.sampled_from(["data", "out", "resume", "name"]), st.text(max_size=10))
VALUES = st.one_of(ANY_NUMBER, st.booleans(), st.none(), st.text(max_size=12), st.lists(st.integers(), max_size=3))


@st.composite
def axis(draw):
    """An axis: a list of values (often many, some repeated), or named option sets."""
    if draw(st.booleans()):
        size, first, step = draw(st.integers(0, 60)), draw(VALUES), draw(st.one_of(st.just(0), st.integers(1, 5), st.floats(0, 1)))
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            return [first + step * index for index in range(size)] if math.isfinite(first) else [first] * size
        return [first] * size
    return draw(st.dictionaries(st.text(max_size=8), st.dictionaries(NAMES, VALUES, max_size=3), max_size=4))


OPTIONAL = {"base": st.dictionaries(NAMES, VALUES, max_size=3), "published": st.dictionaries(st.text(max_size=10), ANY_NUMBER, max_size=2),
            "title": st.text(max_size=20)}
AXES = st.dictionaries(NAMES, axis(), min_size=1, max_size=4)
CELL = st.one_of(
    st.fixed_dictionaries({"name": st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)},
                          optional={name: VALUES for name in ("lr", "seed", "depth", "drop_path", "attnscale", "steps")}),
    st.dictionaries(st.sampled_from(["name", *OPTION_NAMES[:10]]), VALUES, max_size=3),
)
CELLS = st.lists(CELL, max_size=6)
#: Grids of axes, grids of cells, and mappings of anything a grid file may hold, right or wrong.
GRIDS = st.one_of(
    st.fixed_dictionaries({"axes": AXES}, optional=OPTIONAL),
    st.fixed_dictionaries({"cells": CELLS}, optional=OPTIONAL),
    st.fixed_dictionaries({}, optional={**OPTIONAL, "axes": AXES, "cells": CELLS, "nonsense": VALUES}),
)


def _cells(grid: dict) -> int:
    """How many cells the grid declares (its axes' product, or its list)."""
    if isinstance(grid.get("axes"), dict):
        return math.prod(len(values) if isinstance(values, (list, dict)) else 1 for values in grid["axes"].values())
    return len(grid["cells"]) if isinstance(grid.get("cells"), list) else 0


@settings(max_examples=120, **SETTINGS)
@given(grid=GRIDS, max_cells=st.sampled_from([None, 1, 10, 100]))
@example(grid={"axes": {"lr": [math.nan, 1.0]}}, max_cells=None)
@example(grid={"axes": {name: list(range(10)) for name in OPTION_NAMES[:10]}}, max_cells=None)  # 10^10 cells: MemoryError before
@example(grid={"axes": {"lr": [1e-3] * 3}}, max_cells=None)  # three cells of one name
@example(grid={"cells": [{"name": "a" * 300}]}, max_cells=None)
@example(grid={"axes": {"attn_drop": {"\x1e": {"data": None}}}}, max_cells=None)  # found: \x1e in a variant broke the line
def test_any_grid_is_refused_in_one_line(grid, max_cells, tmp_path):
    path = tmp_path / f"g{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(grid, default=str)), allow_unicode=True))
    out = tmp_path / f"out-{time.monotonic_ns()}"
    limit = ["--max-cells", str(max_cells)] if max_cells else []
    start = time.perf_counter()
    outcome = check_outcome(run_cli(["ablate", str(path), "--data", MISSING, "--val", MISSING, "--out", str(out), "--dry-run",
                                     *limit]), written=out, codes=(2,))
    if _cells(grid) > (max_cells or 10_000) and ("axes" in grid) != ("cells" in grid) and set(grid) <= {"axes", "cells", "base", "title"} \
            and _plain_base(grid):
        assert "more than --max-cells" in outcome.err and time.perf_counter() - start < 2, outcome.err


def _plain_base(grid: dict) -> bool:
    """Whether the grid's `base:` passes its own checks (made before the cells are counted)."""
    base = grid.get("base")
    return base is None or (isinstance(base, dict) and all(isinstance(name, str) and name not in RESERVED for name in base))


def test_a_repeated_key_in_a_grid_is_refused(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("axes:\n  lr: [0.1, 0.2]\n  lr: [0.3]\n")
    outcome = check_outcome(run_cli(["ablate", str(path), "--data", MISSING, "--val", MISSING, "--out", str(tmp_path / "o"),
                                     "--dry-run"]), written=tmp_path / "o", codes=(2,))
    assert "key 'lr' is given twice (lines 2 and 3)" in outcome.err


@pytest.mark.slow  # in-process, but a scale test: 10,000 plans
def test_a_10000_cell_dry_run_takes_seconds(digit_shards, tmp_path):
    """100 × 100 cells over the digits, every cell's plan checked: it did not finish in 10 minutes
    (each cell built its model on the meta device, 35 ms, and the listing was a 10,000-row table)."""
    grid = {"base": {"model": "deit_tiny_12", "embed_dim": 64, "num_heads": 2, "depth": 2, "img_size": 32, "patch_size": 8,
                     "global_batch": 32, "micro_batch": 16, "workers": 1, "ds_config": "cpu_fp32", "steps": 6},
            "axes": {"lr": [1e-4 * (i + 1) for i in range(100)], "seed": list(range(100))}}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    start = time.perf_counter()
    outcome = check_outcome(run_cli(["ablate", str(path), "--data", str(digit_shards), "--val", str(digit_shards), "--out", str(out),
                                     "--dry-run"]), codes=(0,))
    seconds = time.perf_counter() - start
    print(f"10,000-cell dry run: {seconds:.1f} s")
    assert seconds < 60 and outcome.out.count("deepspeed.launcher.runner") == 10_000 and not out.exists()
    refused = check_outcome(run_cli(["ablate", str(path), "--data", str(digit_shards), "--val", str(digit_shards), "--out", str(out),
                                     "--dry-run", "--max-cells", "9999"]), codes=(2,))
    assert "has 10,000 cells, more than --max-cells 9,999" in refused.err
