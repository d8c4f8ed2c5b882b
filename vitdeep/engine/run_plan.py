"""The resolved run: batch arithmetic, schedule, DeepSpeed config and model options.

Everything here is computed from the config and the shards' metadata without starting
DeepSpeed, so `--dry-run` shows exactly what a run would do, and every check a user can fail
runs before any process group or file exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vitdeep.architecture import ARCHITECTURE_OPTIONS, cait_layer_scale_init
from vitdeep.config import TrainConfig
from vitdeep.cores import workers_for_cores
from vitdeep.data.lane_layout import STREAM_FORMAT, LaneLayout, choose_lanes, lane_shuffle_buffer
from vitdeep.data.pipeline import DatasetInfo, epoch_batches, read_dataset_info
from vitdeep.engine.deepspeed import (
    BatchPlan,
    adopted_ds_values,
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
from vitdeep.models import count_parameters, get_spec, model_stats
from vitdeep.models.checkpoints import adapt_state_dict
from vitdeep.models.registry import FAMILIES, cached_meta_model, resolved_architecture, resolved_options
from vitdeep.paths import check_output_dir
from vitdeep.ranks import read_ranks
from vitdeep.trackers import check_tracker

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
    #: The lanes of the training order (`vitdeep.data.lanes`) and their shuffle buffer; None for a
    #: run resumed from a checkpoint written before that order (it keeps its per-rank stream).
    layout: LaneLayout | None = None
    shuffle_buffer: int | None = None
    #: The checkpoint to resume from (the newest intact one for `--resume auto`), and the newer
    #: ones passed over, with why.
    resume_path: Path | None = None
    resume_skipped: tuple[str, ...] = ()
    #: What the plan changed to fit this world (a micro-batch or worker count), said at the start.
    notes: tuple[str, ...] = ()

    @property
    def resume_step(self) -> int | None:
        return read_marker(self.resume_path)["step"] if self.resume_path is not None else None

    def stream_info(self) -> dict[str, Any] | None:
        """What fixes the training order, as checkpoints record it (None: the per-rank stream)."""
        if self.layout is None:
            return None
        return {"format": STREAM_FORMAT, "lanes": self.layout.lanes, "global_batch": self.layout.global_batch,
                "paired": self.layout.paired, "shuffle_buffer": self.shuffle_buffer}

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
            "Re-attention / QK-norm": f"{switch[options['reattention']]} / {switch[options['qk_norm']]}",
            "ContraNorm scale": options["contranorm"] or "off",
            "register tokens": options["reg_tokens"],
            "LayerScale init": resolved_architecture(self.cfg.model.model, self.model_kwargs).get("init_values") or "off",
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
            "loader workers per rank": self.cfg.data.workers,
            **self._order_summary(),
            "steps per epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "total steps": self.total_steps,
            "warm-up steps": self.schedule.warmup_steps,
            "peak lr": self.schedule.peak_lr,
            "schedule": self.schedule.kind,
            "precision": self.precision,
            "ZeRO stage": self.zero_stage,
        }


    def _order_summary(self) -> dict[str, Any]:
        if self.layout is None:
            return {"training order": f"per rank (a run started before the lane order: resumes on {self.world_size} ranks only)"}
        layout = self.layout
        return {
            "lanes": layout.lanes,
            "ranks that fit": ", ".join(map(str, layout.world_sizes())),
            "workers that fit": f"0 to {layout.worker_counts(self.world_size)[-1]}",
            "micro batches that fit": ", ".join(map(str, layout.micro_batches(self.world_size))),
        }


def _stat_options(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model_kwargs.items() if k not in ("img_size",)}


def model_kwargs_for(cfg: TrainConfig, num_classes: int, objective: Objective) -> dict[str, Any]:
    """`create_model` options from the run config (only those the user can change): every
    architecture option the model section sets, the dropouts, and the heads the objective needs."""
    m = cfg.model
    kwargs: dict[str, Any] = {name: getattr(m, name) for name in ARCHITECTURE_OPTIONS if getattr(m, name, None) is not None}
    if m.layer_scale_by_depth and m.init_values is None:
        kwargs["init_values"] = cait_layer_scale_init(m.depth or get_spec(m.model).depth)
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
        family = get_spec(m.model).family
        if not FAMILIES[family].distillation_token:
            raise UserError(f"distillation needs a distillation token; {m.model} is a {family} model, which has none (use a deit_* model)")
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
    """`--out` can be written, is not being written by a live run, holds no other run unless this
    one resumes or replaces it, and what the run writes there is none of its inputs (the shards'
    folders, the `init_from` checkpoint), even with `overwrite`."""
    from vitdeep.engine.rundir import RUN_FILES, RunLock
    from vitdeep.paths import checkpoint_inputs, claim_outputs, data_folders

    out = Path(cfg.run.out)
    check_output_dir(out, "--out")
    RunLock(out).check_free()
    inputs = [*data_folders(cfg.data.data), *data_folders(cfg.data.val), *checkpoint_inputs(cfg.run.init_from)]
    claim_outputs([out / name for name in RUN_FILES], inputs, flag="--out", overwrite=True)
    found = existing_run(out) if cfg.run.resume is None and not cfg.run.overwrite else None
    if found:
        raise UserError(f"`out` {out} holds {found}: `resume` auto to continue it, another `out`, or `overwrite` to replace it",
                        params=("out", "resume", "overwrite"))


def make_plan(cfg: TrainConfig, world_size: int, train_info: DatasetInfo | None = None, check_host: bool = True,
              read_info: Callable[..., DatasetInfo] = read_dataset_info) -> RunPlan:
    """Resolve and check everything a run needs; raises `UserError` on bad input.

    The memory planner (`vitdeep.planner.memory`) passes `train_info` instead of --data, and
    `check_host=False` to plan for other machines: no output folder or checkpoint to resume is
    checked, and fp16 / offload are not refused for want of a GPU here. `read_info` reads the
    shards' metadata: `vitdeep ablate` plans thousands of cells on the same shards and reads
    them once.
    """
    get_spec(cfg.model.model)
    if train_info is None and not cfg.data.data:
        raise UserError("no training data: pass `data` SHARDS", params=("data",))
    if check_host and not cfg.run.out:
        raise UserError("no output directory: pass `out` DIR", params=("out",))
    if check_host:
        check_output(cfg)
        check_tracker(cfg.run.tracker)
    raw = load_ds_config(cfg.run.ds_config)
    if check_host:
        check_precision_supported(raw)

    train_info = train_info or read_info(cfg.data.data, num_samples=cfg.data.num_samples, split="train")
    val_info = read_info(cfg.data.val, num_samples=cfg.data.val_num_samples, split="val") if cfg.data.val else None
    num_classes = cfg.model.num_classes or train_info.num_classes
    if not num_classes:
        raise UserError("the shards carry no class count (_info.json); pass `num_classes`", params=("num_classes",))

    objective = Objective(cfg.loss)
    if objective.needs_teacher:
        check_teacher(cfg.run.teacher)
    model_kwargs = model_kwargs_for(cfg, num_classes, objective)
    meta_model = cached_meta_model(cfg.model.model, **model_kwargs)  # every option and shape checked now, at no cost
    init_weights = None
    if cfg.run.init_from:
        try:
            init_weights = read_weights(cfg.run.init_from, ema=cfg.run.init_from_ema)
        except UserError as error:
            if "ema" not in error.params:
                raise
            # the run's option is `init_from_ema` (the 384 / 512 px recipes set it, as Gong et al.'s --finetune)
            raise UserError(f"{cfg.run.init_from} holds no EMA weights to start from; turn `init_from_ema` off "
                            f"(--no-init-from-ema) to start from its weights", params=("init_from_ema",)) from None
        try:
            adapt_state_dict(init_weights.state_dict, meta_model, init_weights.source, init_weights.kind)
        except UserError as error:
            if init_weights.model is not None or "model" in cfg.explicit:
                raise
            # a plain state dict does not say its model: the mismatch is against a default the user never named
            raise UserError(f"{error} (`model` {cfg.model.model} is the default, not read from {cfg.run.init_from}: a plain "
                            "state dict does not say its model; name it with `model`)", params=(*error.params, "model")) from None
    if not 0 <= cfg.optim.freeze_blocks <= len(meta_model.blocks):
        raise UserError(f"`freeze_blocks` {cfg.optim.freeze_blocks} is outside 0..{len(meta_model.blocks)} (the model's depth)", params=("freeze_blocks",))

    skipped: list[str] = []
    resume_path = None
    if check_host:
        resume_path = resolve_resume(cfg.run.resume, Path(cfg.run.out), on_skip=lambda path, why: skipped.append(f"{path.name}: {why}"))
    marker = read_marker(resume_path) if resume_path is not None else None

    options = {"global_batch": cfg.optim.global_batch, "micro_batch": cfg.optim.micro_batch, "clip_grad": cfg.optim.clip_grad}
    for name, value in adopted_ds_values(raw, options, cfg.explicit).items():
        setattr(cfg.optim, name, value)
    # the default worker count is a ceiling, lowered to this machine's cores per rank; the lane order
    # does not depend on it, but a checkpoint from before the lanes reads a per-rank stream that does
    if check_host and "workers" not in cfg.explicit and (marker is None or "stream" in marker):
        cfg.data.workers = workers_for_cores(cfg.data.workers, read_ranks().local_world_size or 1)
    layout, shuffle_buffer, notes = _training_order(cfg, world_size, marker, resume_path)
    if layout is not None and cfg.data.data and train_info.shard_sizes is None:
        raise UserError(f"the training order needs every shard's sample count, unknown for {train_info.urls[0]} …: put an "
                        "_info.json (as `vitdeep shards` writes) or a sizes.json beside the shards", params=("data",))
    options = {"global_batch": cfg.optim.global_batch, "micro_batch": cfg.optim.micro_batch, "clip_grad": cfg.optim.clip_grad}
    ds_config, _, batch = fill_ds_config(raw, options, cfg.explicit | {"micro_batch"}, world_size, count_parameters(meta_model))
    if layout is not None:
        layout.check(world_size, cfg.data.workers, batch.micro_batch)

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
        layout=layout,
        shuffle_buffer=shuffle_buffer,
        resume_path=resume_path,
        resume_skipped=tuple(skipped),
        notes=tuple(notes),
    )
    if resume_path is not None:
        check_resume_compatible(marker, plan, resume_path)
    return plan


def _training_order(cfg: TrainConfig, world_size: int, marker: dict[str, Any] | None,
                    resume_path: Path | None) -> tuple[LaneLayout | None, int | None, list[str]]:
    """The lanes of the run (a resumed run keeps its checkpoint's), fitted to this world: a resume
    on another number of ranks takes the largest micro-batch and worker count up to the configured
    ones that fit, and says so. A checkpoint from before the lane order keeps its per-rank stream."""
    paired = cfg.mix.enabled
    saved = marker.get("stream") if marker is not None else None
    if marker is not None and saved is None:
        return None, None, []
    if saved is not None:
        if cfg.data.lanes and "lanes" in cfg.explicit and cfg.data.lanes != saved["lanes"]:
            raise UserError(f"checkpoint {resume_path} orders its samples in {saved['lanes']} lanes; a resumed run keeps them "
                            f"(drop `lanes` {cfg.data.lanes})", params=("lanes",))
        lanes, buffer = saved["lanes"], saved["shuffle_buffer"]
    else:
        lanes = cfg.data.lanes or choose_lanes(cfg.optim.global_batch, world_size, cfg.data.workers, paired)
        buffer = lane_shuffle_buffer(lanes)
    layout = LaneLayout(lanes, cfg.optim.global_batch, paired)
    cfg.data.lanes = lanes
    notes = []
    if marker is not None and marker["world_size"] != world_size and layout.problem(world_size, cfg.data.workers, cfg.optim.micro_batch):
        if world_size not in layout.world_sizes():
            layout.check(world_size, cfg.data.workers, cfg.optim.micro_batch)
        micro = max([m for m in layout.micro_batches(world_size) if m <= cfg.optim.micro_batch], default=min(layout.micro_batches(world_size)))
        workers = max(w for w in layout.worker_counts(world_size) if w <= cfg.data.workers)
        changed = [f"{name} {new} (was {old})" for name, new, old in
                   (("micro-batch", micro, cfg.optim.micro_batch), ("workers", workers, cfg.data.workers)) if new != old]
        if changed:
            notes.append(f"on {world_size} ranks {' and '.join(changed)} to fit the run's {lanes} lanes")
        cfg.optim.micro_batch, cfg.data.workers = micro, workers
    return layout, buffer, notes


def check_resume_compatible(marker: dict[str, Any], plan: RunPlan, path: Path) -> None:
    """A checkpoint resumes only into the same architecture (defaults spelled out or not) and ZeRO
    stage; one written before the lane order only on its own world size."""
    cfg = plan.cfg
    if marker["model"] != cfg.model.model:
        raise UserError(f"checkpoint {path} was made for model {marker['model']}; this run builds {cfg.model.model}")
    theirs = resolved_architecture(marker["model"], marker.get("model_kwargs", {}))
    ours = resolved_architecture(cfg.model.model, plan.model_kwargs)
    for key in ARCHITECTURE_OPTIONS:
        if theirs.get(key) != ours.get(key):
            raise UserError(f"checkpoint {path} has {key}={theirs.get(key)}; this run has {key}={ours.get(key)}")
    if marker["zero_stage"] != plan.zero_stage:
        raise UserError(
            f"checkpoint {path} was written with ZeRO-{marker['zero_stage']}; this run has ZeRO-{plan.zero_stage} "
            f"(a resumed run keeps its ZeRO stage; to change it, start a new run from the checkpoint with `vitdeep finetune --from`)"
        )
    if plan.layout is None and marker["world_size"] != plan.world_size:
        raise UserError(
            f"checkpoint {path} was written by {marker['world_size']} ranks in the per-rank order of vitdeep before its lanes, "
            f"and resumes on {marker['world_size']} ranks only, not {plan.world_size} (or start a new run from it with "
            f"`vitdeep finetune --from`)"
        )
