"""The bundled recipes (`vitdeep/recipes/*.yaml`): finding them by name, what each reproduces,
and the `vitdeep recipes` table.

A recipe is a config file like any other (flat option names, `vitdeep train --help`) with one
more top-level mapping, `recipe:`, which the config loader reads and does not pass on as options:

    recipe:
      reproduces: Gong et al. 2021, Table 3 — DeiT-B/24 + losses + talking heads, 400 epochs
      source: the paper's Table 3 row; the authors' model zoo (VIT-B24)
      published_top1: 83.3          # ImageNet-1k top-1 %, null when the recipe is not a paper's
      command: train                # or finetune (then run it with --from SRC)
      extends: deit_base_12_losses_300   # optional: start from another recipe's options
      published_checked: false      # optional: the number is not yet checked against its source

The metadata lives only there, so the table, the README and the recipe cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdeep.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
#: The top-level key of a config file that holds recipe metadata rather than options.
METADATA_KEY = "recipe"
REQUIRED_FIELDS = ("reproduces", "source", "published_top1", "command")
OPTIONAL_FIELDS = ("extends", "published_checked")
COMMANDS = ("train", "finetune")


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


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def bundled_recipe(name: str) -> Path | None:
    """The bundled recipe called `name` (with or without `.yaml`, no directory), else None."""
    if Path(name).parent != Path("."):
        return None
    path = RECIPE_DIR / f"{name.removesuffix('.yaml')}.yaml"
    return path if path.is_file() else None


def check_metadata(metadata: Any, path: Path) -> dict[str, Any]:
    """The `recipe:` mapping of `path`, checked; raises `UserError` naming the file."""
    if not isinstance(metadata, dict):
        raise UserError(f"{path}: '{METADATA_KEY}:' must be a mapping ({', '.join(REQUIRED_FIELDS)})")
    unknown = sorted(set(metadata) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    missing = [name for name in REQUIRED_FIELDS if name not in metadata]
    problems = ([f"unknown {', '.join(unknown)}"] if unknown else []) + ([f"missing {', '.join(missing)}"] if missing else [])
    if problems:
        raise UserError(f"{path}: '{METADATA_KEY}:' has " + "; ".join(problems))
    if metadata["command"] not in COMMANDS:
        raise UserError(f"{path}: recipe command '{metadata['command']}' must be one of {', '.join(COMMANDS)}")
    top1 = metadata["published_top1"]
    if top1 is not None and (isinstance(top1, bool) or not isinstance(top1, (int, float))):
        raise UserError(f"{path}: published_top1 must be a number or null, got {top1!r}")
    return metadata


def read_recipe(path: Path) -> Recipe:
    """A recipe's metadata and model (options resolved as `--config` resolves them)."""
    import yaml

    from vitdeep.config import load_config_file

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
    from rich.table import Table

    from vitdeep.monitor import make_console

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
