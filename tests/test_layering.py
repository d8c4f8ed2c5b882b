"""The import graph: dependencies point one way (cli → engine → models / losses / data / analysis),
and the command line's help path imports no torch. Checked in fresh interpreters through
`sys.modules`, plus every import statement in the source, function-level ones included."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vitdeep"
#: What `--help` must not pull in: each costs seconds to import.
HEAVY = ("torch", "timm", "deepspeed", "webdataset")
HELP_COMMANDS = [[], ["models"], ["train"], ["finetune"], ["plan"], ["ablate"], ["recipes"], ["analyze"], ["eval"],
                 ["export"], ["shards"], ["demo"]]


def _loaded_after(code: str) -> set[str]:
    """Top-level and vitdeep module names a fresh interpreter holds after running `code`."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "vitdeep")
def test_help_imports_no_torch(command):
    loaded = _loaded_after(
        "from vitdeep.cli import main\n"
        f"try:\n    main({command + ['--help']!r})\nexcept SystemExit as done:\n    assert done.code == 0, done.code"
    )
    heavy = sorted(name for name in loaded if name.split(".")[0] in HEAVY)
    assert not heavy, f"vitdeep {' '.join(command)} --help imported {heavy[:5]}"


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("vitdeep.models", ("vitdeep.engine", "vitdeep.losses", "vitdeep.data", "vitdeep.analysis", "vitdeep.commands")),
        ("vitdeep.losses", ("vitdeep.models", "vitdeep.engine", "vitdeep.data")),
        ("vitdeep.analysis", ("vitdeep.models", "vitdeep.engine", "vitdeep.commands")),
        ("vitdeep.data", ("vitdeep.models", "vitdeep.engine", "vitdeep.losses", "vitdeep.analysis")),
    ],
)
def test_layers_import_only_downwards(package, forbidden):
    """Importing a layer (every module in it) loads nothing above it, and no import statement in
    it, at module level or inside a function, names a module above it."""
    modules = _modules_of(package)
    loaded = _loaded_after("\n".join(f"import {name}" for name in modules))
    assert not sorted(name for name in loaded if name.startswith(forbidden))
    for name in modules:
        imported = _imports_in(name)
        assert not sorted(i for i in imported if i.startswith(forbidden)), f"{name} imports {sorted(imported)}"


def _modules_of(package: str) -> list[str]:
    path = PACKAGE.parent / package.replace(".", "/")
    if path.is_dir():
        return [package] + [f"{package}.{p.stem}" for p in sorted(path.glob("*.py")) if p.stem != "__init__"]
    return [package]


def _imports_in(module: str) -> set[str]:
    path = PACKAGE.parent / module.replace(".", "/")
    source = (path / "__init__.py") if path.is_dir() else path.with_suffix(".py")
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names
