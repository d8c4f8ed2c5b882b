"""Elastic runs on real CPU ranks: the same samples in the same order on any split of the global
batch, and a run stopped on 2 ranks going on on 4 or on 1 with the losses it would have had.

The ranks are DeepSpeed engines over gloo; the only difference left between splits is the order of
float sums. One parameter is the exception that shows it: the key third of each attention block's
`qkv.bias`. Its true gradient is zero (the softmax ignores a constant added to all of a query's
scores), so Adam sees only rounding noise there and scales it into steps of lr size and random sign;
it takes no part in any output. It is compared apart (`_relative_differences`).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.launch import SMALL, deepspeed_cmd, metrics, ranks_cmd, refuses, run, single_cmd, with_script
from vitdeep.engine.checkpoint import MOMENTS, complete_checkpoints, consolidate, read_marker, saved_optimizer_step, tag_for
from vitdeep.engine.ledger import read_ledger

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).parent / "scripts"
STEPS = 12
#: DeiT's augmentation (RandAugment, random erasing, Mixup / CutMix), drop path, 12 fp32 steps.
ELASTIC = [*SMALL, "--global-batch", "32", "--rand-augment", "rand-m9-mstd0.5-inc1", "--hflip", "0.5", "--scale-min", "0.3",
           "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.1", "--steps", str(STEPS),
           "--sample-ledger", "--save-every", "100", "--seed", "5"]
SPLITS = {"1x8": (1, 8), "2x16": (2, 16), "2x8": (2, 8), "4x8": (4, 8)}
TOLERANCE = 1e-4


def _train(shards: Path, out: Path, ranks: int, micro_batch: int, *extra: str, script: list | None = None) -> None:
    args = ["train", "--data", str(shards), "--out", str(out), *ELASTIC, "--micro-batch", str(micro_batch), *extra]
    cmd = single_cmd(args) if ranks == 1 else ranks_cmd(args, ranks)
    run(with_script(cmd, *script) if script else cmd)


@pytest.fixture(scope="module")
def splits(digit_shards, tmp_path_factory):
    """The same fp32 ZeRO-2 run on 1 rank × micro-batch 8 × 4 accumulation, 2 × 16, 2 × 8 × 2, 4 × 8."""
    root = tmp_path_factory.mktemp("splits")
    for name, (ranks, micro_batch) in SPLITS.items():
        _train(digit_shards, root / name, ranks, micro_batch, "--ds-config", "zero2_fp32")
    return root


def _weights(out: Path, part: str = "weights") -> dict[str, torch.Tensor]:
    path = complete_checkpoints(out)[-1]
    return consolidate(path, read_marker(path)["zero_stage"], part=part)


def _relative_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[dict[str, float], float]:
    """‖Δw‖/‖w‖ per tensor (the query and value thirds of `qkv.bias`), and the largest over the key thirds."""
    differences, key_bias = {}, 0.0
    for name in a:
        x, y = a[name].double(), b[name].double()
        if name.endswith("attn.qkv.bias"):
            q, k, v = x.chunk(3)
            q2, k2, v2 = y.chunk(3)
            key_bias = max(key_bias, ((k - k2).norm() / k.norm()).item())
            x, y = torch.cat([q, v]), torch.cat([q2, v2])
        differences[name] = ((x - y).norm() / x.norm().clamp_min(1e-30)).item()
    return differences, key_bias


def _loss_difference(a: Path, b: Path, steps) -> float:
    ma, mb = metrics(a), metrics(b)
    return max(abs(ma[s]["loss"] - mb[s]["loss"]) / abs(ma[s]["loss"]) for s in steps)


def test_the_same_run_on_any_split_has_the_same_losses_weights_and_samples(splits, capsys):
    reference = splits / "2x16"
    ledger = read_ledger(reference)
    assert sorted(ledger) == list(range(1, STEPS + 1))
    assert all([row[0] for row in entry["samples"]] == list(range(32)) for entry in ledger.values())
    keys = [row[1] for entry in ledger.values() for row in entry["samples"]]
    assert len(keys) == len(set(keys)) == STEPS * 32, "no sample twice in an epoch"
    with capsys.disabled():
        print()
        for name in SPLITS:
            loss = _loss_difference(reference, splits / name, range(1, STEPS + 1))
            differences, key_bias = _relative_differences(_weights(reference), _weights(splits / name))
            worst = max(differences, key=differences.get)
            print(f"split {name}: losses within {loss:.1e} relative, weights within {differences[worst]:.1e} ({worst}), "
                  f"key biases {key_bias:.2f}")
            assert read_ledger(splits / name) == ledger, name
            assert loss <= TOLERANCE, name
            assert differences[worst] <= TOLERANCE, (name, worst)
    config = json.loads((reference / "config.json").read_text())
    assert config["data"]["lanes"] == 32, "the lanes chosen at the start are recorded"


ZERO3_FP32 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                                 "stage3_prefetch_bucket_size": "auto"}}


@pytest.fixture(scope="module", params=["zero2", "zero3-ema"])
def stopped(request, splits, digit_shards, tmp_path_factory):
    """A 2-rank run (micro-batch 16) stopped by SIGTERM during micro-batch 5, and the uninterrupted one."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "zero2":
        extra, reference = ["--ds-config", "zero2_fp32"], splits / "2x16"
    else:
        (root / "zero3_fp32.json").write_text(json.dumps(ZERO3_FP32))
        extra, reference = ["--ds-config", str(root / "zero3_fp32.json"), "--ema-decay", "0.9"], root / "reference"
        _train(digit_shards, reference, 2, 16, *extra)
    stopped = root / "stopped"
    args = ["train", "--data", str(digit_shards), "--out", str(stopped), *ELASTIC, "--micro-batch", "16", *extra]
    result = run(with_script(deepspeed_cmd(args, 2), SCRIPTS / "fault_hook.py", "signal:1:5:TERM"), check=False)
    assert result.returncode == 75, result.stderr[-3000:]
    return root, stopped, reference, extra


