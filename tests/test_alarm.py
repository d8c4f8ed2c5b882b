"""The over-smoothing alarm: its rule on CosSim series recorded from the demo's two runs, the
refusal without measurements, and one tiny training that the alarm stops."""

from __future__ import annotations

import json
import math

import pytest

from tests.launch import SMALL, refuses, run, single_cmd
from vitdeep.engine.alarm import ALARM_RISE, ALARM_WINDOW, EXIT_OVERSMOOTHED, OversmoothingAlarm
from vitdeep.engine.signals import EXIT_STOPPED

#: The last layer's patch CosSim (`cossim/last`) once per epoch (every 23 steps) over the 30
#: epochs of `vitdeep demo`'s two runs (recipes/demo_digits.yaml, 2 CPU ranks, seed 0,
#: --oversmoothing-every 23), recorded 2026-12-05: CE only over-smooths, CE + ℓ_cos + ℓ_cons does not.
BASELINE = [0.064, 0.07, 0.051, 0.112, 0.221, 0.77, 0.515, 0.539, 0.58, 0.539, 0.487, 0.44, 0.554, 0.62, 0.831, 0.538, 0.675,
            0.212, 0.23, 0.327, 0.539, 0.352, 0.591, 0.459, 0.391, 0.327, 0.203, 0.305, 0.374, 0.441]
REMEDIES = [-0.04, -0.049, -0.052, -0.021, -0.05, -0.046, -0.026, -0.032, -0.013, -0.035, -0.022, -0.012, -0.01, -0.022, -0.029,
            -0.02, -0.026, -0.025, -0.033, -0.028, -0.028, -0.025, -0.033, -0.027, -0.03, -0.043, -0.034, -0.043, -0.045, -0.045]
#: A threshold between the two runs' levels (the plain run settles at 0.2–0.8, the remedies near −0.03).
THRESHOLD = 0.3


def fired_at(series: list[float], threshold: float = THRESHOLD) -> list[int]:
    alarm = OversmoothingAlarm(threshold)
    return [i for i, value in enumerate(series) if alarm.observe(value) is not None]


def test_the_demos_plain_run_sounds_the_alarm_and_its_remedies_run_does_not():
    baseline, remedies = fired_at(BASELINE), fired_at(REMEDIES)
    print(f"alarm at {THRESHOLD}: plain run at measurement {baseline}, remedies run {remedies}")
    assert baseline == [5] and remedies == []  # epoch 6: 0.112 → 0.221 → 0.770, a rise of 0.66
    assert fired_at(BASELINE[8:]) == [2]  # watched from epoch 9 on: three measurements above 0.3


def test_the_rule_stays_above_or_rises_and_fires_once():
    assert fired_at([0.5, 0.5, 0.2, 0.5, 0.5, 0.5, 0.9], threshold=0.4) == [5]  # three in a row above 0.4, once
    assert fired_at([0.0, 0.1, 0.3], threshold=0.9) == [2]  # rose at each by 0.3 > ALARM_RISE in all
    assert fired_at([0.0, 0.2, 0.19, 0.3], threshold=0.9) == []  # not a rise at every measurement
    assert fired_at([0.0, 0.1, 0.2], threshold=0.9) == []  # rose by 0.2 only
    assert fired_at([0.5, math.nan, 0.5, math.inf, 0.5], threshold=0.4) == [4]  # non-finite values skipped
    assert fired_at([0.4] * 10, threshold=0.4) == []  # above, not at
    assert ALARM_WINDOW == 3 and ALARM_RISE == 0.25  # as the README and --help state them


def test_the_alarm_needs_measurements(digit_shards, tmp_path, capsys):
    out = tmp_path / "out"
    refuses(["train", "--data", str(digit_shards), "--out", str(out), *SMALL, "--oversmoothing-alarm", "0.5",
             "--oversmoothing-every", "0"], capsys, "--oversmoothing-every", out)


@pytest.mark.slow
def test_the_alarm_stops_a_run_with_a_checkpoint_and_its_own_exit_code(digit_shards, tmp_path):
    """A 6-block ViT at random init has alike tokens: a low threshold fires at the third
    measurement (step 3); `stop` saves that step, logs the alarm and exits with code 3."""
    out = tmp_path / "run"
    result = run(single_cmd(["train", "--data", str(digit_shards), "--out", str(out), *SMALL, "--workers", "0", "--steps", "8",
                             "--oversmoothing-every", "1", "--oversmoothing-alarm", "0.01", "--oversmoothing-action", "stop"]),
                 check=False)
    assert result.returncode == EXIT_OVERSMOOTHED != EXIT_STOPPED, result.stderr[-3000:]
    assert "over-smoothing alarm at step 3" in result.stdout and "over-smoothing alarm at step 3" in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    alarms = [row for row in rows if row["kind"] == "alarm"]
    assert len(alarms) == 1 and alarms[0]["step"] == 3 and alarms[0]["action"] == "stop"
    assert max(row["step"] for row in rows if row["kind"] == "train") == 3
    assert (out / "checkpoints" / "step_00000003").is_dir()
    assert any(path.name.startswith("events") for path in (out / "tb").iterdir())
