"""The training loop, readable in one sitting.

    shards → uint8 batches → device: normalise, random erasing → CutMix / Mixup
        → engine(x, aux=True) → Objective (CE + ℓ_cos + ℓ_cons + ℓ_token + distillation)
        → numerics guard (all ranks agree) → engine.backward / engine.step
        → EMA, logging, over-smoothing metrics, checkpoints, evaluation each epoch

Runs the same under `deepspeed`, `torchrun` and a plain single process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vitdeep.analysis import oversmoothing_metrics
from vitdeep.data.mixing import build_mixer
from vitdeep.data.pipeline import BatchPreprocessor, eval_loader, train_loader
from vitdeep.engine.checkpoint import (
    load_checkpoint,
    prune_checkpoints,
    read_marker,
    resolve_resume,
    save_checkpoint,
    set_rng_state,
    write_json_atomic,
)
from vitdeep.engine.deepspeed import (
    DistInfo,
    autocast_dtype,
    build_optimizer,
    engine_dtype,
    init_distributed,
    initialize,
    lost_peer_message,
    lost_peer_reason,
    world_from_env,
)
from vitdeep.engine.ema import PartitionedEma
from vitdeep.engine.evaluate import EvalResult, evaluate
from vitdeep.engine.plan import RunPlan, make_plan
from vitdeep.errors import TrainingStopped, UserError
from vitdeep.losses import Objective
from vitdeep.models import create_model
from vitdeep.models.checkpoints import build_model, load_weights_into, read_weights
from vitdeep.monitor import RunLogger, make_console, progress_bar

#: Model options that change the architecture (a checkpoint must match them to be resumed).
ARCHITECTURE_KEYS = ("depth", "embed_dim", "num_heads", "img_size", "patch_size", "num_classes", "talking_heads", "attnscale", "featscale", "init_values", "patch_head", "distilled")


def check_resume_compatible(marker: dict[str, Any], plan: RunPlan, path: Path) -> None:
    """A checkpoint resumes only into the same architecture, world size and ZeRO stage."""
    cfg = plan.cfg
    if marker["model"] != cfg.model.model:
        raise UserError(f"checkpoint {path} was made for model {marker['model']}; this run builds {cfg.model.model}")
    theirs, ours = marker.get("model_kwargs", {}), plan.model_kwargs
    for key in ARCHITECTURE_KEYS:
        if theirs.get(key) != ours.get(key):
            raise UserError(f"checkpoint {path} has {key}={theirs.get(key)}; this run has {key}={ours.get(key)}")
    if marker["world_size"] != plan.world_size or marker["zero_stage"] != plan.zero_stage:
        raise UserError(
            f"checkpoint {path} was written by {marker['world_size']} ranks with ZeRO-{marker['zero_stage']}; this run has "
            f"{plan.world_size} ranks with ZeRO-{plan.zero_stage} (to change either, start a new run from it with `vitdeep finetune --from`)"
        )


def freeze_blocks(model: torch.nn.Module, count: int) -> None:
    """Freeze the embeddings and the first `count` blocks (no gradients, not in the optimizer)."""
    if count <= 0:
        return
    frozen = [model.patch_embed, *model.blocks[:count]]
    for module in frozen:
        module.requires_grad_(False)
    for name in ("cls_token", "dist_token", "pos_embed"):
        if getattr(model, name, None) is not None:
            getattr(model, name).requires_grad_(False)


def load_teacher(spec: str | None, plan: RunPlan, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The distillation teacher in eval mode: a vitdeep checkpoint / export, `TIMM_NAME=FILE`, or a
    timm name (timm fetches its pretrained weights)."""
    import timm

    if not spec:
        raise UserError("--distill needs a --teacher")
    if Path(spec).exists():
        teacher, _ = build_model(read_weights(spec), img_size=plan.cfg.model.img_size)
    else:
        name, _, file = spec.partition("=")
        if name not in timm.list_models(pretrained=False):
            raise UserError(f"teacher '{spec}' is neither a file nor a timm model name")
        if file and not Path(file).is_file():
            raise UserError(f"teacher weights not found: {file}")
        overlay = {"file": file, "num_classes": plan.num_classes} if file else None
        teacher = timm.create_model(name, pretrained=True, num_classes=plan.num_classes, pretrained_cfg_overlay=overlay)
    if getattr(teacher, "num_classes", plan.num_classes) != plan.num_classes:
        raise UserError(f"teacher predicts {teacher.num_classes} classes; the data has {plan.num_classes}")
    return teacher.to(device=device, dtype=dtype).eval().requires_grad_(False)


