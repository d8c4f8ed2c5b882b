"""Config fields, and the one check of every number a user can give vitdeep.

A number reaches vitdeep from a flag, a YAML / JSON config, a recipe, a grid cell, an `_info.json`
or the environment. Each is checked by `check_number` against a `Range` declared once, beside the
option it belongs to (`option(..., valid=...)` for a config field; `check_fields` checks them all,
and refuses to run for a numeric field that declares none, so a new option cannot forget it).

Why not `if value < low`: NaN fails every comparison, so such a check waves it through; `Range`
asks whether the value is inside. Every range is also bounded above: inf, and sizes so large that
a later step would overflow (a `timedelta`, an `int()` of a float, a tensor shape) or run for ever,
are refused at the start with the limit stated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any

from vitdeep.errors import UserError

#: The longest piece of a user's input a message repeats (a value, a key, a file's line).
MAX_SHOWN = 80


def option(default: Any, help: str, valid: Range | None = None) -> Any:
    """A config field with its help text (shown by `--help` and the README) and, for a number,
    the range it must lie in."""
    metadata = {"help": help, **({"valid": valid} if valid is not None else {})}
    return field(default=default, metadata=metadata)


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """`value` as a message repeats it: numbers as `%g` (`nan`, `inf`, `1e+30`), anything else as
    a bounded repr cut to `limit` characters (a value may be an alias bomb, a file's worth of text
    or a structure that contains itself)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) and abs(value) >= 10**15:
        try:
            return f"{float(value):g}"
        except OverflowError:
            return f"a {int(math.log10(abs(value))) + 1}-digit number"
    return clip(f"{value:g}" if isinstance(value, float) else _REPR.repr(value), limit)


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """Plain text (a name, a path) cut to `limit` characters for a message, with what would not
    print (a newline in a key, a control character) written as its escape: one line stays one."""
    text = text[: limit + 1]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounded_repr() -> reprlib.Repr:
    """A repr that looks at a few items of a few levels only (never expands an alias bomb)."""
    bounded = reprlib.Repr()
    bounded.maxlevel = 3
    bounded.maxtuple = bounded.maxlist = bounded.maxdict = bounded.maxset = bounded.maxfrozenset = bounded.maxdeque = 4
    bounded.maxstring = bounded.maxother = MAX_SHOWN
    bounded.maxlong = 40
    return bounded


_REPR = _bounded_repr()


def _bound(value: float) -> str:
    return shown(value)


@dataclass(frozen=True)
class Range:
    """Where a number must lie: from `low` (excluded when `low_open`) to `high` (a bound the
    option's meaning sets, such as 1 for a probability) or else to `limit` (the largest value
    vitdeep accepts: past it a later computation overflows or the run is absurd). Both ends are
    finite, so NaN and ±inf always fall outside. `integer` numbers must be whole (bools are not
    numbers here)."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    limit: float | None = None
    integer: bool = False

    def __post_init__(self) -> None:
        if (self.high is None) == (self.limit is None):
            raise ValueError("a Range has either a high bound or a limit")

    def __contains__(self, value: float) -> bool:
        """False for NaN, which fails every comparison, and for ±inf, past every bound."""
        top = self.high if self.high is not None else self.limit
        return (value > self.low if self.low_open else value >= self.low) and (value < top if self.high_open else value <= top)

    def interval(self) -> str:
        """`in [0, 1)`, or `> 0` / `>= 1` for a range bounded only by its limit."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_bound(self.low)}"
        return f"in {'(' if self.low_open else '['}{_bound(self.low)}, {_bound(self.high)}{')' if self.high_open else ']'}"

    def complaint(self, value: float) -> str:
        """What is wrong with a value outside: the side it falls off (NaN: the low side)."""
        if self.high is None and value == value and value > self.low:
            return f"<= {_bound(self.limit)}"
        return self.interval()


def at_least(low: float, limit: float) -> Range:
    return Range(low, limit=limit)


def above(low: float, limit: float) -> Range:
    return Range(low, limit=limit, low_open=True)


def within(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Range:
    return Range(low, high, low_open=low_open, high_open=high_open)


def count(low: int, limit: int) -> Range:
    """A whole number from `low` to `limit`."""
    return Range(low, limit=limit, integer=True)


#: Limits shared by several options and inputs: optimizer steps (or every-N counts), samples,
#: data-loader workers, ranks, weights (of a loss term, a decay, a temperature), classes.
MAX_STEPS = 10**9
MAX_SAMPLES = 10**12
MAX_WORKERS = 1024
MAX_RANKS = 1 << 20
MAX_WEIGHT = 1e6
#: Classes of a model or a data set.
MAX_CLASSES = 10**7
PROBABILITY = within(0, 1)
BELOW_1 = within(0, 1, high_open=True)
FRACTION = within(0, 1, low_open=True)


def check_number(name: str, value: Any, valid: Range, where: str = "", flag: bool = True) -> Any:
    """`value` when it is a number in `valid`, else a `UserError` naming `name` (in backticks, as a
    parameter the CLI shows as its flag, unless `flag` is False: a field of a file) after `where`
    when given (the file): `` `lr` must be > 0, got nan ``."""
    prefix, shown_name = (f"{where}: " if where else ""), (f"`{name}`" if flag else name)
    params = (name,) if flag else ()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (valid.integer and not isinstance(value, int)):
        kind = "a whole number" if valid.integer else "a number"
        raise UserError(f"{prefix}{shown_name} must be {kind} {valid.interval()}, got {shown(value)}", params=params)
    if value not in valid:
        raise UserError(f"{prefix}{shown_name} must be {valid.complaint(value)}, got {shown(value)}", params=params)
    return value


@functools.cache
def numeric_fields(cls: type) -> tuple[tuple[str, Range], ...]:
    """(name, range) of each int / float field of a dataclass (an int field's range takes whole
    numbers only); a numeric field without a range is a bug, caught at its first use."""
    hints = typing.get_type_hints(cls)
    checked = []
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if typing.get_origin(annotation) is typing.Union:
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        if annotation not in (int, float):
            continue
        if "valid" not in f.metadata:
            raise RuntimeError(f"{cls.__name__}.{f.name} is a number without a range: declare option(..., valid=...)")
        checked.append((f.name, dataclasses.replace(f.metadata["valid"], integer=annotation is int)))
    return tuple(checked)


def check_fields(section: Any) -> None:
    """Every set number of a dataclass against its field's range (None: an unset option)."""
    for name, valid in numeric_fields(type(section)):
        value = getattr(section, name)
        if value is not None:
            check_number(name, value, valid)


def range_of(cls: type, name: str) -> Range:
    """The range a dataclass declares for its field `name` (one source for a flag that shares it)."""
    return dict(numeric_fields(cls))[name]


class Checked:
    """Base of a section of options: its numbers are checked against their ranges as it is built,
    then `check` runs the section's own rules between fields."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.check()

    def check(self) -> None:
        """Rules between a section's fields (none unless a section has some)."""
