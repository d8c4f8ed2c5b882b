"""`vitdeep train` for real: DeepSpeed engines on 2 CPU ranks over gloo, real shards of real images."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.launch import SMALL, cpu_env, deepspeed_cmd, mean, metrics, ranks_cmd, refuses, run, shm_files, single_cmd, train_args, with_script
from vitdeep.cli import main
from vitdeep.engine.checkpoint import MARKER, complete_checkpoints, read_marker
from vitdeep.engine.deepspeed import free_port

@pytest.fixture(scope="module")
def zero2_run(digit_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    result = run(ranks_cmd(train_args(digit_shards, out, "--steps", "40", "--ds-config", "zero2_bf16",
                                      "--mixup", "0", "--cutmix", "0", "--save-every", "20",
                                      "--val", str(digit_shards), "--oversmoothing-every", "10")))
    return out, result


@pytest.mark.slow
def test_zero2_bf16_two_ranks_learns_and_checkpoints(zero2_run):
    out, result = zero2_run
    rows = metrics(out)
    assert sorted(rows) == list(range(1, 41))
    # 40 steps of a 6-block ViT on 16 px digits: CE barely leaves ln 10 and single steps swing by
    # 0.1, so the trend is read from ten-step means (2.330 → 2.294 in the lane order)
    first, last = mean(rows[s]["ce"] for s in range(1, 11)), mean(rows[s]["ce"] for s in range(31, 41))
    print(f"ZeRO-2 bf16 CE: first 10 steps {first:.3f}, last 10 {last:.3f}")
    assert last < first - 0.02
    assert {"contrastive", "patch_mix", "lr", "images_per_s"} <= set(rows[40])
    lrs = [rows[s]["lr"] for s in range(1, 41)]
    peak = lrs.index(max(lrs)) + 1
    assert 2 <= peak <= 5 and lrs[:peak] == sorted(lrs[:peak]) and lrs[0] < lrs[peak - 1]  # warm-up (3 steps)
    assert lrs[peak - 1:] == sorted(lrs[peak - 1:], reverse=True) and lrs[-1] < 0.5 * max(lrs)  # then cosine decay
    assert max(lrs) <= 2e-3 * (1 + 1e-9)
    for step, row in rows.items():
        for key in ("ce", "contrastive", "patch_mix", "images_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (step, key, row[key])
    plan = json.loads((out / "config.json").read_text())["plan"]
    assert (plan["world size"], plan["total steps"], plan["ZeRO stage"], plan["precision"]) == (2, 40, 2, "bf16")
    checkpoints = complete_checkpoints(out)
    assert [read_marker(p)["step"] for p in checkpoints] == [20, 23, 40]  # every 20 steps, each epoch's end, the end
    assert read_marker(checkpoints[-1])["world_size"] == 2
    assert (out / "config.json").is_file() and list((out / "tb").iterdir())
    assert metrics(out, "oversmoothing")[10]["cossim/last"] > 0
    oversmoothing = metrics(out, "oversmoothing")
    assert sorted(oversmoothing) == [10, 20, 30, 40]
    for row in oversmoothing.values():
        cossims = [v for k, v in row.items() if k.startswith("cossim/")]
        assert cossims and all(-1 - 1e-6 <= v <= 1 + 1e-6 for v in cossims), row
    val = metrics(out, "val")
    assert set(val) == {23, 40} and {"top1", "ema_top1", "top5"} <= set(val[23])  # each epoch's end, the run's end
    assert 0 <= val[23]["top1"] <= val[23]["top5"] <= 100 and 0 <= val[23]["ema_top1"] <= 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["skipped_steps"] == 0


@pytest.mark.slow
def test_zero3_bf16_two_ranks(digit_shards, tmp_path):
    run(ranks_cmd(train_args(digit_shards, tmp_path, "--steps", "30", "--ds-config", "zero3_bf16", "--mixup", "0",
                             "--cutmix", "0", "--val", str(digit_shards), "--save-every", "15")))
    rows = metrics(tmp_path)
    first, last = mean(rows[s]["ce"] for s in range(1, 6)), mean(rows[s]["ce"] for s in range(26, 31))
    print(f"ZeRO-3 bf16 CE: first 5 steps {first:.3f}, last 5 {last:.3f}")
    assert last < first - 0.03
    assert [read_marker(p)["step"] for p in complete_checkpoints(tmp_path)] == [15, 23, 30]
    assert metrics(tmp_path, "val")[23]["ema_top1"] >= 0
    assert all(read_marker(p)["zero_stage"] == 3 for p in complete_checkpoints(tmp_path))
    val = metrics(tmp_path, "val")[23]
    assert 0 <= val["ema_top1"] <= 100 and 0 <= val["top1"] <= val["top5"] <= 100


@pytest.mark.slow
def test_single_process_fp32_short_run_reports_its_final_validation(digit_shards, tmp_path, capsys):
    """4 steps of an epoch of 46: the run ends mid-epoch and still validates at its end; resuming
    it says it is complete; off a terminal it logs plain lines; its config.json reruns."""
    result = run(single_cmd(train_args(digit_shards, tmp_path, "--steps", "4", "--ds-config", "cpu_fp32", "--global-batch", "32",
                                       "--val", str(digit_shards))))
    marker = read_marker(complete_checkpoints(tmp_path)[-1])
    assert marker["world_size"] == 1 and marker["precision"] == "fp32" and marker["step"] == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["top1"] <= summary["top5"] <= 100 and marker["val"]["top1"] == summary["top1"] and marker["validated"]
    assert sorted(metrics(tmp_path, "val")) == [4] and "epoch 0 (step 4): top1" in result.stdout
    # one line before the first step says the set-up, the threads and workers chosen included
    assert re.search(r"^training deit_tiny_12 \(0\.\d M parameters\) on 1 rank\(s\) \(cpu\), ZeRO-\d fp32; global batch 32 = "
                     r"micro-batch 16 × 2 accumulation × 1 ranks; 4 steps; per rank 1 CPU thread \(of \d+ usable cores\) "
                     r"and 1 loader worker$", result.stdout, re.M), result.stdout[:2000]
    # off a terminal, a plain line every --log-every (1) steps
    lines = re.findall(r"^step (\d)/4 \(\d+%\)  epoch 0  .*ce \d\.\d{3}.*  lr \S+  \d+ img/s  ETA \d:\d\d:\d\d$", result.stdout, re.M)
    assert lines == ["1", "2", "3", "4"], result.stdout
    before = sorted((path, path.stat().st_mtime_ns) for path in tmp_path.rglob("*"))
    again = run(single_cmd(train_args(digit_shards, tmp_path, "--steps", "4", "--ds-config", "cpu_fp32", "--global-batch", "32",
                                      "--val", str(digit_shards), "--resume", "auto")))
    assert "is complete: step_00000004 is step 4 of 4, validated; nothing to train" in again.stdout
    assert "train" not in again.stdout.replace("nothing to train", "")  # no progress bar, no engine
    assert sorted((path, path.stat().st_mtime_ns) for path in tmp_path.rglob("*")) == before
    # the run's config.json (options and the resolved plan:) reruns as --config; the rerun names its --out
    refuses(["train", "--config", str(tmp_path / "config.json"), "--dry-run"], capsys, "pass --out")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path.parent / f"{tmp_path.name}-again"), "--dry-run"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and '"train_batch_size": 32' in out and "total steps" in out, out



@pytest.mark.slow
def test_val_every_validates_every_nth_epoch_and_after_the_last(digit_shards, tmp_path):
    """1,500 digits at global batch 64: 23 steps an epoch. `--val-every 2` over 3 epochs validates
    after the second epoch and after the last, and saves a checkpoint only before validating."""
    run(single_cmd(train_args(digit_shards, tmp_path, "--epochs", "3", "--ds-config", "cpu_fp32", "--val", str(digit_shards),
                              "--val-every", "2", "--save-every", "1000")))
    assert sorted(metrics(tmp_path, "val")) == [46, 69]
    assert [read_marker(path)["step"] for path in complete_checkpoints(tmp_path)] == [46, 69]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300.0, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"run ended before the condition held:\n{process.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            _kill(process)
            raise AssertionError("timed out")
        time.sleep(poll)


FP32_RESUME = ["--steps", "16", "--ds-config", "cpu_fp32", "--save-every", "5", "--ema-decay", "0.9"]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(digit_shards, tmp_path):
    """fp32, fixed seed: the resumed run takes the same lr and the same losses (within 1e-5). The
    killed run is the DeepSpeed launcher's: SIGKILL to its process group leaves no RAM behind."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    finished_port, killed_port = free_port(), free_port()
    run(ranks_cmd(train_args(digit_shards, reference, *FP32_RESUME), port=finished_port))
    process = _start(deepspeed_cmd(train_args(digit_shards, killed, *FP32_RESUME, "--tracker", "mlflow"), port=killed_port))
    _wait_for(lambda: (killed / "checkpoints" / "step_00000005" / MARKER).is_file(), process)
    _kill(process)
    assert shm_files(finished_port) == shm_files(killed_port) == [], "runs, finished or killed, must leave no RAM behind"
    resumed_from = read_marker(complete_checkpoints(killed)[-1])["step"]
    assert resumed_from < 16
    started_in = json.loads((killed / "tracker.json").read_text())["run_id"]
    result = run(ranks_cmd(train_args(digit_shards, killed, *FP32_RESUME, "--resume", "auto", "--tracker", "mlflow")))
    assert f"at step {resumed_from}" in result.stdout + result.stderr
    expected, got = metrics(reference), metrics(killed)
    for step in range(resumed_from + 1, 17):
        assert got[step]["lr"] == pytest.approx(expected[step]["lr"], rel=1e-12)
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-5), f"step {step}"
    print(f"resumed at step {resumed_from}; losses of steps {resumed_from + 1}..16 equal the uninterrupted run's")
    _check_mlflow_run(killed, started_in, got)


