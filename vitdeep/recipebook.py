"""The bundled recipes (`vitdeep/recipes/*.yaml`): finding them by name and checking the `recipe:`
block that says what each reproduces (the `vitdeep recipes` table is `commands/recipes.py`).

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

from pathlib import Path
from typing import Any

from vitdeep.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
#: The top-level key of a config file that holds recipe metadata rather than options.
METADATA_KEY = "recipe"
REQUIRED_FIELDS = ("reproduces", "source", "published_top1", "command")
OPTIONAL_FIELDS = ("extends", "published_checked")
COMMANDS = ("train", "finetune")


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
