"""Outputs never destroy inputs (issue 25): no command overwrites one of its inputs, even with
--overwrite, nor a file it did not write without it; outputs follow the umask; foreign shards end
in a counted bad sample or one line, and the messages say what is true. All in process, on the
digits, a tiny export and the ZeRO-2 checkpoint in tests/data."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tarfile
from pathlib import Path

import pytest

from tests.launch import SMALL, refuses, train_args
from vitdeep.cli import main

PER_RANK_RUN = Path(__file__).parent / "data" / "per_rank_run"
#: `analyze` on the tiny model of tests/data's run, at random init.
TINY = ["--model", "deit_tiny_12", "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--img-size", "16",
        "--patch-size", "4", "--num-classes", "10"]


def ok(argv: list[str], capsys) -> str:
    """`vitdeep ARGV` in this process exits 0; returns stdout."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(argv)
    captured = capsys.readouterr()
    assert done.value.code in (0, None), captured.err
    return captured.out


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A copy of the 2-rank ZeRO-2 run at step 4 (with an EMA) in tests/data."""
    return Path(shutil.copytree(PER_RANK_RUN, tmp_path / "run"))


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return path


def _digit_png(digit_shards: Path) -> bytes:
    with tarfile.open(digit_shards / "val-000000.tar") as archive:
        return next(archive.extractfile(m).read() for m in archive if m.name.endswith(".png"))


# ---- export ------------------------------------------------------------------------------------


def test_export_never_overwrites_an_input_nor_an_unowned_file(run_dir, digit_shards, tmp_path, capsys, umask_027):
    shards = Path(shutil.copytree(digit_shards, tmp_path / "shards"))
    info = (shards / "_info.json").read_text()
    # the probe: the sidecar of shards/_info.safetensors is the shards' _info.json
    refuses(["export", str(run_dir), str(shards / "_info.safetensors")], capsys, "_info.json already exists", shards / "_info.safetensors")
    assert (shards / "_info.json").read_text() == info
    out = tmp_path / "model.safetensors"
    ok(["export", str(run_dir), str(out)], capsys)
    assert oct(out.stat().st_mode & 0o777) == oct(out.with_suffix(".json").stat().st_mode & 0o777) == "0o640"  # the umask
    before = out.read_bytes()
    refuses(["export", str(run_dir), str(out), "--ema"], capsys, "--overwrite")
    assert out.read_bytes() == before
    ok(["export", str(run_dir), str(out), "--ema", "--overwrite"], capsys)
    assert out.read_bytes() != before and json.loads(out.with_suffix(".json").read_text())["ema"] is True
    refuses(["export", str(out), str(out), "--overwrite"], capsys, "is the input")
    inside = run_dir / "checkpoints" / "x.safetensors"
    refuses(["export", str(run_dir), str(inside), "--overwrite"], capsys, "lies inside the input folder", inside)


# ---- eval --------------------------------------------------------------------------------------


def test_eval_records_the_checkpoint_and_refuses_to_overwrite(run_dir, digit_shards, tmp_path, capsys):
    out = tmp_path / "eval.json"
    ok(["eval", "--checkpoint", str(run_dir), "--data", str(digit_shards), "--out", str(out), "--workers", "0", "--ema"], capsys)
    result = json.loads(out.read_text())
    assert result["evaluated"] == {"path": str(run_dir / "checkpoints" / "step_00000004"), "step": 4, "ema": True,
                                   "kind": "vitdeep checkpoint, step 4, EMA"}
    assert result["count"] == 297
    refuses(["eval", "--checkpoint", str(run_dir), "--data", str(digit_shards), "--out", str(out)], capsys, "already exists")
    assert json.loads(out.read_text()) == result
    ok(["eval", "--checkpoint", str(run_dir), "--data", str(digit_shards), "--out", str(out), "--workers", "0", "--overwrite"], capsys)
    assert json.loads(out.read_text())["evaluated"]["ema"] is False
    inside = digit_shards / "eval.json"
    refuses(["eval", "--checkpoint", str(run_dir), "--data", str(digit_shards), "--out", str(inside), "--overwrite"], capsys,
            f"lies inside the input folder {digit_shards}", inside)


def test_eval_writes_into_the_run_folder_by_default(run_dir, digit_shards, tmp_path, capsys, monkeypatch):
    """Issue 26: without --out, eval.json landed in the current folder; it goes with the run's
    other outputs (eval_ema.json for the EMA, as ablate names them), beside a file source."""
    monkeypatch.chdir(tmp_path)
    data = ["--data", str(digit_shards), "--workers", "0"]
    ok(["eval", "--checkpoint", str(run_dir / "checkpoints" / "step_00000004"), *data], capsys)
    assert json.loads((run_dir / "eval.json").read_text())["evaluated"]["step"] == 4
    ok(["eval", "--checkpoint", str(run_dir), "--ema", *data], capsys)
    assert json.loads((run_dir / "eval_ema.json").read_text())["evaluated"]["ema"] is True
    refuses(["eval", "--checkpoint", str(run_dir / "checkpoints"), *data], capsys, f"{run_dir / 'eval.json'} already exists")
    export = tmp_path / "exported" / "tiny.safetensors"
    ok(["export", str(run_dir), str(export)], capsys)
    ok(["eval", "--checkpoint", str(export), *data], capsys)
    assert json.loads((export.parent / "tiny.eval.json").read_text())["count"] == 297
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("content", [b"", None], ids=["zero-byte tar", "tar without members"])
def test_eval_with_no_readable_sample_exits_2_and_writes_nothing(run_dir, tmp_path, capsys, content):
    shard = tmp_path / "shards" / "val-000000.tar"
    if content is None:
        _tar(shard, [])
    else:
        shard.parent.mkdir()
        shard.write_bytes(content)
    out = tmp_path / "eval.json"
    refuses(["eval", "--checkpoint", str(run_dir), "--data", str(shard.parent), "--out", str(out), "--workers", "0"], capsys,
            "no sample of", out)


def test_a_sample_repeating_its_members_is_one_bad_sample(run_dir, digit_shards, tmp_path, capsys):
    """The probe printed "8 of 6 samples read": webdataset counted each repeated member as an error."""
    png = _digit_png(digit_shards)
    members = [(f"{i}.{ext}", png if ext == "png" else b"1") for i in range(6) for ext in ("png", "cls")]
    shard = _tar(tmp_path / "shards" / "val-000000.tar", members + [("5.png", png), ("5.cls", b"1")])
    out = tmp_path / "eval.json"
    ok(["eval", "--checkpoint", str(run_dir), "--data", str(shard.parent), "--out", str(out), "--workers", "0",
        "--max-bad-fraction", "0.5"], capsys)
    result = json.loads(out.read_text())
    assert (result["expected"], result["read"], result["count"], result["bad"]) == (6, 6, 5, {"duplicate member": 1})


# ---- analyze -----------------------------------------------------------------------------------


def test_a_random_init_beside_a_run_follows_its_architecture(run_dir, digit_shards, tmp_path, capsys):
    """Issue 26: `--compare random=deit_tiny_24` built the 224 px width-192 default, not the
    architecture of the run analysed beside it. The run's own model name is its architecture at
    random init; another name takes its input and classes; flags override both."""
    from vitdeep.commands.analyze import resolve_model_sources
    from vitdeep.engine.weights import source_architecture

    name, saved = source_architecture(run_dir)
    _, own, other = resolve_model_sources(None, run_dir, [f"random={name}", "deit_small_24"], {})
    assert (own.model, own.options, own.checkpoint) == (name, saved, None)
    assert other.options == {"img_size": 16, "patch_size": 4, "num_classes": 10}
    _, flagged = resolve_model_sources(None, run_dir, ["deit_small_24"], {"img_size": 32})
    assert flagged.options == {"img_size": 32, "patch_size": 4, "num_classes": 10}
    out = tmp_path / "analysis"
    ok(["analyze", "--checkpoint", str(run_dir), "--compare", f"random={name}", "--data", str(digit_shards),
        "--num-images", "8", "--out", str(out)], capsys)
    report = json.loads((out / "metrics.json").read_text())["sources"]
    assert len(report["random"]["cossim"]) == len(report[str(run_dir)]["cossim"]) == saved["depth"] + 1


def test_analyze_refuses_existing_outputs_and_input_folders(digit_shards, tmp_path, capsys):
    out = tmp_path / "analysis"
    args = ["analyze", *TINY, "--data", str(digit_shards), "--num-images", "8", "--out", str(out)]
    ok(args, capsys)
    metrics = (out / "metrics.json").read_text()
    refuses(args, capsys, "metrics.json already exists")
    assert (out / "metrics.json").read_text() == metrics
    ok([*args, "--overwrite"], capsys)
    assert len(list((out / "tb").iterdir())) == 1, "the earlier events were replaced, not added to"
    inside = digit_shards / "analysis"
    refuses([*args[:-1], str(inside)], capsys, "lies inside the input folder", inside)


def test_analyze_on_foreign_shards(digit_shards, tmp_path, capsys):
    """A label of 10**23 (no _info.json, so no class count to check it against) was a worker's
    traceback; a tar without members was `ValueError: no images were accumulated`."""
    png = _digit_png(digit_shards)
    huge = _tar(tmp_path / "huge" / "val-000000.tar",
                [(f"{i}.{ext}", png if ext == "png" else (b"99999999999999999999999" if i == 0 else b"1"))
                 for i in range(4) for ext in ("png", "cls")])
    out = tmp_path / "out"
    ok(["analyze", *TINY, "--data", str(huge.parent), "--out", str(out)], capsys)
    (entry,) = json.loads((out / "metrics.json").read_text())["sources"].values()
    assert entry["num_images"] == 3
    empty = _tar(tmp_path / "empty" / "val-000000.tar", [])
    refuses(["analyze", *TINY, "--data", str(empty.parent), "--out", str(tmp_path / "out2")], capsys,
            "no readable image in", tmp_path / "out2")


# ---- train, finetune, plan ---------------------------------------------------------------------


def test_a_second_run_on_a_live_runs_out_names_the_holder(digit_shards, tmp_path, capsys):
    """The first run has written config.json but no checkpoint yet (the probe was told "holds a run
    with no complete checkpoint yet: --resume auto")."""
    from vitdeep.engine.rundir import LOCK, _owner

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / LOCK).write_text(json.dumps(_owner()))  # held by this live process
    for extra in ([], ["--resume", "auto"], ["--overwrite"]):
        refuses(train_args(digit_shards, out, *extra), capsys, f"is in use by another run (host {socket.gethostname()}, pid {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == [LOCK, "config.json"]


def test_train_and_finetune_never_write_into_their_inputs(run_dir, digit_shards, capsys):
    refuses(train_args(digit_shards, digit_shards / "run"), capsys, "lies inside the input folder", digit_shards / "run")
    step = run_dir / "checkpoints" / "step_00000004"
    for source, needle in ((run_dir, "is the input"), (step, "holds the input")):  # what --overwrite would delete
        refuses(["finetune", "--from", str(source), "--data", str(digit_shards), "--out", str(run_dir), "--overwrite", *SMALL],
                capsys, needle)
    assert (step / "vitdeep.json").is_file()


def test_plan_json_never_replaces_its_config_nor_an_unowned_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: deit_tiny_12\nimg_size: 64\n")
    refuses(["plan", "--config", str(config), "--json", str(config), "--overwrite"], capsys, "is the input")
    assert config.read_text().startswith("model:")
    existing = tmp_path / "plan.json"
    existing.write_text("mine")
    refuses(["plan", "--config", str(config), "--json", str(existing)], capsys, "already exists")
    assert existing.read_text() == "mine"


# ---- demo, ablate ------------------------------------------------------------------------------


def test_demo_and_ablate_keep_out_of_folders_they_did_not_write(digit_shards, tmp_path, capsys, umask_027):
    out = tmp_path / "mine"
    (out / "baseline").mkdir(parents=True)
    (out / "baseline" / "notes.txt").write_text("a run of my own")
    refuses(["demo", "--out", str(out)], capsys, "baseline already exists")
    assert sorted(p.name for p in out.iterdir()) == ["baseline"]

    grid = tmp_path / "grid.yaml"
    grid.write_text("title: two depths\nbase: {model: deit_tiny_12, img_size: 16, patch_size: 4, embed_dim: 32, num_heads: 2}\n"
                    "axes:\n  depth: [1, 2]\n")
    def ablate(folder: Path) -> list[str]:
        return ["ablate", str(grid), "--data", str(digit_shards), "--val", str(digit_shards), "--out", str(folder), "--emit", "slurm"]

    (out / "cells").mkdir()
    refuses(ablate(out), capsys, "cells already exists")
    (out / "cells").rmdir()
    refuses(ablate(digit_shards / "grid"), capsys, "lies inside the input folder", digit_shards / "grid")
    ok(ablate(out), capsys)
    assert oct((out / "ablate.sbatch").stat().st_mode & 0o777) == "0o750"  # executable, and the umask