@pytest.mark.parametrize("ranks", [4, 1])
def test_a_run_stopped_on_2_ranks_goes_on_on_another_number_with_the_same_losses(stopped, digit_shards, ranks, capsys):
    root, stopped_run, reference, extra = stopped
    checkpoint = complete_checkpoints(stopped_run)[-1]
    step = read_marker(checkpoint)["step"]
    assert 0 < step < STEPS
    out, copy = root / f"on{ranks}", root / f"copy{ranks}"
    shutil.copytree(stopped_run, out)
    _train(digit_shards, out, ranks, 16, *extra, "--resume", "auto",
           script=[SCRIPTS / "resharded_copy.py", str(copy)])
    resharded = copy / "checkpoints" / tag_for(step)
    stage = read_marker(checkpoint)["zero_stage"]
    assert read_marker(resharded)["world_size"] == ranks
    parts = ["weights", *MOMENTS] + (["ema"] if "--ema-decay" in extra else [])
    for part in parts:
        before, after = consolidate(checkpoint, stage, part=part), consolidate(resharded, stage, part=part)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[name], after[name]) for name in before), f"{part} not bitwise equal after resharding"
    assert torch.equal(saved_optimizer_step(checkpoint, stage), saved_optimizer_step(resharded, stage))
    assert read_ledger(out) == read_ledger(reference), "the same samples at the same global positions"
    loss = _loss_difference(reference, out, range(step + 1, STEPS + 1))
    differences, key_bias = _relative_differences(_weights(reference), _weights(out))
    with capsys.disabled():
        print(f"\n{root.name} stopped at step {step} on 2 ranks, resumed on {ranks}: losses within {loss:.1e}, weights within "
              f"{max(differences.values()):.1e}, key biases {key_bias:.2f}; {', '.join(parts)} bitwise after resharding")
    assert loss <= TOLERANCE
    assert max(differences.values()) <= TOLERANCE
    if "--ema-decay" in extra:
        ema, _ = _relative_differences(_weights(reference, "ema"), _weights(out, "ema"))
        assert max(ema.values()) <= TOLERANCE


def test_a_world_size_the_lanes_do_not_fit_is_refused_in_one_line(splits, digit_shards, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(splits / "2x16", out)
    before = sorted(p.name for p in out.rglob("*"))
    for name, value in dict(WORLD_SIZE="3", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999").items():
        monkeypatch.setenv(name, value)
    err = refuses(["train", "--data", str(digit_shards), "--out", str(out), *ELASTIC, "--micro-batch", "16",
                   "--ds-config", "zero2_fp32", "--steps", "20", "--resume", "auto"], capsys,
                  "a run with 32 lanes (global batch 32) runs on 1, 2, 4, 8, 16 ranks, not 3")
    assert len(err) < 300
    assert sorted(p.name for p in out.rglob("*")) == before, "nothing written"


#: A run of vitdeep before the lane order (commit 851521d), kept with its checkpoint at step 4 of 8 and
#: the metrics of all 8 steps: 2 ranks, fp32 ZeRO-2, the digits, with these options.
PER_RANK_RUN = Path(__file__).parent / "data" / "per_rank_run"
PER_RANK_ARGS = ["--model", "deit_tiny_12", "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--img-size", "16",
                 "--patch-size", "4", "--global-batch", "32", "--micro-batch", "16", "--workers", "1", "--ds-config", "zero2_fp32",
                 "--steps", "8", "--save-every", "4", "--drop-path", "0.1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
                 "--log-every", "1", "--lr", "1e-3", "--warmup-steps", "2", "--seed", "5", "--ema-decay", "0.9"]


def test_a_checkpoint_from_before_the_lanes_resumes_exactly_in_its_own_order(digit_shards, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(PER_RANK_RUN, out)
    assert "stream" not in read_marker(out / "checkpoints" / tag_for(4))
    result = run(ranks_cmd(["train", "--data", str(digit_shards), "--out", str(out), *PER_RANK_ARGS, "--resume", "auto"], 2))
    assert "at step 4" in result.stdout + result.stderr
    reference = {row["step"]: row for row in map(json.loads, (PER_RANK_RUN / "reference_metrics.jsonl").read_text().splitlines())
                 if row["kind"] == "train"}
    resumed = metrics(out)
    for step in range(5, 9):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6), step
    assert "stream" not in read_marker(complete_checkpoints(out)[-1]), "it keeps its order in later checkpoints too"


def test_a_checkpoint_from_before_the_lanes_says_what_it_can_do_on_another_world_size(digit_shards, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(PER_RANK_RUN, out)
    monkeypatch.setenv("WORLD_SIZE", "1")
    refuses(["train", "--data", str(digit_shards), "--out", str(out), *PER_RANK_ARGS, "--resume", "auto"], capsys,
            "resumes on 2 ranks only, not 1 (or start a new run from it with `vitdeep finetune --from`)")
