"""`vitdeep recipes`: the bundled recipes, what each reproduces and its published top-1, read from
the recipes' own `recipe:` blocks (`vitdeep.recipebook`) and their resolved options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.table import Table

from vitdeep.config import load_config_file
from vitdeep.errors import UserError
from vitdeep.monitor import make_console
from vitdeep.recipebook import METADATA_KEY, RECIPE_DIR, check_metadata, recipe_names


@dataclass(frozen=True)
class Recipe:
    """One bundled recipe and what it says about itself."""

    name: str
    path: Path
    model: str
    reproduces: str
    source: str
    published_top1: float | None
    command: str
    #: False when the published number has not been checked against the paper (said in the table).
    published_checked: bool = True

    def published(self) -> str:
        if self.published_top1 is None:
            return "—"
        return f"{self.published_top1:.1f}" + ("" if self.published_checked else " (unchecked)")


def read_recipe(path: Path) -> Recipe:
    """A recipe's metadata and model (options resolved as `--config` resolves them)."""
    raw = yaml.safe_load(path.read_text()) or {}
    if METADATA_KEY not in raw:
        raise UserError(f"{path} has no '{METADATA_KEY}:' block saying what it reproduces")
    metadata = check_metadata(raw[METADATA_KEY], path)
    options = load_config_file(path)
    return Recipe(
        name=path.stem,
        path=path,
        model=options.get("model", ""),
        reproduces=str(metadata["reproduces"]),
        source=str(metadata["source"]),
        published_top1=metadata["published_top1"],
        command=metadata["command"],
        published_checked=metadata.get("published_checked", True) is not False,
    )


def bundled_recipes() -> list[Recipe]:
    return [read_recipe(RECIPE_DIR / f"{name}.yaml") for name in recipe_names()]


def print_recipe_table() -> None:
    """The `vitdeep recipes` table."""
    table = Table(title="vitdeep recipes (vitdeep/recipes/; use with --config NAME)", show_lines=True)
    for column in ("name", "command", "model", "reproduces", "published top-1 %"):
        table.add_column(column, justify="right" if column.startswith("published") else "left",
                         no_wrap=column in ("name", "command", "model"))
    for recipe in bundled_recipes():
        table.add_row(recipe.name, recipe.command, recipe.model, recipe.reproduces, recipe.published())
    console = make_console()
    console.print(table)
    if any(not recipe.published_checked for recipe in bundled_recipes()):
        console.print("(unchecked): a published number not yet checked against the paper's table; the recipe file says what it rests on.")
    console.print(
        "train: vitdeep train --config NAME --data SHARDS --out DIR; finetune: vitdeep finetune --from SRC "
        "--config NAME --data SHARDS --out DIR. Each file names its source; `--dry-run` shows the resolved run."
    )