#: Options that shape the training data stream: with other values a resumed run goes on from the
#: same position in the epoch, but not with exactly the samples the interrupted run would have seen.
STREAM_KEYS = (("data", "workers"), ("optim", "micro_batch"), ("augment", "repeated_aug"), ("run", "seed"))


def stream_changes(marker: dict[str, Any], plan: RunPlan) -> list[str]:
    saved, now = marker.get("config", {}), plan.cfg.to_dict()
    return [
        f"{name}={saved.get(section, {}).get(name)} → {now[section][name]}"
        for section, name in STREAM_KEYS
        if saved.get(section, {}).get(name) != now[section][name]
    ]


class Trainer:
    """Owns the engine, the EMA, the objective and the data position of one run."""

    def __init__(self, plan: RunPlan, dist_info: DistInfo) -> None:
        self.plan, self.cfg, self.dist = plan, plan.cfg, dist_info
        cfg = self.cfg
        self.out = Path(cfg.run.out)
        self.device = dist_info.device
        self.dtype = engine_dtype(plan.ds_config)
        self.autocast_dtype = autocast_dtype(plan.ds_config)
        self.objective = Objective(cfg.loss)

        self.console = make_console()
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = create_model(cfg.model.model, **plan.model_kwargs)
        if plan.init_weights is not None:
            for line in load_weights_into(model, plan.init_weights).lines():
                self.console.print(line)
        freeze_blocks(model, cfg.optim.freeze_blocks)
        if cfg.model.grad_checkpointing:
            model.set_grad_checkpointing()
        self.teacher = load_teacher(cfg.run.teacher, plan, self.device, self.dtype) if self.objective.needs_teacher else None
        optimizer = build_optimizer(model, cfg.optim.weight_decay, cfg.optim.layer_decay, plan.schedule.lr_at(0))
        self.engine = initialize(model, optimizer, plan.ds_config)
        if cfg.model.compile:
            self.engine.compile()
        self.ema = PartitionedEma(self.engine, cfg.optim.ema_decay, cfg.optim.ema_warmup) if cfg.optim.ema_decay > 0 else None
        self._seed_rank_rngs()

        mix = dataclasses.replace(cfg.mix, patch_aligned=cfg.mix.patch_aligned or self.objective.needs_patch_head)
        self.mixer = build_mixer(mix, plan.num_classes, cfg.model.img_size, cfg.model.patch_size, cfg.loss.label_smoothing)
        self.preprocess = BatchPreprocessor(cfg.augment, self.device, self.dtype)
        self.logger = RunLogger(self.out)

        self.step = self.epoch = self.batch_in_epoch = 0
        self.bad_in_a_row = self.skipped_steps = 0
        self.lr = plan.schedule.lr_at(0)
        self.last_val: dict[str, float] = {}
        self._saved_step = -1
        self._probe_images: torch.Tensor | None = None
        self._reset_window()

    # -- set-up -------------------------------------------------------------------------------

    def _seed_rank_rngs(self) -> None:
        """Different (but reproducible) augmentation / drop-path randomness on each rank."""
        seed = self.cfg.run.seed + 1000 * self.dist.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def resume(self, path: Path) -> None:
        marker, extra = load_checkpoint(self.engine, path, self.dist.rank)
        self.step, self.epoch, self.batch_in_epoch = marker["step"], marker["epoch"], marker["batch_in_epoch"]
        self.last_val = marker.get("val", {})
        if self.batch_in_epoch >= self.plan.micro_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if self.ema is not None and extra.get("ema") is not None:
            self.ema.load_state_dict(extra["ema"])
        set_rng_state(extra["rng"])
        self.console.print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        changes = stream_changes(marker, self.plan)
        if changes:
            self.console.print(f"[yellow]note: {', '.join(changes)} since the checkpoint: the data stream goes on from the "
                               "same position but not with exactly the samples of the interrupted run")

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to the planned step count; the logs are flushed however the run ends."""
        try:
            return self._fit()
        finally:
            self.logger.close()

    def _fit(self) -> dict[str, Any]:
        plan = self.plan
        start = time.perf_counter()
        with progress_bar() as progress:
            task = progress.add_task("train", total=plan.total_steps, completed=self.step, info="")
            self._progress = (progress, task)
            while self.step < plan.total_steps:
                self._train_epoch()
                if self.batch_in_epoch >= plan.micro_per_epoch:
                    self._end_epoch()
        if self._saved_step != self.step:
            self.save()
        result = {"steps": self.step, "skipped_steps": self.skipped_steps, "seconds": time.perf_counter() - start, **self.last_val}
        if self.dist.is_main:
            write_json_atomic(self.out / "summary.json", result)
        return result

    def _train_epoch(self) -> None:
        cfg, plan = self.cfg, self.plan
        loader = train_loader(
            plan.train_info,
            micro_batch=plan.batch.micro_batch,
            img_size=cfg.model.img_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            seed=cfg.run.seed,
            epoch=self.epoch,
            num_workers=cfg.data.workers,
            aug=cfg.augment,
            start_batch=self.batch_in_epoch,
            max_bad_fraction=cfg.data.max_bad_fraction,
            num_classes=plan.num_classes,
            pin_memory=self.device.type == "cuda",
        )
        for images, labels in loader:
            if self.batch_in_epoch >= plan.micro_per_epoch or self.step >= plan.total_steps:
                break
            if self._probe_images is None:
                self._probe_images = images[:16].clone()
            stepped = self._train_micro_batch(images, labels)
            self.batch_in_epoch += 1
            if stepped:
                self._after_step()

    def _train_micro_batch(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """Forward, loss, guard, backward, step; True when an optimizer step was taken."""
        x = self.preprocess(images.to(self.device, non_blocking=True), train=True)
        labels = labels.to(self.device, non_blocking=True)
        targets, patch_labels = labels, None
        if self.mixer is not None:
            mixed = self.mixer(x, labels)
            x, targets, patch_labels = mixed.images, mixed.targets, mixed.patch_labels
        out = self.engine(x, aux=True)
        teacher_logits = self._teacher_logits(x)
        loss, terms = self.objective(out, targets, patch_labels=patch_labels, teacher_logits=teacher_logits)
        if not self._finite_on_all_ranks(loss):
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            self.console.print(f"[yellow]non-finite loss at step {self.step}: micro-batch skipped ({self.bad_in_a_row} in a row)")
            if self.bad_in_a_row >= self.cfg.run.max_bad_steps:
                raise TrainingStopped(
                    f"{self.bad_in_a_row} non-finite losses in a row at step {self.step}; stopped. The last good checkpoint "
                    f"(step {self._saved_step}) is untouched; lower --lr or enable --clip-grad and resume from it"
                )
            return False
        self.bad_in_a_row = 0
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            self.lr = self.plan.schedule.apply(self.engine.optimizer, self.step)
        self.engine.step()
        self._accumulate(loss, terms, images.shape[0])
        return boundary

    @torch.no_grad()
    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with self._autocast():
            return self.teacher(x).float()

    def _autocast(self):
        """The engine's forward precision for the passes that bypass `engine(x)` (teacher,
        evaluation, probes): under `torch_autocast` the weights stay fp32 and autocast does the rest."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _finite_on_all_ranks(self, loss: torch.Tensor) -> bool:
        """The step's one host sync: every rank learns whether any rank's loss is non-finite."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.dist.world_size > 1:
            dist.all_reduce(bad)
        return bad.item() == 0

    def _after_step(self) -> None:
        self.step += 1
        if self.ema is not None:
            self.ema.update()
        run = self.cfg.run
        if self.step % run.log_every == 0 or self.step == self.plan.total_steps:
            self._log_window()
        if run.oversmoothing_every and self.step % run.oversmoothing_every == 0:
            self._log_oversmoothing()
        if self.step % run.save_every == 0:
            self.save()
        progress, task = self._progress
        progress.update(task, completed=self.step)

    def _end_epoch(self) -> None:
        if self.plan.val_info is not None:
            self.last_val = self.validate()
            self.logger.scalars(self.step, self.last_val, kind="val")
            self.console.print(f"epoch {self.epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in self.last_val.items()))
            self.save()
        self.epoch += 1
        self.batch_in_epoch = 0

    # -- evaluation, logging, checkpoints ----------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Top-1 / top-5 of the model (and of its EMA) on the validation shards."""
        results = {}
        variants = [("", None)] + ([("ema_", self.ema)] if self.ema is not None else [])
        for prefix, ema in variants:
            result = self._evaluate_once(ema)
            results.update({f"{prefix}{k}": v for k, v in result.scalars().items() if k != "count"})
        return results

    def _evaluate_once(self, ema: PartitionedEma | None) -> EvalResult:
        cfg = self.cfg
        loader = eval_loader(
            self.plan.val_info,
            micro_batch=self.plan.batch.micro_batch,
            img_size=cfg.model.img_size,
            crop_ratio=cfg.augment.crop_ratio,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=cfg.data.workers,
            max_bad_fraction=cfg.data.max_bad_fraction,
            num_classes=self.plan.num_classes,
            pin_memory=self.device.type == "cuda",
        )
        module = self.engine.module
        module.eval()
        try:
            if ema is None:
                return self._run_eval(module, loader)
            with ema.applied():
                return self._run_eval(module, loader)
        finally:
            module.train()

    def _run_eval(self, module, loader) -> EvalResult:
        def forward(images: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return module(images)

        return evaluate(
            forward,
            loader,
            lambda images: self.preprocess(images, train=False),
            self.plan.num_classes,
            self.device,
            img_size=self.cfg.model.img_size,
            lockstep=self.plan.zero_stage == 3,
        )

    def _reset_window(self) -> None:
        self._window_terms: dict[str, torch.Tensor] = {}
        self._window_micro = 0
        self._window_images = 0
        self._window_start = time.perf_counter()

    def _accumulate(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], images: int) -> None:
        """Running sums on the device: reading them waits for the GPU, so only logging does."""
        for name, value in {"loss": loss.detach(), **terms}.items():
            self._window_terms[name] = self._window_terms.get(name, 0.0) + value.double()
        self._window_micro += 1
        self._window_images += images

    def _log_window(self) -> None:
        """Mean of each loss term over the window and all ranks, lr, images/s."""
        names = sorted(self._window_terms)
        values = self._mean_over_ranks(torch.stack([self._window_terms[n] for n in names]) / max(self._window_micro, 1))
        seconds = time.perf_counter() - self._window_start
        scalars = dict(zip(names, values.tolist()))
        scalars.update(lr=self.lr, images_per_s=self._window_images * self.dist.world_size / max(seconds, 1e-9), epoch=self.epoch)
        self.logger.scalars(self.step, scalars)
        info = f"epoch {self.epoch}  " + "  ".join(f"{n} {scalars[n]:.3f}" for n in names)
        info += f"  lr {self.lr:.2e}  {scalars['images_per_s']:.0f} img/s"
        progress, task = self._progress
        progress.update(task, info=info)
        self._reset_window()

    def _log_oversmoothing(self) -> None:
        """Layer-wise CosSim / attention std on a fixed small batch (every rank: ZeRO-3 collectives)."""
        images = self.preprocess(self._probe_images.to(self.device), train=False)
        with self._autocast():
            metrics = oversmoothing_metrics(self.engine.module, images)
        names = sorted(metrics)
        values = self._mean_over_ranks(torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=self.device))
        self.logger.scalars(self.step, dict(zip(names, values.tolist())), kind="oversmoothing")

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.dist.world_size > 1:
            dist.all_reduce(values)
            values = values / self.dist.world_size
        return values

    def save(self) -> None:
        meta = {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "model": self.cfg.model.model,
            "model_kwargs": self.plan.model_kwargs,
            "zero_stage": self.plan.zero_stage,
            "precision": self.plan.precision,
            "config": self.cfg.to_dict(),
            "val": self.last_val,
            "val_top1": self.last_val.get("top1"),
        }
        save_checkpoint(
            self.engine, self.out, rank=self.dist.rank, step=self.step, meta=meta,
            ema_state=self.ema.state_dict() if self.ema is not None else None,
        )
        if self.dist.is_main:
            prune_checkpoints(self.out, self.cfg.run.keep_last)
        self._saved_step = self.step


