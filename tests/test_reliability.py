"""Reliability as a hostile or unlucky user meets it: crafted and damaged checkpoints, bad and
missing data, signals, output folders, config mistakes. Real runs (DeepSpeed on CPU ranks over
gloo), real shards; faults are injected at exact points by tests/scripts/fault_hook.py."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.launch import SMALL, deepspeed_cmd, metrics, ranks_cmd, refuses, run, single_cmd, train_args, with_script
from vitdeep.cli import main
from vitdeep.engine.checkpoint import MARKER, complete_checkpoints, load_safely, read_marker, resolve_resume, tag_for
from vitdeep.engine.weights import read_weights

SCRIPTS = Path(__file__).parent / "scripts"
FAULT = SCRIPTS / "fault_hook.py"
CHECKSUM = SCRIPTS / "train_and_checksum.py"
#: A single-process run that saves twice: checkpoints at steps 2 and 4.
TWO_SAVES = ["--steps", "4", "--save-every", "2", "--global-batch", "16"]


def fault_cmd(args: list[str], fault: str, ranks: int = 2) -> list[str]:
    """`deepspeed ... fault_hook.py FAULT ARGS` (or one process for ranks=1): the DeepSpeed launcher,
    whose exit code and signal handling are part of what these tests check."""
    return with_script(deepspeed_cmd(args, ranks) if ranks > 1 else single_cmd(args), FAULT, fault)


def stderr_errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error")]


# -- runs to take apart ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_runs(digit_shards, tmp_path_factory):
    """One single-process run per ZeRO stage (0: cpu_fp32, 2 and 3: bf16), checkpoints at steps 2 and 4."""
    runs = {}
    for stage, config in (("zero0", "cpu_fp32"), ("zero2", "zero2_bf16"), ("zero3", "zero3_bf16")):
        out = tmp_path_factory.mktemp(stage)
        run(single_cmd(train_args(digit_shards, out, *TWO_SAVES, "--ds-config", config, "--ema-decay", "0.9")))
        runs[stage] = out
    return runs


def copy_run(source: Path, into: Path) -> Path:
    shutil.copytree(source, into)
    return into


def rewrite_marker_sizes(checkpoint: Path) -> None:
    """What a forger does: make the marker's file list agree with the files as they now are."""
    marker = json.loads((checkpoint / MARKER).read_text())
    marker["files"] = {p.name: p.stat().st_size for p in checkpoint.iterdir() if p.name != MARKER}
    (checkpoint / MARKER).write_text(json.dumps(marker))


class Payload:
    """Unpickling this creates `flag`: proof that code from the file ran."""

    def __init__(self, flag: Path) -> None:
        self.flag = str(flag)

    def __reduce__(self):
        return os.mkdir, (self.flag,)


def plant_payload(file: Path, flag: Path) -> None:
    state = load_safely(file)
    state["extra"] = Payload(flag)
    torch.save(state, file)


