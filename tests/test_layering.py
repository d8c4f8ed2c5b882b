"""The import graph: dependencies point one way (cli → engine → models / losses / data / analysis),
and the command line's help path imports no torch. Checked in fresh interpreters through
`sys.modules`, plus every import statement in the source, function-level ones included."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vitdeep"
#: What `--help` must not pull in: each costs seconds to import.
HEAVY = ("torch", "timm", "deepspeed", "webdataset")
HELP_COMMANDS = [[], ["models"], ["train"], ["finetune"], ["plan"], ["ablate"], ["recipes"], ["analyze"], ["eval"],
                 ["export"], ["shards"], ["demo"]]


def _loaded_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """Top-level and vitdeep module names a fresh interpreter holds after running `code` (with
    `env` added to the environment)."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, **(env or {})})
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "vitdeep")
def test_help_imports_no_torch(command):
    loaded = _loaded_after(
        "from vitdeep.cli import main\n"
        f"try:\n    main({command + ['--help']!r})\nexcept SystemExit as done:\n    assert done.code == 0, done.code"
    )
    heavy = sorted(name for name in loaded if name.split(".")[0] in HEAVY)
    assert not heavy, f"vitdeep {' '.join(command)} --help imported {heavy[:5]}"


#: (environment, arguments, a line of the output) of a shell's uses of completion: printing the
#: script (the shell named; by default Typer detects it) and the completions of a TAB.
COMPLETION = {
    "script": ({"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}, ["--show-completion", "bash"],
               "complete -o default -F _vitdeep_completion vitdeep"),
    "tab": ({"_VITDEEP_COMPLETE": "complete_bash", "COMP_WORDS": "vitdeep train --ema", "COMP_CWORD": "2"}, [], "--ema-decay"),
}


@pytest.mark.parametrize("env, args, expected", COMPLETION.values(), ids=list(COMPLETION))
def test_shell_completion_works_and_imports_no_torch(env, args, expected):
    """Issue 26: completion was off. The script and every TAB's completions come without torch:
    a TAB that took seconds would be worse than none."""
    loaded = _loaded_after(
        "import contextlib, io\nfrom vitdeep.cli import main\nshown = io.StringIO()\n"
        f"with contextlib.redirect_stdout(shown):\n    try:\n        main({args!r})\n"
        "    except SystemExit as done:\n        assert done.code in (0, None), done.code\n"
        f"assert {expected!r} in shown.getvalue().splitlines(), shown.getvalue()",
        env,
    )
    heavy = sorted(name for name in loaded if name.split(".")[0] in HEAVY)
    assert not heavy, f"completion imported {heavy[:5]}"


LAYERS = {
    "vitdeep.models": ("vitdeep.engine", "vitdeep.losses", "vitdeep.data", "vitdeep.analysis", "vitdeep.commands"),
    "vitdeep.losses": ("vitdeep.models", "vitdeep.engine", "vitdeep.data"),
    "vitdeep.analysis": ("vitdeep.models", "vitdeep.engine", "vitdeep.commands"),
    "vitdeep.data": ("vitdeep.models", "vitdeep.engine", "vitdeep.losses", "vitdeep.analysis"),
    "vitdeep.engine": ("vitdeep.planner", "vitdeep.commands", "vitdeep.ablate", "vitdeep.cli"),
    "vitdeep.planner": ("vitdeep.commands", "vitdeep.ablate", "vitdeep.cli"),
}


@pytest.mark.parametrize("package", LAYERS)
def test_layers_import_only_downwards(package):
    """Importing a layer (every module in it) loads nothing above it: no module it reaches through
    the imports that run at import time (module level, parent packages included) is above it. And
    no import statement in it, at module level or inside a function, names a module above it."""
    forbidden = LAYERS[package]
    graph = _module_graph(at_import=True)
    reached, todo = set(), list(_modules_of(package))
    while todo:
        module = todo.pop()
        if module in reached:
            continue
        reached.add(module)
        todo += graph.get(module, ())
        todo += [module.rsplit(".", i)[0] for i in range(1, module.count("."))]  # importing a.b.c runs a and a.b first
    assert not sorted(name for name in reached if name.startswith(forbidden)), package
    for name in _modules_of(package):
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


def _module_graph(at_import: bool = False) -> dict[str, set[str]]:
    """vitdeep's modules and the vitdeep modules each imports, function-level imports included
    (`at_import`: only the imports that run when the module is imported, outside any function
    and outside `if TYPE_CHECKING:`)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in (_run_at_import(ast.parse(path.read_text())) if at_import else ast.walk(ast.parse(path.read_text()))):
            if isinstance(node, ast.Import):
                edges.update(resolve(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                edges.update(resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else resolve(base)
                             for alias in node.names)
        graph[module] = {edge for edge in edges if edge and edge != module}
    return graph


def _run_at_import(tree: ast.Module):
    """The statements of a module that run when it is imported: its body and the blocks of its
    top-level `if` / `try` / `with`, not function or class bodies, nor `if TYPE_CHECKING:`."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [line for handler in node.handlers for line in handler.body]
        elif isinstance(node, ast.With):
            todo += node.body


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (its modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return path[path.index(imported):] + [imported]
            if imported not in state and (found := visit(imported)):
                return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circles():
    """No two modules import each other, directly or around a circle, not even inside a function:
    a circle closed by a function-level import is still a circle."""
    cycle = _cycle(_module_graph())
    assert cycle is None, "import circle: " + " → ".join(cycle)
