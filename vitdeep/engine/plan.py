"""The resolved run: batch arithmetic, schedule, DeepSpeed config and model options.

Everything here is computed from the config and the shards' metadata without starting
DeepSpeed, so `--dry-run` shows exactly what a run would do, and every check a user can fail
runs before any process group or file exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitdeep.architecture import ARCHITECTURE_OPTIONS
from vitdeep.config import TrainConfig
from vitdeep.data.pipeline import DatasetInfo, epoch_batches, read_dataset_info
from vitdeep.engine.deepspeed import (
    BatchPlan,
    check_precision_supported,
    fill_ds_config,
    load_ds_config,
    precision,
    zero_stage,
)
from vitdeep.engine.checkpoint import read_marker, resolve_resume
from vitdeep.engine.rundir import existing_run
from vitdeep.engine.schedule import LrSchedule
from vitdeep.engine.weights import Weights, read_weights, source_model_options
from vitdeep.errors import UserError
from vitdeep.losses import Objective
from vitdeep.models import count_parameters, create_model, get_spec, model_stats
from vitdeep.models.checkpoints import adapt_state_dict
from vitdeep.models.registry import resolved_architecture, resolved_options
from vitdeep.paths import check_output_dir

#: DeiT's learning-rate scaling rule: lr = base_lr × global_batch / 512.
LR_REFERENCE_BATCH = 512


@dataclass
class RunPlan:
    cfg: TrainConfig
    world_size: int
    batch: BatchPlan
    ds_config: dict[str, Any]
    train_info: DatasetInfo
    val_info: DatasetInfo | None
    num_classes: int
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    schedule: LrSchedule
    model_kwargs: dict[str, Any]
    init_weights: Weights | None = None
    #: The checkpoint to resume from (the newest intact one for `--resume auto`), and the newer
    #: ones passed over, with why.
    resume_path: Path | None = None
    resume_skipped: tuple[str, ...] = ()

    @property
    def resume_step(self) -> int | None:
        return read_marker(self.resume_path)["step"] if self.resume_path is not None else None

    @property
    def precision(self) -> str:
        return precision(self.ds_config)

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)

    def model_stats(self) -> tuple[int, int]:
        """(parameters, forward FLOPs per image) of the run's model, counted as `vitdeep models` does."""
        return model_stats(self.cfg.model.model, self.cfg.model.img_size, **_stat_options(self.model_kwargs))

    def summary(self) -> dict[str, Any]:
        """What `--dry-run` prints (and `config.json` records beside the options)."""
        params, flops = self.model_stats()
        options = resolved_options(self.cfg.model.model, **self.model_kwargs)
        switch = {True: "on", False: "off"}
        weights = Objective(self.cfg.loss).weights
        return {
            "model": self.cfg.model.model,
            "parameters": params,
            "GFLOPs per image (forward)": round(flops / 1e9, 3),
            "talking heads": switch[bool(options["talking_heads"])],
            "AttnScale / FeatScale": f"{switch[options['attnscale']]} / {switch[options['featscale']]}",
            "drop path": options["drop_path_rate"],
            "objective": " + ".join(f"{weight:g}·{name}" for name, weight in weights.items()),
            "start from": self.cfg.run.init_from or "random init",
            "num_classes": self.num_classes,
            "train samples": self.train_info.num_samples,
            "val samples": self.val_info.num_samples if self.val_info else None,
            "world size": self.world_size,
            "global batch": self.batch.global_batch,
            "micro batch": self.batch.micro_batch,
            "gradient accumulation": self.batch.grad_accum,
            "steps per epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "total steps": self.total_steps,
            "warm-up steps": self.schedule.warmup_steps,
            "peak lr": self.schedule.peak_lr,
            "schedule": self.schedule.kind,
            "precision": self.precision,
            "ZeRO stage": self.zero_stage,
        }


def _stat_options(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model_kwargs.items() if k not in ("img_size",)}


def model_kwargs_for(cfg: TrainConfig, num_classes: int, objective: Objective) -> dict[str, Any]:
    """`create_model` options from the run config (only those the user can change): every
    architecture option the model section sets, the dropouts, and the heads the objective needs."""
    m = cfg.model
    kwargs: dict[str, Any] = {name: getattr(m, name) for name in ARCHITECTURE_OPTIONS if getattr(m, name, None) is not None}
    kwargs.update(
        num_classes=num_classes,
        drop_path_rate=m.drop_path,
        drop_rate=m.drop,
        attn_drop_rate=m.attn_drop,
        proj_drop_rate=m.proj_drop,
        pos_drop_rate=m.pos_drop,
        patch_head=objective.needs_patch_head,
    )
    if objective.needs_teacher:
        if get_spec(m.model).family != "deit":
            raise UserError(f"distillation needs a distillation token; {m.model} is a CaiT model (use a deit_* model)")
        kwargs["distilled"] = True
    return kwargs


def check_teacher(spec: str | None) -> None:
    """A distillation teacher `load_teacher` can build: a vitdeep checkpoint / export, a timm name,
    or `TIMM_NAME=FILE` (checked without loading any weights)."""
    import timm

    if not spec:
        raise UserError("`distill` needs a `teacher`", params=("distill", "teacher"))
    if Path(spec).exists():
        if not source_model_options(spec):
            raise UserError(f"`teacher` {spec} is a plain state dict: name its timm architecture as TIMM_NAME={spec}", params=("teacher",))
        return
    name, _, file = spec.partition("=")
    if name not in timm.list_models(pretrained=False):
        raise UserError(f"`teacher` {spec} is neither a file nor a timm model name", params=("teacher",))
    if file and not Path(file).is_file():
        raise UserError(f"teacher weights not found: {file}")


