"""`vitdeep ablate`: grids → cells, refusals, Slurm arrays, and a real grid of DeepSpeed runs on
2 CPU ranks that is killed, resumed, rerun and tabulated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import SMALL, cpu_env, metrics, refuses, run, single_cmd
from vitdeep.commands.ablate import prepare
from vitdeep.ablate.grid import bundled_grids, load_grid, parse_grid, resolve_cells
from vitdeep.cli import main
from vitdeep.commands.demo import RECIPE
from vitdeep.engine.checkpoint import MARKER
from vitdeep.errors import UserError
from vitdeep.launcher import error_line, option_flags, run_logged

FAKE_SRUN = Path(__file__).resolve().parent / "scripts" / "fake_srun"
TWO_AXES = "axes:\n  contrastive_weight: [0, 1]\n  attnscale: [false, true]\n"
ONE_AXIS = "axes:\n  contrastive_weight: [0, 1]\n"


def _grid(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def _main(argv: list[str]) -> None:
    """`vitdeep ARGV` in this process, which must succeed."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0


def _ablate(grid: Path | str, shards: Path, out: Path, *extra: str) -> list[str]:
    return ["ablate", str(grid), "--data", str(shards), "--val", str(shards), "--out", str(out), *SMALL, *extra]


# -- grids → cells -------------------------------------------------------------------------------


def test_two_axes_give_four_cells_named_from_their_options(digit_shards, tmp_path, capsys):
    grid, out = _grid(tmp_path, TWO_AXES), tmp_path / "ab"
    names = ["contrastive_weight=0,attnscale=false", "contrastive_weight=0,attnscale=true",
             "contrastive_weight=1,attnscale=false", "contrastive_weight=1,attnscale=true"]
    ablation = prepare(str(grid), {"data": str(digit_shards), "val": str(digit_shards), "out": str(out)}, ranks=2, demo=False, local=True)
    assert [run.name for run in ablation.runs] == names
    assert [run.own for run in ablation.runs] == [
        {"contrastive_weight": 0.0, "attnscale": False}, {"contrastive_weight": 0.0, "attnscale": True},
        {"contrastive_weight": 1.0, "attnscale": False}, {"contrastive_weight": 1.0, "attnscale": True},
    ]
    args = ablation.train_args(ablation.runs[3])
    assert args[:7] == ["train", "--data", str(digit_shards), "--val", str(digit_shards), "--out", str(out / "cells" / names[3])]
    assert args[-3:] == ["--contrastive-weight", "1.0", "--attnscale"] and "--resume" not in args
    capsys.readouterr()
    _main(_ablate(grid, digit_shards, out, "--dry-run"))
    listing = capsys.readouterr().out
    assert not out.exists(), "--dry-run writes nothing"
    assert all(name in listing for name in names) and listing.count("deepspeed.launcher.runner") == 4


def test_config_applies_to_every_cell_under_the_flags_and_the_cells(digit_shards, tmp_path, capsys):
    """Issue 26: ablate refused --config, though any train option applies to every cell. The
    file's options lie under the flags and each cell's own, and every cell's command spells them."""
    grid, out, config = _grid(tmp_path, ONE_AXIS), tmp_path / "ab", tmp_path / "shared.yaml"
    config.write_text("epochs: 3\nlr: 0.01\ncontrastive_weight: 5\nweight_decay: 0.5\n")
    capsys.readouterr()
    _main(_ablate(grid, digit_shards, out, "--config", str(config), "--lr", "0.02", "--dry-run"))
    commands = [line for line in capsys.readouterr().out.splitlines() if "deepspeed.launcher.runner" in line]
    assert len(commands) == 2 and not out.exists()
    for weight, command in zip(("0.0", "1.0"), commands):
        assert " --epochs 3 " in command and " --weight-decay 0.5" in command and f"--contrastive-weight {weight}" in command
        assert " --lr 0.02 " in command and "0.01" not in command and "--config" not in command
    config.write_text("epochs: 3\nno_such_option: 1\n")
    refuses(_ablate(grid, digit_shards, out, "--config", str(config), "--dry-run"), capsys, "unknown option 'no_such_option'", out)
    refuses(["ablate", "--collect", str(out), "--config", str(config)], capsys, "--collect DIR takes no GRID, --config")