def train(plan: RunPlan) -> dict[str, Any]:
    """Run a planned training job in this process (one rank of many, or alone)."""
    resume_path = resolve_resume(plan.cfg.run.resume, Path(plan.cfg.run.out))
    if resume_path is not None:
        check_resume_compatible(read_marker(resume_path), plan, resume_path)
    dist_info = init_distributed(plan.cfg.run.dist_timeout)
    out = Path(plan.cfg.run.out)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", {**plan.cfg.to_dict(), "plan": plan.summary()})
    check_shared_output(out, dist_info)
    try:
        trainer = Trainer(plan, dist_info)
        if resume_path is not None:
            trainer.resume(resume_path)
        return trainer.fit()
    except Exception as error:
        reason = lost_peer_reason(error)
        if reason is None:
            raise
        raise TrainingStopped(lost_peer_message(reason, out)) from None


def check_shared_output(out: Path, dist_info: DistInfo) -> None:
    """Every rank must see rank 0's `out` (checkpoints are written by all ranks into one folder);
    a node-local `--out` would split every checkpoint across machines."""
    if dist_info.world_size == 1:
        return
    token = [os.urandom(8).hex() if dist_info.is_main else None]
    dist.broadcast_object_list(token)
    probe = out / ".shared-check"
    if dist_info.is_main:
        probe.write_text(token[0])
    dist.barrier()
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    missing = torch.tensor([0.0 if seen else 1.0], device=dist_info.device)
    dist.all_reduce(missing)
    dist.barrier()
    if dist_info.is_main:
        probe.unlink()
    if missing.item():
        raise UserError(f"--out {out} is not shared by all ranks ({int(missing.item())} cannot see rank 0's files): put it on storage every node mounts at the same path")


def plan_from_env(cfg) -> RunPlan:
    """The plan for this process's world size (set by the launcher; 1 when run alone)."""
    _, world_size, _ = world_from_env()
    return make_plan(cfg, world_size)


def print_plan(plan: RunPlan) -> None:
    """The `--dry-run` output: the resolved run and the DeepSpeed config it would use."""
    from rich.table import Table

    table = Table(title="vitdeep train --dry-run", show_header=False)
    for key, value in plan.summary().items():
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    console = make_console()
    console.print(table)
    console.print("DeepSpeed config:")
    console.print_json(json.dumps(plan.ds_config))