def _check_mlflow_run(out: Path, run_id: str, logged: dict[int, dict]) -> None:
    """The resumed run went on in the MLflow run the killed one started; MLflow holds the scalars
    of metrics.jsonl under TensorBoard's names (a step trained twice: its last value is the
    kept one) and the options as parameters."""
    from mlflow import MlflowClient

    assert json.loads((out / "tracker.json").read_text()) == {"tracker": "mlflow", "run_id": run_id}
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == out.name
    assert tracked.data.params["optim.lr"] == "0.002" and tracked.data.params["run.tracker"] == "mlflow"
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: (m.step, m.timestamp))
    last = {m.step: m.value for m in history}
    assert sorted(last) == list(range(1, 17)) and all(last[s] == pytest.approx(logged[s]["loss"], rel=1e-12) for s in last)
    assert len(client.search_runs([tracked.info.experiment_id])) == 1, "one MLflow run for the run and its resume"


NAN_SCRIPT = Path(__file__).parent / "scripts" / "train_with_nan.py"




@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_is_skipped_by_all(digit_shards, tmp_path):
    args = train_args(digit_shards, tmp_path, "--steps", "8", "--ds-config", "zero2_bf16", "--dist-timeout", "1")
    result = run(with_script(ranks_cmd(args), NAN_SCRIPT, "3"), timeout=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {**summary, "steps": 8, "skipped_steps": 1}
    assert "non-finite loss" in result.stdout + result.stderr
    rows = metrics(tmp_path)
    assert sorted(rows) == list(range(1, 9))  # every step logged, the one with the skipped micro-batch included
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["ce"]) for row in rows.values()), rows