def test_named_axes_and_explicit_cells():
    grid = parse_grid("g", {
        "base": {"model": "deit_tiny_12"},
        "axes": {"depth": [12, 24], "objective": {"ce": {"contrastive_weight": 0}, "losses": {"contrastive_weight": 1}}},
        "published": {"depth=24,losses": 83.3},
    })
    assert [(cell.name, cell.options, cell.variants) for cell in grid.cells] == [
        ("depth=12,ce", {"depth": 12, "contrastive_weight": 0}, {"objective": "ce"}),
        ("depth=12,losses", {"depth": 12, "contrastive_weight": 1}, {"objective": "losses"}),
        ("depth=24,ce", {"depth": 24, "contrastive_weight": 0}, {"objective": "ce"}),
        ("depth=24,losses", {"depth": 24, "contrastive_weight": 1}, {"objective": "losses"}),
    ]
    assert grid.columns == [("depth", "depth"), ("objective", None)] and grid.published == {"depth=24,losses": 83.3}
    explicit = parse_grid("e", {"cells": [{"name": "plain"}, {"name": "both", "attnscale": True, "featscale": True}]})
    assert [cell.name for cell in explicit.cells] == ["plain", "both"] and explicit.columns == [("attnscale", "attnscale"), ("featscale", "featscale")]


@pytest.mark.parametrize("name", sorted(bundled_grids()))
def test_bundled_grids_resolve(name):
    grid = load_grid(name)
    for recipe in (None, RECIPE):
        runs = resolve_cells(grid, {}, recipe)
        assert len({run.name for run in runs}) == len(grid.cells) >= 4
        for a in runs:  # cells differ only where one of them sets its own option
            assert set(a.own) == set(a.cell.options)
            for b in runs:
                assert all(a.options[k] == b.options[k] for k in a.options if k not in a.cell.options and k not in b.cell.options)


def test_remedies_grid_puts_each_remedy_alone_against_cross_entropy():
    """One cell per remedy of `REMEDIES` (talking heads … registers), the losses and LayerScale,
    each a change of one thing against the plain cross-entropy cell, in both modes; the model
    each cell builds has its remedy."""
    from vitdeep.architecture import REMEDIES
    from vitdeep.engine.run_plan import model_kwargs_for
    from vitdeep.losses import Objective

    grid = load_grid("remedies")
    assert [cell.name for cell in grid.cells] == ["none", "losses", "talking_heads", "attnscale", "featscale", "reattention",
                                                  "contranorm", "qk_norm", "layerscale", "registers"]
    for recipe in (None, RECIPE):
        runs = {run.name: run for run in resolve_cells(grid, {}, recipe)}
        plain = runs["none"].config
        assert (plain.loss.cos_weight, plain.loss.contrastive_weight, plain.loss.patch_mix_weight) == (0, 0, 0)
        for remedy in REMEDIES:
            cell = next(run for run in runs.values() if remedy.name in run.cell.options)
            kwargs = model_kwargs_for(cell.config, 10, Objective(cell.config.loss))
            assert kwargs[remedy.name] and not model_kwargs_for(plain, 10, Objective(plain.loss)).get(remedy.name), remedy.name
        layerscale = runs["layerscale"].config
        assert model_kwargs_for(layerscale, 10, Objective(layerscale.loss))["init_values"] == 1e-5  # CaiT's rule at 24 blocks


def test_demo_cells_validate_after_their_last_epoch_unless_told_otherwise():
    grid = load_grid("gong-table1")
    assert {run.config.run.val_every for run in resolve_cells(grid, {}, RECIPE)} == {0}
    assert {run.config.run.val_every for run in resolve_cells(grid, {"val_every": 5}, RECIPE)} == {5}
    assert {run.config.run.val_every for run in resolve_cells(grid, {})} == {1}  # the train default off --demo


def test_gong_table1_is_the_papers_seven_loss_combinations():
    grid = load_grid("gong-table1")
    weights = {cell.name: (cell.options["cos_weight"], cell.options["contrastive_weight"], cell.options["patch_mix_weight"])
               for cell in grid.cells}
    assert len(weights) == 7 and len(set(weights.values())) == 7 and weights["none"] == (0, 0, 0)
    assert grid.published == {"none": 81.8, "cos": 82.0, "cons": 82.3, "mix": 82.4, "cos+cons": 82.3, "cos+mix": 82.3, "cons+mix": 82.6}  # docs/method.md §5
    assert [heading for heading, _ in grid.columns] == ["ℓ_cos", "ℓ_cons", "ℓ_token"]


