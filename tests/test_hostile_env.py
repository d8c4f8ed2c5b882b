"""Generated launch environments, and starts that fail (issue 25): malformed, half-set or
inconsistent rank variables end in one line naming the variable, before anything is written; a
start that fails leaves nothing that blocks the same command run again.

Examples per test (`max_examples`): 200 environments; with the two real starts (one process
each, no DeepSpeed launcher) about 30 s.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hostile import MISSING, SETTINGS, check_outcome, run_cli
from launch import cpu_env
from vitdeep.engine.deepspeed import free_port
from vitdeep.fields import MAX_RANKS
from vitdeep.ranks import LAUNCH_VARIABLES

VARIABLES = (*LAUNCH_VARIABLES, "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
INTEGER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
_DECIMAL = re.compile(r"\s*\+?[0-9]+\s*")
VALUES = st.one_of(
    st.integers(-3, 4).map(str), st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["", " ", "abc", "1.5", "0x10", "١", "nan", "+2", " 3 ", "127.0.0.1", "localhost", "a b", "9" * 30]),
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8),
)
ENVIRONMENTS = st.dictionaries(st.sampled_from(VARIABLES), st.one_of(VALUES, st.none()), max_size=len(VARIABLES))


@settings(max_examples=200, **SETTINGS)
@given(env=ENVIRONMENTS)
@example(env={"WORLD_SIZE": "abc"})
@example(env={"WORLD_SIZE": "2"})
@example(env={"WORLD_SIZE": "2", "RANK": "0"})
@example(env={"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "5"})
@example(env={"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "5"})
@example(env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "70000"})
@example(env={"LOCAL_WORLD_SIZE": "0"})
@example(env={"LOCAL_SIZE": "-1", "LOCAL_WORLD_SIZE": "1"})  # found: LOCAL_SIZE went unchecked beside LOCAL_WORLD_SIZE
@example(env={"WORLD_SIZE": "1048577"})  # found: the range's upper end went unsaid
def test_any_launch_environment(env, tmp_path):
    """`train --dry-run` under any rank variables (the others unset): one line or none (a valid
    rank other than 0 leaves the report to rank 0), exit 2 (no shards here), nothing written; a
    variable that is not a whole number is named."""
    full = {name: env.get(name) for name in VARIABLES}
    out = tmp_path / f"out-{time.monotonic_ns()}"
    outcome = check_outcome(run_cli(["train", "--data", MISSING, "--out", str(out), "--dry-run"], env=full), written=out, codes=(2,))
    malformed = [name for name in INTEGER_VARIABLES if full[name] is not None and not _DECIMAL.fullmatch(full[name])]
    if malformed:  # refused, naming it or another variable read before it and out of its range
        assert "the environment sets" in outcome.err and any(f"{name}=" in outcome.err for name in INTEGER_VARIABLES), outcome.err
    elif full["WORLD_SIZE"] is not None and 1 < int(full["WORLD_SIZE"]) <= MAX_RANKS and all(
            full[name] is None for name in INTEGER_VARIABLES if name != "WORLD_SIZE"):
        assert "WORLD_SIZE" in outcome.err and "no RANK" in outcome.err, outcome.err
    elif full["WORLD_SIZE"] is not None and int(full["WORLD_SIZE"]) > MAX_RANKS:
        assert f"WORLD_SIZE={full['WORLD_SIZE']!r}" in outcome.err or "WORLD_SIZE=" not in outcome.err, outcome.err
        assert "whole number >= 1" not in outcome.err, outcome.err  # found: a number too large was told to be >= 1


TINY = ["--model", "deit_tiny_12", "--embed-dim", "64", "--num-heads", "2", "--depth", "2", "--img-size", "32",
        "--patch-size", "8", "--global-batch", "32", "--micro-batch", "16", "--workers", "1", "--steps", "2"]


@pytest.mark.slow
def test_a_lone_rank_of_two_ends_in_one_line_and_writes_nothing(digit_shards, tmp_path):
    """WORLD_SIZE=2 with RANK=0 and no second rank: the process group cannot form within
    --dist-timeout (here 6 s); one line, exit 1, no --out (was DeepSpeed's assertion and a
    leftover config.json)."""
    out = tmp_path / "out"
    env = cpu_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, "-m", "vitdeep", "train", "--data", str(digit_shards), "--out", str(out), *TINY,
                             "--ds-config", "cpu_fp32", "--dist-timeout", "0.1"], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and lines == [lines[-1]] and "could not form a process group" in lines[-1], result.stderr[-3000:]
    assert not out.exists()


@pytest.mark.slow
def test_a_failed_start_does_not_block_the_same_command(digit_shards, tmp_path):
    """A run whose engine fails to build (DeepSpeed refuses a bucket size) after --out was
    claimed leaves config.json there; the same command then runs, and only a run that logged a
    step counts as one."""
    ds_config = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": 1, "reduce_bucket_size": -5}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(ds_config))
    out = tmp_path / "out"
    args = ["train", "--data", str(digit_shards), "--out", str(out), *TINY]
    failed = subprocess.run([sys.executable, "-m", "vitdeep", *args, "--ds-config", str(bad)], env=cpu_env(),
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and (out / "config.json").is_file(), failed.stderr[-3000:]
    check_outcome(run_cli([*args, "--ds-config", "cpu_fp32", "--dry-run"]), codes=(0,))
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    refused = check_outcome(run_cli([*args, "--ds-config", "cpu_fp32", "--dry-run"]), codes=(2,))
    assert "holds a run with no complete checkpoint yet" in refused.err
