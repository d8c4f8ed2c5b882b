"""Running `vitdeep` in this process on generated hostile input, and what every such run must
show (issue 25): exit code 0 or 2, never a traceback, a refusal's stderr one line under 1 KB, and
nothing written on a refusal.

The strategies here generate the numbers and words a hostile user types; the `test_hostile_*`
files generate whole documents and environments from them.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, event
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st

from vitdeep.cli import main

#: For every generated test: no per-example deadline (the first call imports torch), and the
#: function-scoped tmp_path / capsys fixtures are fine (every example uses a fresh name under it).
#: `make test` tries the same examples every time, so a commit that passed keeps passing;
#: `VITDEEP_EXPLORE=1` draws new ones (keep what they find as `@example`s).
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=os.environ.get("VITDEEP_EXPLORE") != "1")
MAX_LINE_BYTES = 1024
#: Paths, numbers and quoted values, left out of a message's gist (`--hypothesis-show-statistics`).
_GIST = re.compile(r"\S*/\S*|'[^']*'|\d+")
#: A data argument that names nothing: a run given it gets past every input check, then stops.
MISSING = "/nonexistent/vitdeep-shards"


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_cli(argv: list[str], env: dict[str, str | None] | None = None) -> Outcome:
    """`vitdeep ARGV` in this process (with `env` laid over os.environ, None removing a variable);
    an exception that escapes `main` is a bug and fails the test as it is."""
    saved = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Outcome(code, out.getvalue(), err.getvalue())


def check_outcome(outcome: Outcome, written: Path | None = None, codes: tuple[int, ...] = (0, 2)) -> Outcome:
    """The property of every run on hostile input; `written`: a path a refusal must not create."""
    note(f"exit {outcome.code}: {' '.join(_GIST.sub('#', outcome.err).split()[1:5])}" if outcome.code else "exit 0")
    assert outcome.code in codes, f"exit code {outcome.code}; stderr:\n{outcome.err[-3000:]}"
    assert "Traceback" not in outcome.err, outcome.err[-3000:]
    if outcome.code == 2:
        assert len(outcome.lines) <= 1, f"not one stderr line:\n{outcome.err[:3000]}"
        assert len(outcome.err.encode("utf-8", "replace")) < MAX_LINE_BYTES, f"{len(outcome.err)} characters: {outcome.err[:300]}"
        if written is not None:
            assert not written.exists(), f"{written} was created by a refused run"
    return outcome


def note(text: str) -> None:
    """Count `text` among the outcomes of a generated test (`--hypothesis-show-statistics`)."""
    with contextlib.suppress(InvalidArgument):  # outside a generated test there are no statistics
        event(text)


def show(value: object) -> str:
    """A number as a user types it (`nan`, `-inf`, `1e+30`, `12`)."""
    return repr(value) if isinstance(value, float) and math.isfinite(value) else str(value)


#: Numbers no vitdeep option takes: NaN, ±inf, negatives, and whole numbers past every limit.
REFUSED_FLOATS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-300, -1e308]),
    st.floats(max_value=-1e-6, allow_nan=False),
)
REFUSED_INTS = st.one_of(st.sampled_from([-1, 2**63, 10**30, -(10**30)]), st.integers(max_value=-1), st.integers(min_value=10**18))
#: Any number at all, the refused ones among them.
ANY_INTEGER = st.one_of(st.sampled_from([0, 1, -1, 2**31, 2**63, 10**30]), st.integers(min_value=-(10**40), max_value=10**40))
ANY_NUMBER = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 0.5, 1e-300, 1e308]), st.floats(), ANY_INTEGER,
)
#: Words that are not numbers, as argv entries (no NUL: a command line cannot hold one).
JUNK = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