def test_list_prints_every_bundled_grid(capsys):
    _main(["ablate", "--list"])
    out = capsys.readouterr().out
    for name in ("gong-table1", "gong-table4", "gong-table5", "wang-remedies", "depth"):
        assert name in out
    assert "cons+mix" in out and "82.6" in out


@pytest.mark.parametrize(
    "text, needle",
    [
        ("axes:\n  contrastive_wieght: [0, 1]\n", "unknown option 'contrastive_wieght'"),
        ("cells:\n  - {name: a, attnscale: true}\n  - {name: b, attnscal: true}\n", "cell b: unknown option 'attnscal'"),
        ("base: {modle: deit_tiny_12}\naxes:\n  attnscale: [false, true]\n", "unknown option 'modle'"),
        ("axes:\n  attnscale: []\n", "axis 'attnscale' has no values"),
        ("axes:\n  attnscale: [false]\ncells:\n  - {name: a}\n", "not both"),
        ("cells:\n  - {name: a, out: elsewhere}\n", "'out' is set by vitdeep ablate"),
        ("axes:\n  attnscale: [false, true]\npublished: {nope: 1.0}\n", "published names no cell 'nope'"),
        ("axes:\n  drop_path: [0.1, fast]\n", "drop_path='fast' should be of type float"),
        ("cells:\n  - {name: a/b}\n", "cell name 'a/b'"),
    ],
)
def test_bad_grids_exit_2_with_one_line_and_write_nothing(digit_shards, tmp_path, capsys, text, needle):
    grid = _grid(tmp_path, text)
    refuses(_ablate(grid, digit_shards, tmp_path / "ab"), capsys, needle, out=tmp_path / "ab")


def test_bad_input_outside_the_grid_file_writes_nothing(digit_shards, tmp_path, capsys):
    out = tmp_path / "ab"
    refuses(_ablate("gong-tabel1", digit_shards, out), capsys, "unknown grid 'gong-tabel1' (bundled: depth, gong-table1", out=out)
    refuses(_ablate(tmp_path / "missing.yaml", digit_shards, out), capsys, "grid file not found", out=out)
    grid = _grid(tmp_path, ONE_AXIS)
    refuses(_ablate(grid, digit_shards, out, "--resume", "auto"), capsys, "--resume is not an ablate option", out=out)
    refuses(_ablate(grid, digit_shards, out, "--global-batch", "60"), capsys, "cell contrastive_weight=0:", out=out)
    refuses(["ablate", str(grid), "--out", str(out)], capsys, "pass --data SHARDS and --val SHARDS", out=out)
    refuses(_ablate(grid, digit_shards, out, "--emit", "pbs"), capsys, "--emit pbs", out=out)
    refuses(["ablate", "--collect", str(out)], capsys, "is not an ablation folder", out=out)


def test_flags_and_error_lines_of_launched_runs():
    assert option_flags({"attnscale": True, "featscale": False, "lr": 0.005, "rand_augment": ""}) == [
        "--attnscale", "--no-featscale", "--lr", "0.005", "--rand-augment", ""]
    launcher = ("[INFO] [launch.py:245:main] process 1 spawned\n\x1b[1mtrain\x1b[0m 3/10\rtrain 4/10\n"
                "error (rank 1): teacher 'x' is neither a file nor a timm model name\n"
                "error: teacher 'x' is neither a file nor a timm model name\n"
                "[ERROR] [launch.py:321:sigkill_handler] ... exits with return code = 2\n")
    assert error_line(launcher) == "error: teacher 'x' is neither a file nor a timm model name"
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\ntorch.OutOfMemoryError: CUDA out of memory\n"
    assert error_line(traceback) == "torch.OutOfMemoryError: CUDA out of memory"
    assert error_line("all fine\n") is None


