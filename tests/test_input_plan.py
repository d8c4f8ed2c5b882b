"""The plan's input verdict: the per-core decoding rate (measured here and cached, given, or
assumed) against what a node's ranks consume."""

from __future__ import annotations

import json
import os

import pytest

from tests.launch import refuses
from vitdeep.cores import usable_cores
from vitdeep.cli import main
from vitdeep.data import decode_rate
from vitdeep.data.decode_rate import DecodeRate, measured_decode_rate
from vitdeep.data.info import read_dataset_info
from vitdeep.data.options import AugmentConfig
from vitdeep.planner.input_verdict import InputVerdict


@pytest.fixture
def quick_measure(monkeypatch, tmp_path):
    """A private cache, and measurements of 8 images in one pass."""
    monkeypatch.setenv(decode_rate.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setattr(decode_rate, "MEASURE_IMAGES", 8)
    monkeypatch.setattr(decode_rate, "MEASURE_SECONDS", 0.0)
    return tmp_path / "cache" / decode_rate.CACHE_NAME


def test_the_measured_rate_is_cached_per_input_and_measured_again_when_it_changes(digit_shards, quick_measure, tmp_path):
    data = read_dataset_info(str(digit_shards), split="train")
    first = measured_decode_rate(32, AugmentConfig(), data)
    assert first.source == "measured here" and first.per_core > 0 and "8 images of" in first.detail
    again = measured_decode_rate(32, AugmentConfig(), data)
    assert again.source == "cached" and again.per_core == first.per_core
    assert measured_decode_rate(48, AugmentConfig(), data).source == "measured here"  # another image size
    assert measured_decode_rate(32, AugmentConfig(rand_augment=""), data).source == "measured here"  # another recipe
    assert measured_decode_rate(32, AugmentConfig(), data).per_core == first.per_core  # the first is still cached
    shard = data.urls[0]
    os.utime(shard, ns=(os.stat(shard).st_atime_ns, os.stat(shard).st_mtime_ns + 10**9))  # the shards changed
    assert measured_decode_rate(32, AugmentConfig(), data).source == "measured here"
    quick_measure.write_text("{not json")  # a broken cache is measured over, and replaced
    assert measured_decode_rate(32, AugmentConfig(), data).source == "measured here"
    assert len(json.loads(quick_measure.read_text())) == 1


def test_the_verdict_compares_a_nodes_cores_with_its_ranks():
    rate = DecodeRate(200.0, "--decode-rate", "as given")
    bound = InputVerdict(needed=15_000.0, rate=rate, cores=64, ranks_per_node=8, img_size=224, reduced_decode=False)
    assert bound.bound and bound.factor == pytest.approx(15_000 / 12_800) and bound.cores_needed == 75
    assert any("--max-size 256" in fix for fix in bound.fixes()) and any("--reduced-decode" in fix for fix in bound.fixes())
    assert any("75 cores" in fix for fix in bound.fixes()) and any("DALI" in fix for fix in bound.fixes())
    fed = InputVerdict(needed=1_000.0, rate=rate, cores=64, ranks_per_node=8, img_size=224, reduced_decode=True)
    assert not fed.bound and fed.fixes() == [] and "not input-bound" in fed.lines()[1]


def test_plan_json_has_the_rate_its_source_and_the_verdict_per_node(tmp_path, capsys):
    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "deit_tiny_12", "--img-size", "64", "--nodes", "2", "--gpus-per-node", "4",
              "--decode-rate", "500", "--cores-per-node", "6", "--json", str(out)])
    assert exit_info.value.code in (0, None)
    record = json.loads(out.read_text())
    verdict = record["input"]
    assert verdict["decode_rate"] == {"per_core": 500.0, "source": "--decode-rate", "detail": "measured elsewhere, as given"}
    assert verdict["ranks_per_node"] == 4 and verdict["cores_per_node"] == 6
    time = record["time"]
    per_node = record["global_batch"] / time["step_seconds"] / 2  # the node's share, not the world's
    assert verdict["images_per_second_per_node"] == pytest.approx(per_node)
    assert verdict["input_bound"] == (per_node > 3000) and verdict["gpus_over_cores"] == pytest.approx(per_node / 3000)
    printed = capsys.readouterr().out
    assert ("input-bound" if verdict["input_bound"] else "not input-bound") in printed
    assert time["decode_source"] == "--decode-rate"


def test_plan_names_the_rate_it_assumes_and_refuses_two_rates(tmp_path, capsys):
    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit):
        main(["plan", "--model", "deit_tiny_12", "--img-size", "64", "--json", str(out)])
    verdict = json.loads(out.read_text())["input"]
    assert verdict["decode_rate"]["source"] == "assumed" and "benchmarks/results/" in verdict["decode_rate"]["detail"]
    assert verdict["cores_per_node"] == usable_cores()
    assert "the decoding rate is assumed, from benchmarks/results/" in capsys.readouterr().out
    refuses(["plan", "--measure-data", "--decode-rate", "300"], capsys, "--measure-data")
    refuses(["plan", "--decode-rate", "0"], capsys, "--decode-rate")
    refuses(["plan", "--cores-per-node", "0"], capsys, "--cores-per-node")


def test_plan_measures_the_runs_own_shards(digit_shards, quick_measure, tmp_path, capsys):
    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit):
        main(["plan", "--model", "deit_tiny_12", "--img-size", "32", "--data", str(digit_shards), "--measure-data",
              "--json", str(out)])
    rate = json.loads(out.read_text())["input"]["decode_rate"]
    assert rate["source"] == "measured here" and str(digit_shards) in rate["detail"]
    assert quick_measure.is_file()


def test_training_warns_once_when_its_first_batches_wait_for_data():
    """A fake clock: 10 ms of compute per micro-batch, and waits for data of 30 ms (bound) or 0.5 ms."""
    from vitdeep.engine import input_watch
    from vitdeep.engine.input_watch import InputWatch

    def run(wait: float, reduced_decode: bool = True) -> list[str]:
        now = [0.0]
        watch = InputWatch(ranks_per_node=4, cores=16, reduced_decode=reduced_decode, clock=lambda: now[0])
        lines = []
        for _ in range(input_watch.SKIP + input_watch.WINDOW + 10):
            now[0] += wait
            line = watch.waited(wait, 8)
            now[0] += 0.010
            lines += [line] if line else []
        return lines

    bound = run(0.030)
    assert len(bound) == 1 and bound[0].startswith("input-bound: the rank waited for data 75% of micro-batches 5-36")
    assert "its loader delivered 200 img/s (800 for the node's 4 rank(s)), the model took 800 (3,200)" in bound[0]
    assert "16 usable cores" in bound[0] and "--max-size" in bound[0] and "--reduced-decode" not in bound[0]
    assert "--reduced-decode" in run(0.030, reduced_decode=False)[0]
    assert run(0.0005) == []
