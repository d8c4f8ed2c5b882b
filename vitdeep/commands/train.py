"""`vitdeep train` and `vitdeep finetune` once parsed: the run's config resolved (a finetune's from
its source's architecture and DeiT's finetuning recipe), then the dry run's plan printed, or the
run checked against this GPU's memory and trained. `vitdeep plan` resolves through the same
function, so it plans exactly the run these commands would start."""

from __future__ import annotations

from pathlib import Path

from vitdeep.commands.dry_run import print_dry_run
from vitdeep.config import FINETUNE_RECIPE, TrainConfig, resolve_config
from vitdeep.engine.loop import plan_from_env, train
from vitdeep.engine.weights import check_inherited_model, source_model_options
from vitdeep.planner.memory import check_fits


def resolve_run_config(options: dict, config: Path | None, source: str | None = None) -> TrainConfig:
    """The run's config; with a finetune's `source`, DeiT's finetuning recipe and the source's
    architecture under the config file and flags, and a model named otherwise refused (it would
    label the source's architecture falsely)."""
    if source is None:
        return resolve_config(options, config)
    inherited = source_model_options(source)
    cfg = resolve_config(options, config, {**FINETUNE_RECIPE, **inherited})
    check_inherited_model(cfg.model.model, "--model" if "model" in options else f"--config {config}", source, inherited)
    return cfg


def run_training(options: dict, config: Path | None, dry_run: bool, source: str | None = None, command: str = "train") -> None:
    """Resolve the run, then print its plan (`dry_run`) or check it fits this GPU and train it."""
    plan = plan_from_env(resolve_run_config(options, config, source))
    if dry_run:
        print_dry_run(plan, command)
        return
    check_fits(plan)
    train(plan)