def test_a_launchs_output_goes_to_the_log_of_the_cell_its_marker_started(tmp_path, capfd):
    """One launch, several cells: the output before the first marker and up to the next goes to
    the first cell's log; each log is appended to; the error line is the last cell's, of this run."""
    from vitdeep.ablate.launch import marked_index, marker_line

    (tmp_path / "b.log").write_text("error: an earlier attempt's\n")
    lines = ["launcher starts", marker_line(1, 2, "a", "vitdeep train --out a"), "a trains\ra trained",
             "\x1b[1m" + marker_line(2, 2, "b", "vitdeep train --out b") + "\x1b[0m", "b trains"]
    script = f"import sys; print({chr(10).join(lines)!r}); print('warning: x', file=sys.stderr, end='')"
    logs = {1: tmp_path / "a.log", 2: tmp_path / "b.log"}
    code, line = run_logged([sys.executable, "-u", "-c", script], logs[1], lambda text: logs.get(marked_index(text)))
    assert code == 0 and line is None
    assert (tmp_path / "a.log").read_bytes() == b"launcher starts\nablate cell 1 of 2 (a): vitdeep train --out a\na trains\ra trained\n"
    assert (tmp_path / "b.log").read_bytes().endswith(b"b trains\nwarning: x") and b"(b): vitdeep train --out b" in (tmp_path / "b.log").read_bytes()
    assert "launcher starts" in capfd.readouterr().out  # shown as it comes
    _, line = run_logged([sys.executable, "-c", "print('error: b broke')"], tmp_path / "b.log", lambda text: None)
    assert line == "error: b broke"


# -- Slurm ---------------------------------------------------------------------------------------


def test_emit_slurm_writes_a_job_array_of_one_cell_per_task(tmp_path):
    grid, out = _grid(tmp_path, ONE_AXIS), tmp_path / "ab"
    _main(["ablate", str(grid), "--data", "/data/train-{000000..000009}.tar", "--val", "/data/val", "--out", str(out),
          "--model", "deit_base_24", "--epochs", "3", "--emit", "slurm"])
    script = out / "ablate.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --array=0-1\n" in text and "#SBATCH --nodes=2-4\n" in text  # resources from launch/slurm.sbatch
    assert sorted(p.name for p in out.iterdir()) == ["ablate.sbatch", "grid.json", "logs"]  # nothing ran
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").symlink_to(FAKE_SRUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("DATA", "OUT", "VAL", "DRY_RUN", "LAUNCH_DIR")}
    env.update(PATH=f"{fake}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_NODELIST="gpu-a,gpu-b",
               SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", TORCHRUN=str(Path(sys.executable).parent / "torchrun"))
    for task, (name, weight) in enumerate([("contrastive_weight=0", "0.0"), ("contrastive_weight=1", "1.0")]):
        result = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(task)}, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        commands = [line for line in result.stdout.splitlines() if "-m vitdeep train" in line]
        assert len(commands) == 2  # one per node
        for node, command in enumerate(commands):
            assert f"--node_rank {node} " in command and "--nnodes 2 --nproc_per_node 8" in command
            assert command.endswith(f"-m vitdeep train --data /data/train-\\{{000000..000009\\}}.tar --out {out}/cells/{name} "
                                    f"--val /data/val --model deit_base_24 --epochs 3 --contrastive-weight {weight} --resume auto")
    outside = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert outside.returncode == 2 and "submit it with sbatch" in outside.stderr
    assert json.loads((out / "grid.json").read_text())["cells"][1]["train_options"]["contrastive_weight"] == 1.0


# -- a real grid ---------------------------------------------------------------------------------


