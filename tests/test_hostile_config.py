"""Generated hostile input for the options (issue 25): numbers for every numeric flag of every
command, config files (YAML and JSON) with any keys and values, and the --dry-run plan of a real
run given them. Every run is in this process, none launches training.

Examples per test (`max_examples`): 300 + 100 flags, 150 YAML documents, 100 JSON documents, 60 dry
runs; with the plain tests about 30 s on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import typing

import pytest
import typer
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hostile import ANY_INTEGER, ANY_NUMBER, JUNK, MISSING, REFUSED_FLOATS, REFUSED_INTS, SETTINGS, check_outcome, run_cli, show
from vitdeep.cli import app
from vitdeep.config import SECTIONS, flat_fields, section_classes
from vitdeep.planner.cluster import Cluster
from vitdeep.fields import Checked, numeric_fields

TINY = ["--model", "deit_tiny_12", "--embed-dim", "64", "--num-heads", "2", "--depth", "2", "--img-size", "32",
        "--patch-size", "8", "--global-batch", "32", "--micro-batch", "16", "--workers", "1", "--ds-config", "cpu_fp32",
        "--steps", "6"]


def _numeric_flags() -> list[tuple[str, str, type]]:
    """(command, flag, int or float) of every numeric option of every command."""
    found = []
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            annotation = param.type_descriptor.annotation
            if typing.get_origin(annotation) is typing.Union:
                annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
            if annotation in (int, float) and param.opts:
                found.append((name, param.opts[0], annotation))
    return found


NUMERIC_FLAGS = _numeric_flags()


def _prefix(command: str, out: str) -> list[str]:
    """Arguments with which `command` gets past parsing to a refusal that writes nothing (missing
    input), were it not for the number under test."""
    return {
        "train": ["train", "--data", MISSING, "--out", out, "--dry-run"],
        "finetune": ["finetune", "--from", MISSING, "--data", MISSING, "--out", out, "--dry-run"],
        "plan": ["plan", "--data", MISSING],
        "ablate": ["ablate", f"{MISSING}.yaml", "--data", MISSING, "--val", MISSING, "--out", out, "--dry-run"],
        "analyze": ["analyze", "--checkpoint", MISSING, "--images", MISSING, "--out", out],
        "eval": ["eval", "--checkpoint", MISSING, "--data", MISSING, "--out", f"{out}/eval.json"],
        "models": ["models", "no_such_model"],
        "shards": ["shards", MISSING, out],
        "demo": ["demo", "--out", out],
        "fit-world": ["fit-world", out],
    }[command]


def test_every_numeric_option_declares_its_range():
    """Each config section and the planner's cluster checks its numbers through `Checked`, and
    every int / float field of them has a declared range (`numeric_fields` raises otherwise)."""
    for cls in [*section_classes().values(), Cluster]:
        assert issubclass(cls, Checked), cls
        names = {name for name, _ in numeric_fields(cls)}
        hints = typing.get_type_hints(cls)
        numeric = {f.name for f in dataclasses.fields(cls) if hints[f.name] in (int, float, typing.Optional[int], typing.Optional[float])}
        assert names == numeric, cls
    assert {c for c, _, _ in NUMERIC_FLAGS} >= {"train", "finetune", "plan", "ablate", "analyze", "eval", "models", "shards", "demo"}


REFUSED_NUMBERS = st.sampled_from(NUMERIC_FLAGS).flatmap(
    lambda flag: st.tuples(st.just(flag[0]), st.just(flag[1]), (REFUSED_INTS if flag[2] is int else REFUSED_FLOATS).map(show)))
#: The probes of issue 25 that were accepted or ended in a traceback.
PROBES = [("train", "--lr", "nan"), ("train", "--weight-decay", "nan"), ("train", "--drop-path", "nan"),
          ("train", "--max-bad-fraction", "nan"), ("train", "--dist-timeout", "nan"), ("plan", "--gpu-tflops", "nan"),
          ("train", "--dist-timeout", "inf"), ("train", "--warmup-epochs", "inf"), ("train", "--steps", str(10**30)),
          ("train", "--img-size", str(10**9)), ("train", "--dist-timeout", "1e300"), ("eval", "--max-bad-fraction", "nan"),
          ("analyze", "--img-size", str(10**9)), ("plan", "--mfu", "inf")]


@settings(max_examples=300, **SETTINGS)
@given(case=REFUSED_NUMBERS)
def test_numeric_flags_refuse_nan_inf_negative_and_huge(case, tmp_path):
    """No vitdeep number is negative, NaN or infinite, and no whole number reaches 10^18: every
    numeric flag of every command refuses such a value by name, in one line, writing nothing."""
    _refused(*case, tmp_path)


@pytest.mark.parametrize("case", PROBES, ids=" ".join)
def test_the_probes_of_issue_25(case, tmp_path):
    _refused(*case, tmp_path)


def _refused(command: str, flag: str, value: str, tmp_path) -> None:
    out = tmp_path / f"out-{time.monotonic_ns()}"
    outcome = check_outcome(run_cli([*_prefix(command, str(out)), flag, value]), written=out, codes=(2,))
    assert flag in outcome.err, f"{command} {flag} {value}: {outcome.err}"


@settings(max_examples=100, **SETTINGS)
@given(flag=st.sampled_from(NUMERIC_FLAGS), text=st.one_of(JUNK, ANY_NUMBER.map(show)))
def test_numeric_flags_take_any_text_without_a_traceback(flag, text, tmp_path):
    command, name, _ = flag
    out = tmp_path / f"out-{time.monotonic_ns()}"
    check_outcome(run_cli([*_prefix(command, str(out)), name, text]), written=out, codes=(2,))


# -- config files ----------------------------------------------------------------------------------

OPTION_NAMES = sorted(flat_fields())
#: Mostly option and section names, some of anything else a YAML key can be.
KEYS = st.one_of(*[st.sampled_from(OPTION_NAMES)] * 6, st.sampled_from(SECTIONS),
                 st.one_of(st.text(max_size=12), st.integers(-5, 10**30), st.none(), st.booleans(), st.floats()))
SCALARS = st.one_of(ANY_NUMBER, st.text(max_size=40), st.booleans(), st.none(),
                    st.sampled_from([".nan", ".inf", "-.inf", "NaN", "1e999", "0x10", "~", "''", "[]", "{}"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def _yaml_scalar(value) -> str:
    if isinstance(value, float):
        return ".nan" if math.isnan(value) else ".inf" if value == math.inf else "-.inf" if value == -math.inf else repr(value)
    if isinstance(value, str) and value in (".nan", ".inf", "-.inf", "NaN", "1e999", "0x10", "~", "''", "[]", "{}"):
        return value  # as written, for YAML to read
    return json.dumps(value)  # JSON is YAML's flow style


def _yaml_value(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return _yaml_scalar(value)


ENTRY = st.tuples(KEYS, st.one_of(VALUES, st.lists(st.tuples(st.sampled_from(OPTION_NAMES), VALUES), max_size=4)))
#: Top-level entries with distinct keys, and in half the documents the first key once more.
ENTRIES = st.tuples(st.lists(ENTRY, max_size=5, unique_by=lambda entry: json.dumps(entry[0])), st.booleans(), VALUES).map(
    lambda drawn: drawn[0] + [(drawn[0][0][0], drawn[2])] if drawn[1] and drawn[0] else drawn[0])


def _yaml_document(entries) -> str:
    """Top-level entries, a list of (key, value) pairs being a section (keys may repeat)."""
    lines = []
    for key, value in entries:
        if isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
            lines.append(f"{_yaml_scalar(key)}:")
            lines += [f"  {name}: {_yaml_value(v)}" for name, v in value]
        else:
            lines.append(f"{_yaml_scalar(key)}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"


@settings(max_examples=150, **SETTINGS)
@given(entries=ENTRIES)
@example(entries=[(123, 5)])
@example(entries=[(None, 5)])
@example(entries=[("lr", 0.001), ("seed", 1), ("lr", 0.002)])
@example(entries=[("optim", [("lr", math.nan)])])
@example(entries=[("lr", 1.0), ("optim", [("lr", 2.0)])])
@example(entries=[("optim", [("lr", 10**400)])])
def test_yaml_configs_are_refused_in_one_line_or_accepted(entries, tmp_path):
    """A YAML config of any keys and values: the run stops at its input (no shards here) with one
    line; a repeated key or a key that is not a word is named."""
    config = tmp_path / f"c{time.monotonic_ns()}.yaml"
    config.write_text(_yaml_document(entries))
    out = tmp_path / f"out-{time.monotonic_ns()}"
    outcome = check_outcome(run_cli(["train", "--data", MISSING, "--out", str(out), "--config", str(config), "--dry-run"]),
                            written=out, codes=(2,))
    top = [key for key, _ in entries]
    if len({json.dumps(k) for k in top}) < len(top):
        assert "twice" in outcome.err or "not valid YAML" in outcome.err or "option names" in outcome.err, outcome.err


@settings(max_examples=100, **SETTINGS)
@given(pairs=st.tuples(st.lists(st.tuples(st.one_of(*[st.sampled_from(OPTION_NAMES)] * 4, st.text(max_size=10)), VALUES), max_size=6,
                                 unique_by=lambda pair: pair[0]), st.booleans()).map(
    lambda drawn: drawn[0] + drawn[0][:1] if drawn[1] else drawn[0]))
@example(pairs=[("lr", math.nan)])
@example(pairs=[("lr", 1), ("lr", 2)])
def test_json_configs_are_refused_in_one_line_or_accepted(pairs, tmp_path):
    config = tmp_path / f"c{time.monotonic_ns()}.json"
    config.write_text("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}")
    out = tmp_path / f"out-{time.monotonic_ns()}"
    outcome = check_outcome(run_cli(["train", "--data", MISSING, "--out", str(out), "--config", str(config), "--dry-run"]),
                            written=out, codes=(2,))
    if len({k for k, _ in pairs}) < len(pairs):
        assert "twice" in outcome.err, outcome.err


def _alias_bomb(levels: int = 9) -> str:
    lines = ['  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    names = "abcdefghijklmnop"
    for previous, name in zip(names, names[1:levels]):
        lines.append(f"  {name}: &{name} [{', '.join(['*' + previous] * 9)}]")
    return "x:\n" + "\n".join(lines) + f"\noptim:\n  lr: *{names[levels - 1]}\n"


@pytest.mark.parametrize("text, needle", [
    (_alias_bomb(), "expands to more than 100,000 values"),  # 9^9 values: 351 MB of message, 2 GB, 13 s before
    ("optim:\n  lr: &a [*a]\n", "refers to a value that contains it"),
    ("lr: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),
    ("lr: " + "9" * 5000 + "\n", "not valid YAML"),
    ("lr: 1\nlr: 2\n", "key 'lr' is given twice (lines 1 and 2)"),
])
def test_config_documents_that_would_exhaust_or_mislead(text, needle, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    start = time.perf_counter()
    outcome = check_outcome(run_cli(["train", "--data", MISSING, "--out", str(tmp_path / "out"), "--config", str(config),
                                     "--dry-run"]), written=tmp_path / "out", codes=(2,))
    assert needle in outcome.err and time.perf_counter() - start < 5


# -- the plan and --dry-run of a real run ---------------------------------------------------------

def _plausible(kind: type) -> st.SearchStrategy[str]:
    """A number for a flag of this type, as often in the range a run takes as outside it."""
    if kind is int:
        return st.one_of(st.integers(0, 64), ANY_INTEGER).map(show)
    return st.one_of(st.floats(0, 1), st.integers(0, 64), ANY_NUMBER).map(show)


TRAIN_CHANGE = st.sampled_from([(f, kind) for c, f, kind in NUMERIC_FLAGS if c == "train"]).flatmap(
    lambda flag: st.tuples(st.just(flag[0]), _plausible(flag[1])))


@settings(max_examples=60, **SETTINGS)
@given(changes=st.lists(TRAIN_CHANGE, max_size=2))
@example(changes=[("--lr", "1e-300"), ("--dist-timeout", "10080")])
@example(changes=[("--warmup-epochs", "1000000")])
@example(changes=[("--base-lr", "1e+308")])  # found: the peak lr base_lr × 32 / 512 overflowed to inf
def test_dry_run_of_a_real_plan_with_any_numbers(changes, digit_shards, tmp_path):
    """TINY's run over the digits, with flags set to any numbers: planned and printed (exit 0) or
    refused in one line (2); a dry run writes nothing either way."""
    out = tmp_path / f"out-{time.monotonic_ns()}"
    flags = [part for flag, value in changes for part in (flag, value)]
    outcome = check_outcome(run_cli(["train", "--data", str(digit_shards), "--out", str(out), *TINY, *flags, "--dry-run"]))
    assert not out.exists()
    if outcome.code == 0:
        assert "peak lr" in outcome.out and not re.search(r"\b(nan|inf)\b", outcome.out, re.IGNORECASE)


# ---- --set KEY=VALUE (issue 26) ----------------------------------------------------------------


def test_set_overrides_resolve_as_the_same_config_file_does(digit_shards, tmp_path):
    """`--set` takes a config file's keys (flat or SECTION.NAME) and values (YAML), so a run given
    them either way is the same run; --set lies over --config."""
    common = ["train", "--data", str(digit_shards), "--out", str(tmp_path / "out"), "--dry-run", *TINY]
    config = tmp_path / "config.yaml"
    config.write_text("optim:\n  lr: 3.0e-3\nhflip: 0.0\nrand_augment: ''\nattnscale: true\nepochs: 9\n")
    from_file = check_outcome(run_cli([*common, "--config", str(config)]), codes=(0,))
    sets = ["--set", "optim.lr=3e-3", "--set", "hflip=0", "--set", "augment.rand_augment=", "--set", "model.attnscale=true"]
    from_sets = check_outcome(run_cli([*common, *sets, "--set", "epochs=9"]), codes=(0,))
    assert from_sets.out == from_file.out and "0.003" in from_sets.out
    config.write_text("epochs: 9\nlr: 1.0\n")
    over_file = check_outcome(run_cli([*common, "--config", str(config), *sets]), codes=(0,))
    assert over_file.out == from_file.out


@pytest.mark.parametrize("pair, needle", [
    ("lrr=1", "--set lrr: unknown option 'lrr'"),
    ("optim.depth=3", "--set optim.depth: depth is a model option: model.depth or depth"),
    ("lr=abc", "--set lr: option lr='abc' should be of type float"),
    ("optim.lr=-1", "--set optim.lr: lr must be > 0, got -1"),
    ("epochs=1.5", "--set epochs: option epochs=1.5 should be of type int"),
    ("lr=[1", "--set lr is not valid YAML"),
    ("lr", "--set 'lr' is not KEY=VALUE"),
    ("micro_batch=8", "--set micro_batch and --micro-batch both set it"),
])
@pytest.mark.parametrize("command", ["train", "finetune", "plan", "ablate"])
def test_a_bad_set_exits_2_naming_it(command, pair, needle, digit_shards, tmp_path):
    out = tmp_path / "out"
    data = ["--data", str(digit_shards), "--out", str(out)]
    args = {"train": ["train", *data, "--dry-run"], "finetune": ["finetune", "--from", str(MISSING), *data, "--dry-run"],
            "plan": ["plan"], "ablate": ["ablate", "remedies", *data, "--val", str(digit_shards), "--dry-run"]}[command]
    outcome = check_outcome(run_cli([*args, *TINY, "--set", pair]), out)
    assert outcome.code == 2 and needle in outcome.err, outcome.err


def test_plan_takes_set(tmp_path):
    record = tmp_path / "plan.json"
    check_outcome(run_cli(["plan", *TINY, "--gpus-per-node", "1", "--set", "model.grad_checkpointing=true", "--json", str(record)]), codes=(0,))
    assert json.loads(record.read_text())["requested"]["grad_checkpointing"] is True
