"""Reading a YAML or JSON document a user wrote (a config file, a grid), so that none can hide a
mistake or exhaust the machine.

- A key given twice is refused, with its lines: both parsers would silently keep the last one.
- A file over `MAX_DOCUMENT_BYTES` is refused before it is parsed.
- YAML aliases (`*name`) may repeat what they name, but the document they expand to must stay under
  `MAX_VALUES` values: an alias bomb (each level repeating the one below nine times) is refused
  once its few dozen nodes are read, by counting, never by expanding it into billions of values.
- Every refusal is one line naming the file, the line where the parser knows it, and at most a
  short piece of the input.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from vitdeep.errors import UserError
from vitdeep.fields import clip, shown

#: The largest config or grid file read (a 10,000-cell grid written out cell by cell is ~1 MB).
MAX_DOCUMENT_BYTES = 4 << 20
#: The most values (scalars, lists and mappings) a YAML document may expand to through its aliases.
MAX_VALUES = 100_000


def read_document(path: Path, what: str, as_json: bool = False) -> Any:
    """The parsed content of a JSON file (`as_json`, or named `.json`), or else of a YAML file;
    `what` names it in errors ("config file", "grid")."""
    return parse_document(read_text(path, what), f"{what} {path}", as_json or path.suffix == ".json")


def read_text(path: Path, what: str) -> str:
    """A document's text: UTF-8, at most `MAX_DOCUMENT_BYTES`."""
    where = f"{what} {path}"
    try:
        if path.stat().st_size > MAX_DOCUMENT_BYTES:
            raise UserError(f"{where} is larger than {MAX_DOCUMENT_BYTES >> 20} MB: is it the right file?")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"cannot read {where}: {error.strerror or error}") from None


def parse_document(text: str, where: str, as_json: bool) -> Any:
    """`text` parsed as JSON or YAML, with the checks above; `where` names it in errors."""
    return _parse_json(text, where) if as_json else _parse_yaml(text, where)


def _parse_json(text: str, where: str) -> Any:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        for key, value in pairs:
            if key in mapping:
                raise UserError(f"{where}: key {shown(key)} is given twice in one object (JSON keeps only the last): remove one")
            mapping[key] = value
        return mapping

    try:
        return json.loads(text, object_pairs_hook=unique)
    except UserError:
        raise
    except json.JSONDecodeError as error:
        raise UserError(f"{where} is not valid JSON: {error.msg} at line {error.lineno}") from None
    except (RecursionError, ValueError) as error:  # nesting too deep; an integer too long to read
        raise UserError(f"{where} is not valid JSON: {_reason(error)}") from None


def _parse_yaml(text: str, where: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_loader_class())  # noqa: S506 (a SafeLoader)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        detail = f"{problem} at line {mark.line + 1}" if mark else problem
        raise UserError(f"{where} is not valid YAML: {clip(detail.splitlines()[0], 200)}") from None
    except (RecursionError, ValueError) as error:
        raise UserError(f"{where} is not valid YAML: {_reason(error)}") from None


def _reason(error: BaseException) -> str:
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return clip(str(error).splitlines()[0] if str(error) else type(error).__name__, 200)


@functools.cache
def _loader_class() -> type:
    """yaml's SafeLoader that refuses repeated keys and documents that expand too far (built on
    first use: `--help` never imports yaml)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_document(self) -> Any:
            node = super().compose_document()
            _check_expansion(node)
            return node

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                _check_unique_keys(self, node)
            return super().construct_mapping(node, deep=deep)

    return Loader


def _check_unique_keys(loader: Any, node: Any) -> None:
    """Refuse a mapping that gives one key twice (merge keys `<<:` may be overridden, as YAML says)."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key, line = loader.construct_object(key_node, deep=True), key_node.start_mark.line + 1
        try:
            if key in seen:
                raise UserError(f"key {shown(key)} is given twice (lines {seen[key]} and {line}): remove one")
            seen[key] = line
        except TypeError:
            continue  # an unhashable key: the constructor refuses it


def _check_expansion(root: Any) -> None:
    """Count the values `root` expands to, each alias's target once per use, without expanding
    it (depth first, without recursion: a document may nest deeply)."""
    import yaml

    sizes: dict[int, int] = {}
    path: set[int] = set()  # the nodes being counted: an alias to one of them is a cycle
    stack: list[tuple[Any, bool]] = [(root, False)] if root is not None else []
    while stack:
        node, counted_children = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            children = []
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = node.value
        if counted_children:
            path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_VALUES:
                raise UserError(f"the value at line {node.start_mark.line + 1} expands to more than {MAX_VALUES:,} values "
                                "(YAML aliases repeating one another): write it out")
        elif id(node) not in sizes:
            path.add(id(node))
            stack.append((node, True))
            for child in children:
                if id(child) in path:
                    raise UserError(f"the alias at line {child.start_mark.line + 1} refers to a value that contains it")
                stack.append((child, False))
