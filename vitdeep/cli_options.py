"""Command-line flags generated from the run config's fields (`vitdeep/config.py`).

Each field becomes `--kebab-case-name` with the field's help text, its type and its default, in a
help panel per config section, so the CLI never repeats a default. Flags default to "not given"
(None), so a config file's values survive unless a flag overrides them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Iterable
from typing import Any, Callable, Optional

import typer

from vitdeep.config import SECTION_TITLES, parse_overrides, section_classes
from vitdeep.errors import UserError
from vitdeep.fields import Range, check_number, numeric_fields


def _flag(name: str, annotation: Any) -> str:
    flag = "--" + name.replace("_", "-")
    return f"{flag}/--no-{name.replace('_', '-')}" if annotation is bool else flag


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def _shown_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def config_parameters(overrides: dict[str, Any] | None = None, only: Iterable[str] | None = None) -> list[inspect.Parameter]:
    """One keyword parameter per config field (or per field named in `only`); `overrides` (a
    recipe) changes the shown defaults."""
    overrides = overrides or {}
    only = set(only) if only is not None else None
    parameters = []
    for section, cls in section_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            annotation = _strip_optional(hints[f.name])
            default = overrides.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
            option = typer.Option(
                None,
                _flag(f.name, annotation),
                help=f.metadata.get("help", ""),
                show_default=_shown_default(default),
                rich_help_panel=SECTION_TITLES[section],
            )
            parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[annotation]))
    return parameters


#: The parameter of `--set KEY=VALUE` (repeatable) on the commands that take every config option.
SET_PARAMETER = inspect.Parameter(
    "set_options", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
    default=typer.Option(None, "--set", metavar="KEY=VALUE", help="Set an option as a --config file does: KEY its name or "
                         "SECTION.NAME, e.g. --set optim.lr=1e-3 --set model.depth=12. Repeatable; over --config, with the same checks."),
)


def with_config_options(
    overrides: dict[str, Any] | None = None, only: Iterable[str] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate `command(options: dict, **own_parameters)`: the generated flags (of every config
    field, or of those in `only`) arrive as `options` (only the ones given), the command's own
    parameters as they are. With every field (no `only`), `--set KEY=VALUE` sets any of them too,
    into `options` (an option given both ways is refused: which one would win is a guess)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for name, p in inspect.signature(command).parameters.items() if name != "options"]
        own_hints = typing.get_type_hints(command)
        generated = config_parameters(overrides, only) + ([SET_PARAMETER] if only is None else [])
        generated_names = {p.name for p in generated}
        ranges = {name: valid for cls in section_classes().values() for name, valid in numeric_fields(cls)}

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            sets = parse_overrides(kwargs.pop(SET_PARAMETER.name, None) or ())
            options = {k: v for k, v in kwargs.items() if k in generated_names and v is not None}
            for name, value in options.items():
                if name in ranges:  # also for the commands that take a few of train's flags without its config
                    check_number(name, value, ranges[name])
            both = sorted(set(sets) & set(options))
            if both:
                raise UserError(f"--set {both[0]} and `{both[0]}` both set it: keep one", params=(both[0],))
            return command({**sets, **options}, **{k: v for k, v in kwargs.items() if k not in generated_names})

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + generated
        wrapper.__signature__ = inspect.Signature(parameters)
        wrapper.__annotations__ = {**{p.name: own_hints[p.name] for p in own}, **{p.name: p.annotation for p in generated}}
        del wrapper.__wrapped__
        return wrapper

    return decorate


def number_option(default: Any, flag: str, valid: Range, help: str) -> Any:
    """A command's own numeric flag, checked against `valid` as it is parsed (before the command
    runs): the same check as a config option's, so NaN, inf and absurd sizes end in one line."""
    name = flag.removeprefix("--").replace("-", "_")

    def check(value: Any) -> Any:
        return value if value is None else check_number(name, value, valid)

    return typer.Option(default, flag, help=help, callback=check)