def _snapshot(out: Path) -> dict[str, int]:
    """Every file of the cells' runs with its modification time: a rerun that trains changes it."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted((out / "cells").rglob("*")) if p.is_file()}


def _results(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("results.json", "results.md", "results.png")}


@pytest.mark.slow
def test_grid_killed_mid_cell_resumes_then_reruns_without_training(digit_shards, tmp_path, capsys):
    """Two cells on 2 CPU ranks: SIGKILL once the second cell has a checkpoint, rerun (the first
    cell is skipped, the second resumed), rerun again (no training, identical results)."""
    grid, out = _grid(tmp_path, ONE_AXIS), tmp_path / "ab"
    args = _ablate(grid, digit_shards, out, "--steps", "10", "--save-every", "2", "--ranks", "2")
    first, second = out / "cells" / "contrastive_weight=0", out / "cells" / "contrastive_weight=1"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(single_cmd(args), env=cpu_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        while not list(second.glob(f"checkpoints/step_*/{MARKER}")):
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint of the second cell in time"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert (first / "eval.json").is_file() and not (second / "summary.json").exists(), "killed in the middle of the second cell"
    first_files = {k: v for k, v in _snapshot(out).items() if k.startswith("cells/contrastive_weight=0/")}

    resumed = run(single_cmd(args))
    assert "contrastive_weight=0: finished earlier, skipped" in resumed.stdout
    second_log = (out / "logs" / "contrastive_weight=1.log").read_text()
    assert "--resume auto" in resumed.stdout and f"resumed from {second}/checkpoints/step_" in second_log
    assert {k: v for k, v in _snapshot(out).items() if k.startswith("cells/contrastive_weight=0/")} == first_files
    results = json.loads((out / "results.json").read_text())
    assert [(c["name"], c["status"], c["steps"]) for c in results["cells"]] == [("contrastive_weight=0", "done", 10),
                                                                                ("contrastive_weight=1", "done", 10)]
    for cell in results["cells"]:
        assert 0 <= cell["top1"] <= 100 and cell["ema_top1"] is not None and len(cell["cossim"]) == 7  # 6 blocks + embeddings
        assert -1 <= cell["last_layer_cossim"] <= 1 and cell["last_layer_attn_std"] > 0 and cell["images_per_s"] > 0
        assert cell["top1"] == json.loads((out / "cells" / cell["name"] / "eval.json").read_text())["top1"]
    assert json.loads((second / "config.json").read_text())["loss"]["contrastive_weight"] == 1.0
    assert json.loads((first / "config.json").read_text())["loss"]["contrastive_weight"] == 0.0
    assert json.loads((out / "status" / "contrastive_weight=1.json").read_text())["attempts"] == 2
    table = (out / "results.md").read_text()
    assert "| contrastive_weight=0 | × |" in table and "| contrastive_weight=1 | ✓ |" in table
    before, files = _results(out), _snapshot(out)

    again = run(single_cmd(args))
    assert "deepspeed.launcher.runner" not in again.stdout and again.stdout.count("finished earlier, skipped") == 2
    assert _snapshot(out) == files and _results(out) == before
    for name in before:
        (out / name).unlink()
    capsys.readouterr()
    _main(["ablate", "--collect", str(out)])
    assert _results(out) == before


@pytest.mark.slow
def test_cells_share_a_launch_and_a_failing_cell_ends_only_its_own(digit_shards, tmp_path):
    """Cells train one after another in one launch, each exactly as alone: a cell trained after
    another in the same ranks, and one trained first in a later launch, match the first cell to
    the last digit. A cell whose run fails (its losses turn non-finite: every check before the run
    passes) is recorded with its error line, and the cells behind it start in a new launch."""
    grid = _grid(tmp_path, "cells:\n  - {name: plain}\n  - {name: again}\n"
                           "  - {name: diverges, lr: 1.0e+30, warmup_steps: 0, max_bad_steps: 1}\n  - {name: after}\n")
    out = tmp_path / "ab"
    result = run(single_cmd(_ablate(grid, digit_shards, out, "--steps", "3")))
    assert result.stdout.count("deepspeed.launcher.runner") == 2
    assert "4 cells in one launch" in result.stdout and "1 cells in one launch" in result.stdout
    cells = {cell["name"]: cell for cell in json.loads((out / "results.json").read_text())["cells"]}
    assert {name: cell["status"] for name, cell in cells.items()} == {"plain": "done", "again": "done", "diverges": "failed", "after": "done"}
    assert cells["diverges"]["error"].startswith("error: 1 non-finite losses in a row at step 1; stopped"), cells["diverges"]["error"]
    assert "- diverges: error: 1 non-finite losses in a row" in (out / "results.md").read_text()
    assert "diverges failed" in result.stdout

    def outcome(name: str) -> tuple:
        folder = out / "cells" / name
        evaluated = json.loads((folder / "eval.json").read_text())
        losses = {step: row["loss"] for step, row in metrics(folder).items()}
        return losses, evaluated["top1"], evaluated["loss"], cells[name]["cossim"], cells[name]["attn_std"]

    assert len(outcome("plain")[0]) == 3
    assert outcome("again") == outcome("plain") == outcome("after")
    logs = {name: (out / "logs" / f"{name}.log").read_text() for name in cells}
    assert "non-finite" in logs["diverges"] and not any("non-finite" in logs[name] for name in ("plain", "again", "after"))
    assert all(f"({name}): vitdeep train " in logs[name] for name in cells)  # each log starts at its cell's marker
    assert all(json.loads((out / "status" / f"{name}.json").read_text())["attempts"] == 1 for name in cells)


# -- seeds ---------------------------------------------------------------------------------------


def test_seeds_run_every_cell_with_consecutive_seeds():
    grid = load_grid("wang-remedies")
    runs = resolve_cells(grid, {"seed": 7}, seeds=3)
    assert [run.name for run in runs[:3]] == ["plain,seed=7", "plain,seed=8", "plain,seed=9"]
    assert [run.config.run.seed for run in runs[:3]] == [7, 8, 9] and {run.group for run in runs} == {c.name for c in grid.cells}
    assert all(run.config.model.attnscale == next(c for c in grid.cells if c.name == run.group).options["attnscale"] for run in runs)
    assert [run.name for run in resolve_cells(grid, {})] == [c.name for c in grid.cells]  # one seed: the grid's own names
    with pytest.raises(UserError, match="sets its own seed"):
        resolve_cells(parse_grid("g", {"cells": [{"name": "a", "seed": 3}, {"name": "b"}]}), {}, seeds=2)


def test_seeds_average_into_mean_and_spread_in_the_table_and_figure(tmp_path):
    from vitdeep.ablate.results import _write_figure, markdown_table, seed_groups

    def run(group: str, seed: int, top1: float | None, status: str = "done") -> dict:
        return {"name": f"{group},seed={seed}", "group": group, "status": status, "error": None, "columns": {"attnscale": group == "on"},
                "top1": top1, "top5": 99.0, "ema_top1": None, "ema_top5": None, "published_top1": None,
                "last_layer_cossim": top1 / 100 if top1 else None, "last_layer_attn_std": 0.1, "cossim": [0.1, top1 / 100] if top1 else None,
                "attn_std": [0.1], "images_per_s": 100.0, "steps": 3, "wall_s": 1.0}

    cells = [run("off", 0, 10.0), run("off", 1, 20.0), run("off", 2, 30.0), run("on", 0, 80.0), run("on", 1, 90.0),
             run("on", 2, None, status="failed")]
    groups = seed_groups(cells)
    off, on = groups
    assert (off["top1"], off["top1_std"], off["top1_range"], off["done"], off["seeds"]) == (20.0, 10.0, [10.0, 30.0], 3, 3)
    assert (on["top1"], on["done"]) == (85.0, 2) and on["top1_std"] == pytest.approx(7.0710678)
    assert off["cossim"] == pytest.approx([0.1, 0.2]) and off["cossim_std"] == pytest.approx([0.0, 0.1])
    assert seed_groups(cells[:1] + cells[3:4]) == []  # one run per cell: nothing to average
    grid = {"title": "t", "paper": None, "metric": None, "columns": [["attnscale", "attnscale"]], "published": {}}
    results = {"grid": grid, "data": "d", "val": "v", "recipe": None, "shared": {}, "cells": cells, "groups": groups}
    text = markdown_table(results)
    assert "| off | × | 3/3 | 20.0 ± 10.0 |" in text and "| on | ✓ | 2/3 | 85.0 ± 7.1 |" in text and "Every run:" in text
    _write_figure(tmp_path / "results.png", results)
    assert (tmp_path / "results.png").stat().st_size > 10_000


@pytest.mark.slow
def test_remedies_grid_runs_on_the_digits_with_two_seeds(tmp_path):
    """`vitdeep ablate remedies --demo --seeds 2` at tiny size (2 blocks, 2 steps): every remedy's
    cell trains with its remedy under both seeds, and the table and figure average the seeds."""
    from vitdeep.architecture import REMEDIES
    from vitdeep.engine.checkpoint import complete_checkpoints, read_marker

    out = tmp_path / "ab"
    run(single_cmd(["ablate", "remedies", "--demo", "--out", str(out), "--steps", "2", "--depth", "2", "--seeds", "2"]))
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 20 and all(cell["status"] == "done" for cell in results["cells"])
    assert [group["name"] for group in results["groups"]][:2] == ["none", "losses"]
    assert all(group["done"] == 2 and group["top1_std"] is not None for group in results["groups"])
    cells = load_grid("remedies").cells
    for remedy in REMEDIES:
        cell = next(c.name for c in cells if remedy.name in c.options)
        for seed in (0, 1):
            marker = read_marker(complete_checkpoints(out / "cells" / f"{cell},seed={seed}")[-1])
            assert marker["model_kwargs"][remedy.name] and marker["config"]["run"]["seed"] == seed, (remedy.name, seed)
    assert "±" in (out / "results.md").read_text() and (out / "results.png").stat().st_size > 10_000
