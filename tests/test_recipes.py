"""The bundled recipes: each resolves and passes `--dry-run`, says what it reproduces, and is
reachable by name (`--config NAME`, `vitdeep recipes`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.launch import refuses
from vitdeep.cli import main
from vitdeep.config import load_config_file, resolve_config
from vitdeep.models import create_model
from vitdeep.commands.recipes import bundled_recipes, read_recipe
from vitdeep.recipebook import RECIPE_DIR, recipe_names

RECIPES = recipe_names()
#: Finetune recipes start from a checkpoint of the same depth; the test's is this narrow.
SMALL_WIDTH = ["--embed-dim", "64", "--num-heads", "4"]


def _dry_run(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--dry-run"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return captured.out


def _small_source(recipe_name: str, tmp_path: Path) -> Path:
    """A DeiT-format checkpoint of the recipe's model at 224 px (what the authors finetune from), at
    width 64: real tensors to resample and adapt, small enough for a test."""
    options = load_config_file(recipe_name)
    switches = {"talking_heads": options["talking_heads"]} if "talking_heads" in options else {}
    torch.manual_seed(0)
    model = create_model(options["model"], img_size=224, embed_dim=64, num_heads=4, num_classes=10, **switches)
    path = tmp_path / f"{recipe_name}_source.pth"
    # the authors' training checkpoints hold the EMA too, which Gong et al.'s finetunes start from
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("name", RECIPES)
def test_every_bundled_recipe_passes_dry_run(name, digit_shards, tmp_path, capsys):
    recipe = read_recipe(RECIPE_DIR / f"{name}.yaml")
    out = tmp_path / "out"
    common = ["--config", name, "--data", str(digit_shards), "--out", str(out)]
    if recipe.command == "finetune":
        printed = _dry_run(["finetune", "--from", str(_small_source(name, tmp_path)), *common, *SMALL_WIDTH], capsys)
        assert "_source.pth" in printed
    else:
        printed = _dry_run(["train", *common], capsys)
    assert re.search(rf"\bmodel\W+{recipe.model}\b", printed)
    assert not out.exists()


def test_deit_base_24_losses_is_the_papers_setup(digit_shards, tmp_path, capsys):
    printed = _dry_run(["train", "--config", "deit_base_24_losses", "--data", str(digit_shards), "--out", str(tmp_path / "o")], capsys)
    assert re.search(r"\bmodel\W+deit_base_24\b", printed)
    assert re.search(r"talking heads\W+on\b", printed)
    assert re.search(r"drop path\W+0\.75\b", printed)
    assert re.search(r"epochs\W+400\b", printed)
    assert re.search(r"objective\W+1·ce \+ 1·contrastive \+ 1·patch_mix\b", printed)


def test_recipes_say_what_they_reproduce_and_are_runnable_as_written():
    recipes = bundled_recipes()
    assert {r.name for r in recipes} == set(RECIPES) and len(RECIPES) >= 11
    for recipe in recipes:
        assert recipe.reproduces and recipe.source, recipe.name
        text = recipe.path.read_text()
        assert text.startswith("#"), f"{recipe.name}: no comment naming its source"
        if recipe.name != "demo_digits":
            assert 75.0 < recipe.published_top1 < 90.0, recipe.name
        cfg = resolve_config(load_config_file(recipe.path))
        micro, views = cfg.optim.micro_batch, cfg.augment.repeated_aug
        assert micro % views == 0, f"{recipe.name}: micro-batch {micro} is no multiple of repeated_aug {views}"
        assert micro % 2 == 0 or not cfg.mix.enabled, f"{recipe.name}: mixing needs an even micro-batch"
        assert cfg.optim.global_batch % micro == 0, recipe.name
    gong = {r.name: r for r in recipes if r.name.startswith("deit_base")}
    assert {n: gong[n].published_top1 for n in ("deit_base_12_losses_400", "deit_base_24_losses", "deit_base_12_losses_384")} == {
        "deit_base_12_losses_400": 82.9, "deit_base_24_losses": 83.3, "deit_base_12_losses_384": 84.2}  # their model zoo


def test_recipes_follow_the_authors_commands():
    b12_300, b12_400 = load_config_file("deit_base_12_losses_300"), load_config_file("deit_base_12_losses_400")
    assert (b12_300["drop_path"], b12_300["mixup"], b12_300["talking_heads"], b12_300["drop"]) == (0.5, 0.0, True, 0.2)
    assert {**b12_300, "drop_path": 0.75, "epochs": 400, "resume": "auto"} == b12_400  # the refine run continues the first
    large = resolve_config(load_config_file("deit_large_24_in22k_losses"))
    assert large.model.talking_heads is False and large.model.drop_path == 0.0 and large.optim.epochs == 40
    for name, switch in (("deit_small_24", "attnscale"), ("deit_small_24", "featscale"), ("cait_s24", "attnscale"), ("cait_s24", "featscale")):
        cfg = resolve_config(load_config_file(f"{name}_{switch}"))
        assert getattr(cfg.model, switch) and not getattr(cfg.model, {"attnscale": "featscale", "featscale": "attnscale"}[switch])
        assert (cfg.loss.cos_weight, cfg.loss.contrastive_weight, cfg.loss.patch_mix_weight) == (0.0, 0.0, 0.0)  # CE only
    small = resolve_config(load_config_file("deit_small_24_featscale"))
    assert (small.model.proj_drop, small.model.pos_drop, small.model.drop) == (0.2, 0.2, 0.0)  # their --drop 0.2


def test_paper_recipes_evaluate_and_average_as_their_authors():
    """Crop 1.0 above 300 px and for CaiT; timm's ModelEma without warm-up; Gong et al.'s finetunes
    from the EMA weights at main.py's drop path 0.1, with DeiT's 5 warm-up epochs from 1e-6."""
    from vitdeep.config import FINETUNE_RECIPE

    for recipe in bundled_recipes():
        if recipe.name == "demo_digits":
            continue
        recipe_defaults = FINETUNE_RECIPE if recipe.command == "finetune" else None
        cfg = resolve_config(load_config_file(recipe.path), recipe=recipe_defaults)
        high_res_or_cait = cfg.model.img_size > 300 or cfg.model.model.startswith("cait")
        assert cfg.augment.crop_ratio == (1.0 if high_res_or_cait else 0.875), recipe.name
        assert cfg.optim.ema_warmup is False, recipe.name
        if cfg.model.img_size > 300:
            assert cfg.run.init_from_ema and cfg.model.drop_path == 0.1, recipe.name
            assert (cfg.optim.warmup_epochs, cfg.optim.warmup_lr) == (5.0, 1e-6), recipe.name


def test_recipes_command_lists_them_with_published_numbers(capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["recipes"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0
    for recipe in bundled_recipes():
        assert recipe.name in printed
        if recipe.published_top1 is not None:
            shown = re.escape(recipe.published())
            assert re.search(rf"{recipe.name}\b.*{shown}", printed), recipe.name
    unchecked = {r.name for r in bundled_recipes() if not r.published_checked}
    assert unchecked == {"cait_s24_attnscale", "cait_s24_featscale", "deit_small_24_attnscale", "deit_small_24_featscale"}, \
        "checked: Gong et al.'s numbers against their tables"
    assert re.search(r"deit_base_12_losses_300\b.*82\.7", printed) and "82.6" not in printed
    assert printed.count("(unchecked)") >= len(unchecked)


def test_config_names_a_bundled_recipe_or_a_file(digit_shards, tmp_path, capsys):
    by_name = _dry_run(["train", "--config", "deit_base_24_losses", "--data", str(digit_shards), "--out", str(tmp_path / "a")], capsys)
    by_path = _dry_run(["train", "--config", str(RECIPE_DIR / "deit_base_24_losses.yaml"), "--data", str(digit_shards), "--out", str(tmp_path / "a")], capsys)
    assert by_name == by_path
    mine = tmp_path / "mine.yaml"
    mine.write_text("recipe:\n  reproduces: my run\n  source: me\n  published_top1: null\n  command: train\n"
                    "  extends: deit_base_24_losses\nepochs: 7\n")
    printed = _dry_run(["train", "--config", str(mine), "--data", str(digit_shards), "--out", str(tmp_path / "b")], capsys)
    assert re.search(r"epochs\W+7\b", printed) and re.search(r"drop path\W+0\.75\b", printed)
    refuses(["train", "--config", "deit_base_25_losses", "--data", str(digit_shards), "--out", str(tmp_path / "c")], capsys,
            "config file not found: deit_base_25_losses (a YAML / JSON file, or a bundled recipe: cait_s24_attnscale", tmp_path / "c")
    mine.write_text("recipe:\n  reproduces: my run\n  published_top1: 80\n  command: train\nepochs: 7\n")
    refuses(["train", "--config", str(mine), "--data", str(digit_shards), "--out", str(tmp_path / "d")], capsys, "missing source", tmp_path / "d")
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"recipe:\n  reproduces: x\n  source: x\n  published_top1: null\n  command: train\n  extends: {loop}\n")
    refuses(["train", "--config", str(loop), "--data", str(digit_shards), "--out", str(tmp_path / "e")], capsys, "extends itself", tmp_path / "e")


def test_a_finetune_recipe_from_a_source_without_ema_says_which_flag(digit_shards, tmp_path, capsys):
    source = tmp_path / "plain.pth"
    torch.manual_seed(0)
    torch.save({"model": create_model("deit_base_12", img_size=224, embed_dim=64, num_heads=4, num_classes=10).state_dict()}, source)
    out = tmp_path / "out"
    refuses(["finetune", "--from", str(source), "--config", "deit_base_12_losses_384", "--data", str(digit_shards), "--out", str(out),
             *SMALL_WIDTH, "--dry-run"], capsys, "--no-init-from-ema", out)