def check_output(cfg: TrainConfig) -> None:
    """`--out` can be written, and holds no other run unless this one resumes or replaces it."""
    out = Path(cfg.run.out)
    check_output_dir(out, "--out")
    found = existing_run(out) if cfg.run.resume is None and not cfg.run.overwrite else None
    if found:
        raise UserError(f"`out` {out} holds {found}: `resume` auto to continue it, another `out`, or `overwrite` to replace it",
                        params=("out", "resume", "overwrite"))


def make_plan(cfg: TrainConfig, world_size: int, train_info: DatasetInfo | None = None, check_host: bool = True) -> RunPlan:
    """Resolve and check everything a run needs; raises `UserError` on bad input.

    The memory planner (`capacity.py`) passes `train_info` instead of --data, and
    `check_host=False` to plan for other machines: no output folder or checkpoint to resume is
    checked, and fp16 / offload are not refused for want of a GPU here.
    """
    get_spec(cfg.model.model)
    if train_info is None and not cfg.data.data:
        raise UserError("no training data: pass `data` SHARDS", params=("data",))
    if check_host and not cfg.run.out:
        raise UserError("no output directory: pass `out` DIR", params=("out",))
    if check_host:
        check_output(cfg)
    raw = load_ds_config(cfg.run.ds_config)
    if check_host:
        check_precision_supported(raw)

    train_info = train_info or read_dataset_info(cfg.data.data, num_samples=cfg.data.num_samples, split="train")
    val_info = read_dataset_info(cfg.data.val, num_samples=cfg.data.val_num_samples, split="val") if cfg.data.val else None
    num_classes = cfg.model.num_classes or train_info.num_classes
    if not num_classes:
        raise UserError("the shards carry no class count (_info.json); pass `num_classes`", params=("num_classes",))

    objective = Objective(cfg.loss)
    if objective.needs_teacher:
        check_teacher(cfg.run.teacher)
    model_kwargs = model_kwargs_for(cfg, num_classes, objective)
    with torch.device("meta"):  # every option and shape checked now, at no cost
        meta_model = create_model(cfg.model.model, **model_kwargs)
    init_weights = None
    if cfg.run.init_from:
        init_weights = read_weights(cfg.run.init_from, ema=cfg.run.init_from_ema)
        adapt_state_dict(init_weights.state_dict, meta_model, init_weights.source, init_weights.kind)
    if not 0 <= cfg.optim.freeze_blocks <= len(meta_model.blocks):
        raise UserError(f"`freeze_blocks` {cfg.optim.freeze_blocks} is outside 0..{len(meta_model.blocks)} (the model's depth)", params=("freeze_blocks",))

    options = {"global_batch": cfg.optim.global_batch, "micro_batch": cfg.optim.micro_batch, "clip_grad": cfg.optim.clip_grad}
    ds_config, adopted, batch = fill_ds_config(raw, options, cfg.explicit, world_size, count_parameters(meta_model))
    for name, value in adopted.items():
        setattr(cfg.optim, name, value)

    steps_per_epoch = epoch_batches(train_info.require_num_samples(), batch.micro_batch, world_size) // batch.grad_accum
    if steps_per_epoch == 0:
        raise UserError(
            f"the training set has {train_info.num_samples} samples, fewer than one global batch of {batch.global_batch}"
        )
    o = cfg.optim
    total_steps = o.steps if o.steps else o.epochs * steps_per_epoch
    if total_steps <= 0:
        raise UserError(f"nothing to train: steps={o.steps}, epochs={o.epochs}")
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * steps_per_epoch)
    peak_lr = o.lr if o.lr is not None else o.base_lr * batch.global_batch / LR_REFERENCE_BATCH
    schedule = LrSchedule(peak_lr, total_steps, min(warmup, total_steps), o.warmup_lr, o.min_lr, o.schedule)

    skipped: list[str] = []
    resume_path = None
    if check_host:
        resume_path = resolve_resume(cfg.run.resume, Path(cfg.run.out), on_skip=lambda path, why: skipped.append(f"{path.name}: {why}"))
    plan = RunPlan(
        cfg=cfg,
        world_size=world_size,
        batch=batch,
        ds_config=ds_config,
        train_info=train_info,
        val_info=val_info,
        num_classes=num_classes,
        micro_per_epoch=steps_per_epoch * batch.grad_accum,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=epochs,
        schedule=schedule,
        model_kwargs=model_kwargs,
        init_weights=init_weights,
        resume_path=resume_path,
        resume_skipped=tuple(skipped),
    )
    if resume_path is not None:
        check_resume_compatible(read_marker(resume_path), plan, resume_path)
    return plan


def check_resume_compatible(marker: dict[str, Any], plan: RunPlan, path: Path) -> None:
    """A checkpoint resumes only into the same architecture (defaults spelled out or not), world
    size and ZeRO stage."""
    cfg = plan.cfg
    if marker["model"] != cfg.model.model:
        raise UserError(f"checkpoint {path} was made for model {marker['model']}; this run builds {cfg.model.model}")
    theirs = resolved_architecture(marker["model"], marker.get("model_kwargs", {}))
    ours = resolved_architecture(cfg.model.model, plan.model_kwargs)
    for key in ARCHITECTURE_OPTIONS:
        if theirs.get(key) != ours.get(key):
            raise UserError(f"checkpoint {path} has {key}={theirs.get(key)}; this run has {key}={ours.get(key)}")
    if marker["world_size"] != plan.world_size or marker["zero_stage"] != plan.zero_stage:
        raise UserError(
            f"checkpoint {path} was written by {marker['world_size']} ranks with ZeRO-{marker['zero_stage']}; this run has "
            f"{plan.world_size} ranks with ZeRO-{plan.zero_stage} (to change either, start a new run from it with `vitdeep finetune --from`)"
        )