# -- security: nothing in a run directory runs code ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, name",
    [
        ("zero0", "mp_rank_00_model_states.pt"),
        ("zero0", "rank_00000.pt"),
        ("zero2", "mp_rank_00_model_states.pt"),
        ("zero2", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        ("zero3", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
        ("zero3", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        ("zero3", "rank_00000.pt"),
    ],
)
def test_a_crafted_checkpoint_file_runs_no_code(stage_runs, digit_shards, tmp_path, capsys, stage, name):
    run_dir = copy_run(stage_runs[stage], tmp_path / "run")
    checkpoint = run_dir / "checkpoints" / tag_for(4)
    flag = tmp_path / "pwned"
    plant_payload(checkpoint / name, flag)
    rewrite_marker_sizes(checkpoint)
    needle = f"{name} holds objects vitdeep does not unpickle"
    for argv in (
        ["eval", "--checkpoint", str(checkpoint), "--data", str(digit_shards), "--out", str(tmp_path / "e.json")],
        ["export", str(checkpoint), str(tmp_path / "x.safetensors"), "--ema"],
        ["finetune", "--from", str(checkpoint), "--data", str(digit_shards), "--out", str(tmp_path / "ft"), "--dry-run"],
        train_args(digit_shards, tmp_path / "resumed", "--resume", str(checkpoint)),
    ):
        refuses(argv, capsys, needle)
        assert not flag.exists(), f"the payload ran: vitdeep {' '.join(argv)}"
    # a run directory falls back to the newest checkpoint it can read safely, and says so
    weights = read_weights(run_dir)
    assert "step 2" in weights.kind and "step_00000004 skipped" in weights.kind and not flag.exists()
    # DeepSpeed's own loader, as vitdeep installs it on every engine, refuses the file too
    from vitdeep.engine.checkpoint import DamagedCheckpoint, _safe_checkpoint_engine_class

    with pytest.raises(DamagedCheckpoint, match="does not unpickle"):
        _safe_checkpoint_engine_class()(None).load(str(checkpoint / name))
    assert not flag.exists()


@pytest.mark.slow
def test_checkpoints_of_every_stage_read_safely_and_consolidate(stage_runs):
    """Every file a run writes loads with weights_only=True; the EMA consolidates like the weights."""
    for stage, out in stage_runs.items():
        for file in (out / "checkpoints" / tag_for(4)).glob("*.pt"):
            load_safely(file)
        raw, ema = read_weights(out).state_dict, read_weights(out, ema=True).state_dict
        assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw), stage


# -- damaged checkpoints: resume falls back to the newest intact one ------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated rank file": (lambda c: _truncate(c / "rank_00000.pt"), "rank_00000.pt is truncated"),
    "missing rank file": (lambda c: (c / "rank_00000.pt").unlink(), "rank_00000.pt is missing"),
    "truncated model states": (lambda c: _truncate(c / "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt is truncated"),
    "marker of the wrong shape": (lambda c: (c / MARKER).write_text("{}"), "vitdeep.json lacks step"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_skipped_with_the_reason(stage_runs, digit_shards, tmp_path, capsys, damage):
    run_dir = copy_run(stage_runs["zero2"], tmp_path / "run")
    newest = run_dir / "checkpoints" / tag_for(4)
    harm, reason = DAMAGE[damage]
    harm(newest)
    skipped: list[str] = []
    assert resolve_resume("auto", run_dir, on_skip=lambda path, why: skipped.append(f"{path.name}: {why}")) == newest.with_name(tag_for(2))
    assert len(skipped) == 1 and skipped[0].startswith("step_00000004: ") and reason in skipped[0], skipped
    refuses(["eval", "--checkpoint", str(newest), "--data", str(digit_shards), "--out", str(tmp_path / "e.json")], capsys, reason)


@pytest.mark.slow
def test_resume_auto_skips_a_damaged_checkpoint_and_says_so(stage_runs, digit_shards, tmp_path):
    run_dir = copy_run(stage_runs["zero2"], tmp_path / "run")
    _truncate(run_dir / "checkpoints" / tag_for(4) / "rank_00000.pt")
    result = run(single_cmd(train_args(digit_shards, run_dir, "--steps", "5", "--save-every", "2", "--global-batch", "16",
                                       "--ds-config", "zero2_bf16", "--ema-decay", "0.9", "--resume", "auto")))
    text = result.stdout + result.stderr
    assert "skipped checkpoint step_00000004: " in text and "rank_00000.pt is truncated" in text
    assert "at step 2" in text and read_marker(complete_checkpoints(run_dir)[-1])["step"] == 5
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if row["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5], f"the interrupted run's rows past step 2 are dropped, not repeated: {steps}"


# -- output folders -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_new_run_on_an_old_runs_out_is_refused_unless_overwrite(stage_runs, digit_shards, tmp_path, capsys):
    run_dir = copy_run(stage_runs["zero0"], tmp_path / "run")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    refuses(train_args(digit_shards, run_dir, "--steps", "2"), capsys,
            f"--out {run_dir} holds a run at step 4: --resume auto to continue it")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    refuses(train_args(digit_shards, run_dir, "--resume", "auto", "--overwrite"), capsys, "choose one")
    (run_dir / "notes.txt").write_text("mine")
    run(single_cmd(train_args(digit_shards, run_dir, "--steps", "1", "--global-batch", "16", "--ds-config", "cpu_fp32", "--overwrite")))
    assert [read_marker(p)["step"] for p in complete_checkpoints(run_dir)] == [1]
    assert sorted(metrics(run_dir)) == [1] and (run_dir / "notes.txt").read_text() == "mine"
    assert not (run_dir / ".vitdeep.lock").exists(), "the lock goes with the run"


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(digit_shards, tmp_path):
    from vitdeep.engine.rundir import LOCK, _owner

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps(_owner()))  # held by this live process
    args = train_args(digit_shards, out, "--steps", "1", "--global-batch", "16", "--ds-config", "cpu_fp32", "--resume", "auto")
    result = run(single_cmd(args), check=False)
    (error,) = stderr_errors(result)
    assert result.returncode == 2 and "is in use by another run" in error and f"pid {os.getpid()}" in error, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [LOCK], "nothing written"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK).write_text(json.dumps({**_owner(), "pid": int(gone.stdout), "start": "0"}))
    result = run(single_cmd(args))
    assert "took over the lock of a run that is gone" in result.stdout + result.stderr
    assert read_marker(complete_checkpoints(out)[-1])["step"] == 1 and not (out / LOCK).exists()


@pytest.mark.slow
def test_unwritable_outputs_are_refused_before_any_work(digit_shards, stage_runs, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refuses(train_args(digit_shards, a_file), capsys, f"--out {a_file} is a file, not a folder")
    refuses(train_args(digit_shards, a_file / "run"), capsys, f"{a_file} is a file, not a folder")
    checkpoint = str(stage_runs["zero0"])
    refuses(["eval", "--checkpoint", checkpoint, "--data", str(digit_shards), "--out", str(tmp_path)], capsys,
            f"--out {tmp_path} is a folder: give a file name")
    refuses(["export", checkpoint, str(a_file / "x.safetensors")], capsys, "is a file, not a folder")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    if subprocess.run(["chattr", "+i", str(read_only)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system (the other refusals were checked)")
    try:
        refuses(train_args(digit_shards, read_only / "run"), capsys, f"cannot write in {read_only}")
        refuses(["eval", "--checkpoint", checkpoint, "--data", str(digit_shards), "--out", str(read_only / "e.json")], capsys,
                f"cannot write in {read_only}")
    finally:
        subprocess.run(["chattr", "-i", str(read_only)], check=True)


@pytest.mark.slow
def test_eval_writes_into_a_folder_it_creates(stage_runs, digit_shards, tmp_path):
    out = tmp_path / "new" / "folder" / "eval.json"
    run(single_cmd(["eval", "--checkpoint", str(stage_runs["zero0"]), "--data", str(digit_shards), "--out", str(out), "--workers", "1"]))
    result = json.loads(out.read_text())
    assert result["count"] == result["expected"] == result["read"] == 297 and result["missing"] == 0 and result["bad"] == {}


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(digit_shards, tmp_path):
    args = train_args(digit_shards, tmp_path, "--steps", "6", "--save-every", "2", "--ds-config", "zero2_bf16")
    result = run(fault_cmd(args, "enospc:1:4"), check=False)
    assert result.returncode == 1
    errors = stderr_errors(result)
    assert len(errors) == 1 and "no space left on device while saving step 4 (rank 1: " in errors[0], errors
    assert errors[0].endswith(f"step 2 ({tmp_path / 'checkpoints' / tag_for(2)}) is intact"), errors
    assert [read_marker(p)["step"] for p in complete_checkpoints(tmp_path)] == [2]
    assert not (tmp_path / "checkpoints" / tag_for(4)).exists()


@pytest.mark.slow
def test_a_rank_killed_between_its_partition_and_the_marker_leaves_no_complete_checkpoint(digit_shards, tmp_path):
    """Deterministic: rank 1 dies after writing its ZeRO partition of step 4, before the marker."""
    args = train_args(digit_shards, tmp_path, "--steps", "8", "--save-every", "2", "--ds-config", "zero2_bf16")
    result = run(fault_cmd(args, "die-after-partition:1:4"), check=False)
    assert result.returncode != 0
    partial = tmp_path / "checkpoints" / tag_for(4)
    assert partial.is_dir() and read_marker(partial) is None and any(partial.glob("*optim_states.pt"))
    assert [read_marker(p)["step"] for p in complete_checkpoints(tmp_path)] == [2]
    resumed = run(ranks_cmd(train_args(digit_shards, tmp_path, "--steps", "5", "--save-every", "10", "--ds-config", "zero2_bf16",
                                       "--resume", "auto")))
    assert "at step 2" in resumed.stdout + resumed.stderr
    assert [read_marker(p)["step"] for p in complete_checkpoints(tmp_path)] == [2, 5]


# -- signals: stop at a step boundary with a checkpoint, resume to the same weights ----------------


@pytest.mark.slow
def test_sigterm_saves_at_the_interrupted_step_and_resume_reaches_the_same_weights(digit_shards, tmp_path):
    """2 ranks, fp32: SIGTERM to rank 1 during micro-batch 7 (step 4 of 12; saves every 5)."""
    common = ["--steps", "12", "--ds-config", "cpu_fp32", "--save-every", "5", "--ema-decay", "0.9"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    run(ranks_cmd(train_args(digit_shards, reference, *common)))
    result = run(fault_cmd(train_args(digit_shards, stopped, *common), "signal:1:7:TERM"), check=False)
    assert result.returncode == 75, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("stopped by")]
    assert lines == [f"stopped by SIGTERM at step 4; checkpoint {stopped / 'checkpoints' / tag_for(4)}; resume with --resume auto"]
    assert [read_marker(p)["step"] for p in complete_checkpoints(stopped)] == [4]
    run(ranks_cmd(train_args(digit_shards, stopped, *common, "--resume", "auto")))
    for ema in (False, True):
        expected, got = read_weights(reference, ema=ema).state_dict, read_weights(stopped, ema=ema).state_dict
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(expected[name], got[name]), (name, ema)


@pytest.mark.slow  # starts vitdeep through the fault script
def test_a_second_sigint_stops_at_once(digit_shards, tmp_path):
    args = train_args(digit_shards, tmp_path, "--steps", "10", "--global-batch", "16", "--ds-config", "cpu_fp32", "--save-every", "100")
    result = run(fault_cmd(args, "signal:0:3:INT+INT", ranks=1), check=False)
    assert result.returncode == -signal.SIGINT, (result.returncode, result.stderr[-2000:])
    assert complete_checkpoints(tmp_path) == [], "no checkpoint: the second Ctrl-C means now"


@pytest.mark.slow
def test_a_rank_that_fails_is_named_by_the_others_at_once(digit_shards, tmp_path):
    """The failing rank exits (its data workers killed, not waited for), so the other notices the
    closed connection at once, not after `--dist-timeout` (10 minutes here: the subprocess times
    out first if it waits); the failing rank prints one traceback, not one per killed worker."""
    args = train_args(digit_shards, tmp_path, "--steps", "8", "--ds-config", "cpu_fp32", "--dist-timeout", "10")
    result = run(fault_cmd(args, "raise:1:3"), check=False, timeout=420)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "error: rank 1 stopped with an error: RuntimeError: injected failure" in text, text[-4000:]
    assert "a node died" not in text and "is killed by signal" not in text, text[-4000:]


# -- bad and missing data: counted over all ranks, judged once ------------------------------------


def _val_copy(digit_shards: Path, into: Path) -> Path:
    into.mkdir()
    for path in digit_shards.glob("val-*.tar"):
        shutil.copy(path, into / path.name)
    info = json.loads((digit_shards / "_info.json").read_text())
    info["splits"] = {"val": info["splits"]["val"]}
    (into / "_info.json").write_text(json.dumps(info))
    return into


def _rewrite_members(shard: Path, change) -> None:
    """Rewrite a shard's members through `change(name, data) -> data`."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = change(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


@pytest.fixture(scope="module")
def damaged_val(digit_shards, tmp_path_factory):
    """The 297 held-out digits with one shard cut mid-member and one replaced by garbage, as their
    _info.json still lists them."""
    shards = _val_copy(digit_shards, tmp_path_factory.mktemp("damaged") / "val")
    names = sorted(shards.glob("val-*.tar"))
    data = names[1].read_bytes()
    names[1].write_bytes(data[: len(data) // 3])
    names[2].write_bytes(b"not a tar archive at all " * 200)
    return shards


def _eval(checkpoint: Path, shards: Path, out: Path, ranks: int, *extra: str, check: bool = True):
    args = ["eval", "--checkpoint", str(checkpoint), "--data", str(shards), "--out", str(out), "--workers", "1", *extra]
    return run(ranks_cmd(args, ranks) if ranks > 1 else single_cmd(args), check=check)


@pytest.mark.slow
def test_samples_lost_after_a_tar_error_are_counted_the_same_on_1_and_2_ranks(stage_runs, damaged_val, tmp_path):
    checkpoint = stage_runs["zero0"]
    refused = _eval(checkpoint, damaged_val, tmp_path / "refused.json", 1, check=False)
    assert refused.returncode == 2 and not (tmp_path / "refused.json").exists()
    (error,) = stderr_errors(refused)
    assert "missing (listed but not read)" in error and "of 297 samples read were bad" in error, error
    results = []
    for ranks in (1, 2):
        out = tmp_path / f"eval{ranks}.json"
        _eval(checkpoint, damaged_val, out, ranks, "--max-bad-fraction", "1")
        results.append(json.loads(out.read_text()))
    one, two = results
    for result in results:
        assert result["expected"] == 297 and result["read"] + result["missing"] == 297
        assert result["missing"] > 50 and not result["bad"], "the shards' lost samples count as missing, nothing else"
        assert result["count"] == result["read"] - sum(result["bad"].values())
    assert {k: one[k] for k in ("count", "top1", "expected", "read", "missing", "bad")} == \
        {k: two[k] for k in ("count", "top1", "expected", "read", "missing", "bad")}


def _spoil(suffix: str, count: int, replacement: bytes):
    """A `_rewrite_members` change: the first `count` members ending in `suffix` become `replacement`."""
    left = [count]

    def change(name: str, data: bytes) -> bytes:
        if name.endswith(suffix) and left[0]:
            left[0] -= 1
            return replacement
        return data

    return change


@pytest.fixture(scope="module")
def val_with_bad_samples(digit_shards, tmp_path_factory):
    """The held-out digits with 2 undecodable images and 3 labels out of range (one shard each)."""
    shards = _val_copy(digit_shards, tmp_path_factory.mktemp("badval") / "val")
    names = sorted(shards.glob("val-*.tar"))
    _rewrite_members(names[0], _spoil(".png", 2, b"\x89PNG but not really"))
    _rewrite_members(names[3], _spoil(".cls", 3, b"99"))
    return shards


@pytest.mark.slow
def test_eval_judges_bad_data_once_over_all_ranks(stage_runs, val_with_bad_samples, tmp_path):
    results = []
    for ranks in (1, 2):
        out = tmp_path / f"eval{ranks}.json"
        result = _eval(stage_runs["zero0"], val_with_bad_samples, out, ranks)
        assert "lost contact" not in result.stdout + result.stderr
        results.append(json.loads(out.read_text()))
    for result in results:
        assert result["count"] == 292 and result["read"] == result["expected"] == 297 and result["missing"] == 0
        assert result["bad"] == {"undecodable image": 2, "cls out of range": 3}
    assert results[0]["top1"] == results[1]["top1"]


@pytest.mark.slow
def test_bad_validation_data_never_discards_training(digit_shards, val_with_bad_samples, tmp_path):
    args = train_args(digit_shards, tmp_path, "--steps", "23", "--ds-config", "cpu_fp32", "--save-every", "100",
                      "--val", str(val_with_bad_samples), "--max-bad-fraction", "0.001", "--log-every", "23")
    result = run(ranks_cmd(args))
    text = result.stdout + result.stderr
    assert [read_marker(p)["step"] for p in complete_checkpoints(tmp_path)] == [23]
    warnings = [line for line in text.splitlines() if line.startswith("validation at step 23")]
    assert len(warnings) == 1 and "more than --max-bad-fraction 0.001" in warnings[0], warnings
    logged = [line for line in text.splitlines() if "skipped bad data" in line]
    assert len(logged) == 5, "each bad sample logged once (not again for the EMA pass)"
    marker = read_marker(complete_checkpoints(tmp_path)[-1])
    assert marker["validated"] and marker["val_top1"] is not None


# -- config mistakes: one line, exit 2, nothing written -------------------------------------------


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--save-every", "0"], "--save-every must be >= 1, got 0"),
        (["--log-every", "0"], "--log-every must be >= 1, got 0"),
        (["--max-bad-fraction", "2"], "--max-bad-fraction must be in [0, 1], got 2"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--val-every", "-1"], "--val-every must be >= 0, got -1"),
        (["--distill", "hard"], "--distill needs a --teacher"),
        (["--distill", "soft", "--teacher", "no_such_model"], "--teacher no_such_model is neither a file nor a timm model name"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--img-size", "0"], "--img-size must be >= 1, got 0"),
        (["--lr", "fast"], "Invalid value for '--lr'"),
        (["--resume", "auto", "--overwrite"], "choose one"),
    ],
)
def test_config_mistakes_exit_2_before_anything_is_written(digit_shards, tmp_path, capsys, extra, needle):
    refuses(train_args(digit_shards, tmp_path / "out", *extra), capsys, needle, tmp_path / "out")


def test_config_files_malformed_or_with_yaml_quirks(digit_shards, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  lr: 1e-3\n  epochs: [3\n")
    refuses([*train_args(digit_shards, tmp_path / "out"), "--config", str(config)], capsys, "is not valid YAML", tmp_path / "out")
    config.write_text("lr: 1e-3\n")  # YAML 1.1 reads it as a string
    with pytest.raises(SystemExit) as done:
        main(["train", "--data", str(digit_shards), "--out", str(tmp_path / "o"), "--config", str(config), "--dry-run"])
    assert done.value.code == 0 and "0.001" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_compares_resolved_architectures(stage_runs, digit_shards, tmp_path, capsys):
    """The run was made without --talking-heads and with --init-values unset: spelling out the
    defaults (DeiT: no talking heads, no LayerScale) resumes; a real change does not."""
    checkpoint = str(stage_runs["zero0"] / "checkpoints" / tag_for(4))
    same = train_args(digit_shards, tmp_path / "out", "--global-batch", "16", "--ds-config", "cpu_fp32", "--resume", checkpoint,
                      "--no-talking-heads", "--no-attnscale", "--dry-run")
    with pytest.raises(SystemExit) as done:
        main(same)
    assert done.value.code == 0, capsys.readouterr().err
    refuses([*same[:-1], "--talking-heads"], capsys, "has talking_heads=False; this run has talking_heads=True")


# -- remote shards: _info.json from the same location ---------------------------------------------


@pytest.fixture
def http_shards(digit_shards):
    handler = partial(SimpleHTTPRequestHandler, directory=str(digit_shards))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_remote_shards_take_their_counts_from_info_json(http_shards, tmp_path, capsys, caplog):
    from vitdeep.data.info import read_dataset_info

    info = read_dataset_info(f"{http_shards}/train-{{000000..000029}}.tar")
    assert (info.num_samples, info.num_classes, info.counted_from) == (1500, 10, "_info.json")
    with pytest.raises(SystemExit) as done:
        main(["train", "--data", f"{http_shards}/train-{{000000..000029}}.tar", "--out", str(tmp_path / "o"), *SMALL, "--dry-run"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "1,500" in out
    bare = read_dataset_info(f"{http_shards}/nowhere/train-{{000000..000001}}.tar")
    assert bare.num_samples is None and "no _info.json or sizes.json at" in caplog.text