@pytest.mark.slow
def test_non_finite_losses_in_a_row_stop_the_run_and_keep_the_checkpoint(digit_shards, tmp_path):
    args = train_args(digit_shards, tmp_path, "--steps", "20", "--ds-config", "zero2_bf16", "--save-every", "2", "--max-bad-steps", "3")
    result = run(with_script(deepspeed_cmd(args), NAN_SCRIPT, "9-"), check=False)
    assert result.returncode != 0
    assert "3 non-finite losses in a row" in result.stderr + result.stdout
    complete = complete_checkpoints(tmp_path)
    assert [read_marker(p)["step"] for p in complete][-1] == 4  # micro-batches 0-8 make 4 steps
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_") and read_marker(p) is None]
    assert re.search(r"checkpoint\s+\(step\s+4\)\s+is\s+untouched", result.stderr + result.stdout), "the message names the kept step"
    assert not (tmp_path / "summary.json").exists()
    from vitdeep.engine.weights import read_weights

    weights = read_weights(tmp_path).state_dict
    assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--model", "deit_huge_12"], "unknown model 'deit_huge_12'"),
        (["--ds-config", "zero9"], "ds-config not found: zero9"),
        (["--micro-batch", "24"], "global_batch=64 is not a multiple of micro_batch=24"),
        (["--ds-config", "zero2_fp16"], "fp16 needs a GPU"),
        (["--img-size", "18"], "img_size=18 is not divisible by patch_size=4"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(digit_shards, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    refuses([*train_args(digit_shards, out), *extra], capsys, needle, out)


def test_missing_shards_and_broken_ds_config(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    (tmp_path / "empty").mkdir()
    for args, needle in (
        (train_args(tmp_path / "nowhere", tmp_path / "out"), "nowhere"),
        (train_args(tmp_path / "empty", tmp_path / "out", "--ds-config", str(broken)), "not valid JSON"),
    ):
        refuses(args, capsys, needle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_resume_of_another_models_checkpoint_is_refused(zero2_run, digit_shards, capsys):
    out, _ = zero2_run
    checkpoint = complete_checkpoints(out)[-1]
    refuses(train_args(digit_shards, out.parent / "other", "--depth", "4", "--resume", str(checkpoint)), capsys,
            "has depth=6; this run has depth=4", out.parent / "other")


def test_dry_run_prints_the_plan_and_writes_nothing(digit_shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*train_args(digit_shards, tmp_path / "out", "--epochs", "3"), "--dry-run"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "gradient accumulation" in out and '"train_batch_size": 64' in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cores, flags, workers", [(2, [], 2), (64, [], 4), (1, [], 1), (1, ["--workers", "3"], 3),
                                                    (2, ["--workers", "0"], 0)])
def test_loader_workers_default_to_the_cores_a_rank_has(digit_shards, tmp_path, capsys, monkeypatch, cores, flags, workers):
    """Without --workers a rank takes 4 loader workers, or its usable cores where fewer (torch warns
    about more); a count that is asked for is kept."""
    monkeypatch.setattr("vitdeep.cores.usable_cores", lambda: cores)
    small = [arg for i, arg in enumerate(SMALL) if "--workers" not in SMALL[i - 1:i + 1]]
    args = ["train", "--data", str(digit_shards), "--out", str(tmp_path / "out"), *small, "--dry-run", *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and re.search(rf"loader workers per rank\W+{workers}\b", out), out


def test_a_tracker_that_is_missing_or_does_not_answer_is_refused_before_anything_is_written(digit_shards, tmp_path, capsys,
                                                                                           monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setitem(__import__("vitdeep.trackers").trackers.TRACKERS, "mlflow", ("no_such_tracker_module", "mlflow", None))
    refuses([*train_args(digit_shards, out), "--tracker", "mlflow"], capsys, "pip install 'vitdeep[mlflow]'", out)
    monkeypatch.undo()
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")
    refuses([*train_args(digit_shards, out), "--tracker", "mlflow"], capsys, "does not answer", out)
    refuses([*train_args(digit_shards, out), "--tracker", "wandb"], capsys, "'wandb' is not one of 'none', 'mlflow'", out)


def test_tracker_choices_are_the_built_in_trackers():
    import typing

    from vitdeep.config import RunConfig
    from vitdeep.trackers import TRACKERS

    assert typing.get_args(typing.get_type_hints(RunConfig)["tracker"]) == ("none", *TRACKERS)


def test_config_file_and_cli_precedence(digit_shards, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  global_batch: 128\n  epochs: 7\nmodel: deit_tiny_24\n")
    with pytest.raises(SystemExit):
        main([*train_args(digit_shards, tmp_path / "out"), "--config", str(config), "--dry-run"])
    out = capsys.readouterr().out
    assert "deit_tiny_12" in out  # the flag wins over the file
    assert '"train_batch_size": 64' in out
    assert re.search(r"\bmodel\W+deit_tiny_12\b", out) and "deit_tiny_24" not in out
    assert re.search(r"global batch\W+64\b", out) and re.search(r"epochs\W+7\b", out)  # epochs from the file
    assert re.search(r"steps per epoch\W+23\b", out) and re.search(r"total steps\W+161\b", out)  # 7 × ⌊1500/64⌋
    config.write_text("global_batch: 128\nepochs: 7\n")
    with pytest.raises(SystemExit):
        main(["train", "--data", str(digit_shards), "--out", str(tmp_path / "o"), "--config", str(config), "--dry-run"])
    out = capsys.readouterr().out
    assert '"train_batch_size": 128' in out and "77" in out  # 7 epochs × 11 steps
    assert re.search(r"global batch\W+128\b", out) and re.search(r"epochs\W+7\b", out)
    assert re.search(r"steps per epoch\W+11\b", out) and re.search(r"total steps\W+77\b", out)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_hard_distillation_from_a_vitdeep_teacher_under_zero1(zero2_run, digit_shards, tmp_path):
    """Distillation from a vitdeep run, and ZeRO-1 bf16 on 2 ranks (its checkpoint marker)."""
    teacher, _ = zero2_run
    run(ranks_cmd(train_args(digit_shards, tmp_path, "--steps", "3", "--ds-config", "zero1_bf16",
                             "--distill", "hard", "--teacher", str(teacher))))
    rows = metrics(tmp_path)
    assert sorted(rows) == [1, 2, 3] and "distill" in rows[3] and rows[3]["distill"] > 0
    marker = read_marker(complete_checkpoints(tmp_path)[-1])
    assert marker["model_kwargs"]["distilled"] is True
    assert (marker["zero_stage"], marker["world_size"], marker["precision"], marker["step"]) == (1, 2, "bf16", 3)


@pytest.mark.slow
def test_resume_with_another_data_stream_says_so(zero2_run, digit_shards, tmp_path):
    import shutil

    source, _ = zero2_run
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    result = run(ranks_cmd(train_args(digit_shards, out, "--steps", "41", "--ds-config", "zero2_bf16", "--mixup", "0",
                                      "--cutmix", "0", "--workers", "2", "--seed", "7", "--resume", "auto")))
    # the lane order does not depend on the workers: only the seed changes the stream
    assert "at step 40" in result.stdout and "note: seed=0 → 7 since the checkpoint" in result.stdout
    assert "workers=" not in result.stdout
    assert read_marker(complete_checkpoints(out)[-1])["step"] == 41


@pytest.mark.slow
def test_eval_of_a_run_repeats_its_own_last_validation(digit_shards, tmp_path):
    """The demo recipe validates at crop ratio 1.0; `eval` (and `analyze`, and the export's timm
    `crop_pct`) take the run's own unless told otherwise, so `eval` of the model and of its EMA
    gives the run's last validation: top-1 equal, loss within 1e-5."""
    import timm

    from vitdeep.commands.analyze import run_crop_ratio, resolve_model_sources
    from vitdeep.commands.eval import run_eval
    from vitdeep.commands.export import run_export
    from vitdeep.recipebook import bundled_recipe

    out = tmp_path / "run"
    run(single_cmd(["train", "--config", str(bundled_recipe("demo_digits")), "--data", str(digit_shards), "--val", str(digit_shards),
                    "--out", str(out), "--steps", "6", "--ds-config", "cpu_fp32", "--ema-decay", "0.99", "--depth", "4"]))
    val = read_marker(complete_checkpoints(out)[-1])["val"]
    for ema, prefix in ((False, ""), (True, "ema_")):
        result = run_eval(str(out), str(digit_shards), out=tmp_path / f"eval{prefix}.json", ema=ema, workers=0)
        saved = json.loads((tmp_path / f"eval{prefix}.json").read_text())
        assert saved["crop_ratio"] == 1.0 and saved["count"] == 297, saved
        assert result.scalars()["top1"] == val[f"{prefix}top1"] and abs(result.scalars()["loss"] - val[f"{prefix}loss"]) <= 1e-5
    assert run_crop_ratio(resolve_model_sources(None, out, (), {})) == 1.0
    exported = run_export(str(out), tmp_path / "model.safetensors")
    model = timm.create_model("vitdeep_deit_tiny_24", pretrained=True, pretrained_cfg_overlay=dict(file=str(exported)))
    assert model.pretrained_cfg["crop_pct"] == 1.0
