"""The training loop, readable in one sitting.

    shards → uint8 batches → device: normalise, random erasing → CutMix / Mixup
        → engine(x, aux=True) → Objective (CE + ℓ_cos + ℓ_cons + ℓ_token + distillation)
        → numerics guard (all ranks agree) → engine.backward / engine.step
        → EMA, logging, over-smoothing metrics, checkpoints, evaluation every --val-every epochs and at the end

Runs the same under `deepspeed`, `torchrun` and a plain single process.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vitdeep.analysis import oversmoothing_metrics
from vitdeep.cores import usable_cores
from vitdeep.data.streams import stream_seed
from vitdeep.data.mixing import build_mixer
from vitdeep.data.pipeline import (
    STOP_SIGNALS,
    BatchPreprocessor,
    StreamReplay,
    TrainBatch,
    bad_data_error,
    eval_loader,
    lane_loader,
    too_many_bad,
    train_loader,
)
from vitdeep.data.seeding import DROP_PATH, uniforms
from vitdeep.data.storage import use_read_policy
from vitdeep.engine.alarm import OversmoothingAlarm
from vitdeep.engine.checkpoint import (
    load_checkpoint,
    prune_checkpoints,
    read_marker,
    save_checkpoint,
    set_rng_state,
    update_marker,
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
from vitdeep.engine.evaluate import EvalResult, counter_over_ranks, evaluate
from vitdeep.engine.input_watch import InputWatch
from vitdeep.engine.run_plan import RunPlan, make_plan
from vitdeep.engine.ledger import SampleLedger, trim_ledgers
from vitdeep.engine.reshard import load_resharded
from vitdeep.engine.rundir import RunLock, clear_run, trim_metrics
from vitdeep.engine.signals import StopFlag, StopRequested, WaitInterrupted, signal_name, stop_flag
from vitdeep.errors import OversmoothingStopped, StoppedBySignal, TrainingStopped, UserError, as_flags
from vitdeep.losses import Objective
from vitdeep.models import create_model
from vitdeep.models.freezing import freeze_blocks
from vitdeep.models.layers import drop_path_layers, sample_drop_paths
from vitdeep.engine.weights import build_model, load_weights_into, read_weights
from vitdeep.monitor import RunLogger, is_main_process, make_console, progress_bar
from vitdeep.paths import write_json_atomic
from vitdeep.ranks import read_ranks
from vitdeep.trackers import open_tracker


def load_teacher(spec: str, plan: RunPlan, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The distillation teacher in eval mode: a vitdeep checkpoint / export, `TIMM_NAME=FILE`, or a
    timm name (timm fetches its pretrained weights); `make_plan` has checked the spec."""
    import timm

    if Path(spec).exists():
        teacher, _ = build_model(read_weights(spec), img_size=plan.cfg.model.img_size)
    else:
        name, _, file = spec.partition("=")
        overlay = {"file": file, "num_classes": plan.num_classes} if file else None
        teacher = timm.create_model(name, pretrained=True, num_classes=plan.num_classes, pretrained_cfg_overlay=overlay)
    if getattr(teacher, "num_classes", plan.num_classes) != plan.num_classes:
        raise UserError(f"teacher predicts {teacher.num_classes} classes; the data has {plan.num_classes}")
    return teacher.to(device=device, dtype=dtype).eval().requires_grad_(False)


#: Options that shape the training data stream: with other values a resumed run goes on from the
#: same position in the epoch, but not with exactly the samples the interrupted run would have seen.
#: In the lane order neither the micro-batch nor the workers matter; in the per-rank order of
#: older runs both do.
STREAM_KEYS = (("optim", "global_batch"), ("augment", "repeated_aug"), ("run", "seed"))
PER_RANK_STREAM_KEYS = (("data", "workers"), ("optim", "micro_batch"), ("augment", "repeated_aug"), ("run", "seed"))


def stream_changes(marker: dict[str, Any], plan: RunPlan) -> list[str]:
    saved, now = marker.get("config", {}), plan.cfg.to_dict()
    keys = STREAM_KEYS if plan.layout is not None else PER_RANK_STREAM_KEYS
    return [
        f"{name}={saved.get(section, {}).get(name)} → {now[section][name]}"
        for section, name in keys
        if saved.get(section, {}).get(name) != now[section][name]
    ]


class Trainer:
    """Owns the engine, the EMA, the objective and the data position of one run."""

    def __init__(self, plan: RunPlan, dist_info: DistInfo, stop: StopFlag, resume_step: int | None = None,
                 replay: StreamReplay | None = None) -> None:
        self.plan, self.cfg, self.dist, self.stop, self.replay = plan, plan.cfg, dist_info, stop, replay
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
        self.alarm = OversmoothingAlarm(cfg.run.oversmoothing_alarm) if cfg.run.oversmoothing_alarm > 0 else None
        self._seed_rank_rngs()

        mix = dataclasses.replace(cfg.mix, patch_aligned=cfg.mix.patch_aligned or self.objective.needs_patch_head)
        self.mixer = build_mixer(mix, plan.num_classes, cfg.model.img_size, cfg.model.patch_size, cfg.loss.label_smoothing)
        self.preprocess = BatchPreprocessor(cfg.augment, self.device, self.dtype)
        self.drop_paths = len(drop_path_layers(self.engine.module))
        self.logger = RunLogger(self.out, purge_step=None if resume_step is None else resume_step + 1,
                                open_tracker=lambda: open_tracker(cfg.run.tracker, self.out, cfg.to_dict(), resumed=resume_step is not None))
        self.ledger = SampleLedger(self.out, dist_info.rank) if cfg.run.sample_ledger and plan.layout is not None else None

        self.step = self.epoch = self.batch_in_epoch = 0
        #: Bad and read samples of this epoch before the loader started (a resumed run's checkpoint has them).
        self.epoch_bad_before = self.epoch_read_before = 0
        self.bad_in_a_row = self.skipped_steps = 0
        self.lr = plan.schedule.lr_at(0)
        self.last_val: dict[str, float] = {}
        self._saved_step = self._validated_step = -1
        self._saved_path: Path | None = None
        self._micro_in_step = 0
        self._loader = None
        self._probe_images: torch.Tensor | None = None
        self.input_watch = InputWatch(read_ranks().local_world_size or 1, usable_cores(), cfg.augment.reduced_decode)
        self._reset_window()

    # -- set-up -------------------------------------------------------------------------------

    def _seed_rank_rngs(self, step: int = 0) -> None:
        """Different (but reproducible) random streams on each rank for what is not drawn per
        sample: dropout, and in runs of the per-rank order augmentation, mixing and drop path."""
        seed = stream_seed(self.cfg.run.seed, self.dist.rank, step) if step else self.cfg.run.seed + 1000 * self.dist.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def resume(self, path: Path) -> None:
        """Continue from an intact checkpoint; one saved by another number of ranks (lane order
        only) is resharded, its data position carried over as steps into the epoch."""
        marker = read_marker(path)
        saved_world = marker["world_size"]
        if saved_world == self.dist.world_size:
            marker, extra = load_checkpoint(self.engine, path, self.dist.rank)
            if self.ema is not None and extra.get("ema") is not None:
                self.ema.load_state_dict(extra["ema"])
            set_rng_state(extra["rng"])
        else:
            self.console.print(f"resharding the ZeRO-{marker['zero_stage']} state of {path.name}, saved by {saved_world} ranks, "
                               f"onto {self.dist.world_size} ranks (micro-batch {self.plan.batch.micro_batch} × "
                               f"{self.plan.batch.grad_accum} accumulation × {self.dist.world_size} ranks = global batch "
                               f"{self.plan.batch.global_batch})")
            start = time.perf_counter()
            load_resharded(self.engine, path, marker, self.ema)
            self._seed_rank_rngs(marker["step"])
            self.console.print(f"resharded in {time.perf_counter() - start:.1f} s")
        self.step, self.epoch = marker["step"], marker["epoch"]
        steps_in_epoch = marker.get("step_in_epoch")
        self.batch_in_epoch = marker["batch_in_epoch"] if steps_in_epoch is None else steps_in_epoch * self.plan.batch.grad_accum
        self.epoch_bad_before, self.epoch_read_before = marker.get("epoch_bad", 0), marker.get("epoch_read", 0)
        self.last_val = marker.get("val", {})
        self._saved_step, self._saved_path = self.step, path
        if marker.get("validated"):
            self._validated_step = self.step
        self.console.print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        changes = stream_changes(marker, self.plan)
        if changes:
            self.console.print(f"[yellow]note: {', '.join(changes)} since the checkpoint: the data stream goes on from the "
                               "same position but not with exactly the samples of the interrupted run")

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to the planned step count; the logs are flushed however the run ends. A stop
        signal ends it at a step boundary with a checkpoint (`StoppedBySignal`)."""
        try:
            return self._fit()
        except StopRequested as request:
            raise StoppedBySignal(self._stop_here(request.number)) from None
        finally:
            self.logger.close(failed=sys.exc_info()[0] is not None)

    def _fit(self) -> dict[str, Any]:
        plan = self.plan
        start = time.perf_counter()
        with progress_bar() as progress:
            task = progress.add_task("train", total=plan.total_steps, completed=self.step, info="")
            self._progress = (progress, task)
            self._started = (start, self.step)
            while True:
                if self.batch_in_epoch >= plan.micro_per_epoch:
                    self._end_epoch()
                if self.step >= plan.total_steps:
                    break
                self._train_epoch()
            if self._validates_now():  # a run that ends mid-epoch (`--steps`) is validated too
                self._validate_and_record()
        if self._saved_step != self.step:
            self.save()
        result = {"steps": self.step, "skipped_steps": self.skipped_steps, "seconds": time.perf_counter() - start, **self.last_val}
        if self.dist.is_main:
            write_json_atomic(self.out / "summary.json", result)
        return result

    def _stop_here(self, number: int) -> str:
        """Save at this step boundary (unless saved already, or nothing was trained) and say how to go on."""
        if self._saved_step != self.step and self.step > 0:
            self.save()
        where = f"checkpoint {self._saved_path}" if self._saved_path else "no checkpoint (nothing trained yet)"
        return f"stopped by {signal_name(number)} at step {self.step}; {where}; resume with --resume auto"

    def _epoch_loader(self):
        """This rank's share of the epoch from the current position: the lane order, or the
        per-rank order of a run resumed from before it."""
        cfg, plan = self.cfg, self.plan
        common = dict(
            img_size=cfg.model.img_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            seed=cfg.run.seed,
            epoch=self.epoch,
            num_workers=cfg.data.workers,
            aug=cfg.augment,
            max_bad_fraction=None,  # judged over all ranks in `_at_step_start`
            num_classes=plan.num_classes,
            pin_memory=self.device.type == "cuda",
        )
        if plan.layout is None:
            return train_loader(plan.train_info, micro_batch=plan.batch.micro_batch, start_batch=self.batch_in_epoch, **common)
        return lane_loader(plan.train_info, layout=plan.layout, micro_batch=plan.batch.micro_batch,
                           shuffle_buffer=plan.shuffle_buffer, start_step=self.batch_in_epoch // plan.batch.grad_accum,
                           replay=self.replay, **common)

    def _train_epoch(self) -> None:
        plan = self.plan
        self._loader = self._epoch_loader()
        batches = iter(self._loader)
        while self.batch_in_epoch < plan.micro_per_epoch and self.step < plan.total_steps:
            at_step_start = self._micro_in_step == 0
            asked = time.perf_counter()
            batch = self._next_batch(batches, interruptible=at_step_start)
            waited = time.perf_counter() - asked
            if at_step_start:
                self._at_step_start()
            if not isinstance(batch, TrainBatch):  # the per-rank order: no per-sample seeds
                batch = TrainBatch(*batch, seeds=None, positions=[], keys=[], substitutes=[], stats=self._loader.stats)
            self._watch_input(waited, len(batch.images))
            if self._probe_images is None:
                self._probe_images = batch.images[:16].clone()
            stepped = self._train_micro_batch(batch.images, batch.labels, batch.seeds)
            if self.ledger is not None:
                self.ledger.add(batch)
            self.batch_in_epoch += 1
            if stepped:
                self._after_step()

    def _watch_input(self, waited: float, images: int) -> None:
        """Warn once, in one line from each node's first rank, when its first micro-batches
        waited for data (`input_watch`)."""
        warning = self.input_watch.waited(waited, images)
        if warning is None or self.dist.local_rank != 0:
            return
        if self.dist.is_main:
            self.console.print(f"[yellow]{warning}", highlight=False)
        else:
            print(f"rank {self.dist.rank}: {warning}", file=sys.stderr, flush=True)

    def _next_batch(self, batches, interruptible: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next micro-batch; at a step boundary a stop signal cuts a wait for data short."""
        if not interruptible:
            return next(batches)
        try:
            with self.stop.interruptible():
                return next(batches)
        except WaitInterrupted:
            return None

    def _at_step_start(self) -> None:
        """The ranks agree, once per optimizer step, on stopping (a signal anywhere) and on the
        bad data read so far this epoch (judged over all of them, so all stop alike)."""
        stats = self._loader.stats
        local = [float(self.stop.number == s) for s in STOP_SIGNALS] + [float(stats.bad_samples), float(stats.read)]
        values = self._sum_over_ranks(torch.tensor(local, dtype=torch.float64, device=self.device)).tolist()
        signalled = [s for s, count in zip(STOP_SIGNALS, values) if count]
        if signalled:
            raise StopRequested(signalled[0])
        bad, read = self.epoch_bad_before + values[-2], self.epoch_read_before + values[-1]
        if too_many_bad(bad, read, self.cfg.data.max_bad_fraction):
            counts = counter_over_ranks(stats.bad)
            raise bad_data_error(counts, int(read), self.cfg.data.max_bad_fraction, shared=True)

    def _train_micro_batch(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None) -> bool:
        """Forward, loss, guard, backward, step; True when an optimizer step was taken. With the
        samples' `seeds`, erasing, mixing and drop path are drawn per sample (per pair for mixing)."""
        with self._per_sample_drop_path(seeds):
            return self._forward_backward_step(images, labels, seeds)

    def _per_sample_drop_path(self, seeds: torch.Tensor | None):
        if seeds is None or not self.drop_paths:
            return nullcontext()
        draws = torch.from_numpy(uniforms(seeds, DROP_PATH, self.drop_paths)).to(self.device, torch.float32)
        return sample_drop_paths(self.engine.module, draws)

    def _forward_backward_step(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None) -> bool:
        x = self.preprocess(images.to(self.device, non_blocking=True), train=True, seeds=seeds)
        labels = labels.to(self.device, non_blocking=True)
        targets, patch_labels, patch_soft = labels, None, None
        if self.mixer is not None:
            mixed = self.mixer(x, labels, seeds)
            x, targets, patch_labels, patch_soft = mixed.images, mixed.targets, mixed.patch_labels, mixed.patch_soft
        out = self.engine(x, aux=True)
        teacher_logits = self._teacher_logits(x)
        loss, terms = self.objective(out, targets, patch_labels=patch_labels, teacher_logits=teacher_logits, patch_soft=patch_soft)
        if not self._finite_on_all_ranks(loss):
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            self.console.print(f"[yellow]non-finite loss at step {self.step}: micro-batch skipped ({self.bad_in_a_row} in a row)")
            if self.bad_in_a_row >= self.cfg.run.max_bad_steps:
                kept = (f"The last good checkpoint (step {self._saved_step}) is untouched; lower --lr or enable "
                        f"--clip-grad and resume from it") if self._saved_path else "No checkpoint was saved yet; lower --lr or enable --clip-grad"
                raise TrainingStopped(f"{self.bad_in_a_row} non-finite losses in a row at step {self.step}; stopped. {kept}", shared=True)
            return False
        self.bad_in_a_row = 0
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            self.lr = self.plan.schedule.apply(self.engine.optimizer, self.step)
        self.engine.step()
        self._micro_in_step = 0 if boundary else self._micro_in_step + 1
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
        """The micro-step's one host sync: every rank learns whether any rank's loss is non-finite."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        return self._sum_over_ranks(bad).item() == 0

    def _after_step(self) -> None:
        self.step += 1
        if self.ledger is not None:
            self.ledger.write_step(self.step, self.epoch)
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

    def _validates_now(self) -> bool:
        """At the end of every `val_every`-th epoch and of the last one (0: the last one only)."""
        if self.plan.val_info is None or self._validated_step == self.step:
            return False
        every = self.cfg.run.val_every
        return self.step >= self.plan.total_steps or (every > 0 and (self.epoch + 1) % every == 0)

    def _end_epoch(self) -> None:
        if self._validates_now():
            self._validate_and_record()
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_bad_before = self.epoch_read_before = 0
        self._loader = None

    def _validate_and_record(self) -> None:
        """Save, then validate: a validation that fails (bad data) or is stopped loses no training."""
        if self._saved_step != self.step:
            self.save()
        self.last_val = self.validate()
        self._validated_step = self.step
        self.logger.scalars(self.step, self.last_val, kind="val")
        self.console.print(f"epoch {self.epoch} (step {self.step}): " + ", ".join(f"{k} {v:.2f}" for k, v in self.last_val.items()))
        if self.dist.is_main:
            update_marker(self._saved_path, val=self.last_val, val_top1=self.last_val.get("top1"), validated=True)
            prune_checkpoints(self.out, self.cfg.run.keep_last)

    def _epoch_counts(self) -> tuple[int, int]:
        """(bad, read) samples of this epoch so far over all ranks (a collective)."""
        stats = self._loader.stats if self._loader is not None else None
        local = [float(stats.bad_samples), float(stats.read)] if stats is not None else [0.0, 0.0]
        bad, read = self._sum_over_ranks(torch.tensor(local, dtype=torch.float64, device=self.device)).tolist()
        return self.epoch_bad_before + int(bad), self.epoch_read_before + int(read)

    # -- evaluation, logging, checkpoints ----------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Top-1 / top-5 of the model (and of its EMA) on the validation shards. Too much bad
        validation data is reported, not fatal: the results cover what could be read."""
        results = {}
        variants = [("", None)] + ([("ema_", self.ema)] if self.ema is not None else [])
        for prefix, ema in variants:
            result = self._evaluate_once(ema, log_bad=not prefix)
            results.update({f"{prefix}{k}": v for k, v in result.scalars().items() if k != "count"})
            error = result.bad_data_error(self.cfg.data.max_bad_fraction)
            if error is not None and not prefix:
                self.console.print(f"[yellow]validation at step {self.step}: {as_flags(error)}; the results cover the samples read")
        return results

    def _evaluate_once(self, ema: PartitionedEma | None, log_bad: bool) -> EvalResult:
        cfg = self.cfg
        loader = eval_loader(
            self.plan.val_info,
            micro_batch=self.plan.batch.micro_batch,
            img_size=cfg.model.img_size,
            crop_ratio=cfg.augment.crop_ratio,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=cfg.data.workers,
            max_bad_fraction=None,  # judged over all ranks by `validate`
            num_classes=self.plan.num_classes,
            pin_memory=self.device.type == "cuda",
            log_bad=log_bad,
            reduced_decode=cfg.augment.eval_reduced_decode,
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
            stop=self.stop,
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
        values = self._sum_over_ranks(torch.stack([self._window_terms[n] for n in names]) / max(self._window_micro, 1))
        values = values / self.dist.world_size
        seconds = time.perf_counter() - self._window_start
        scalars = dict(zip(names, values.tolist()))
        scalars.update(lr=self.lr, images_per_s=self._window_images * self.dist.world_size / max(seconds, 1e-9), epoch=self.epoch)
        self.logger.scalars(self.step, scalars)
        info = f"epoch {self.epoch}  " + "  ".join(f"{n} {scalars[n]:.3f}" for n in names)
        info += f"  lr {self.lr:.2e}  {scalars['images_per_s']:.0f} img/s"
        progress, task = self._progress
        progress.update(task, info=info)
        if not progress.console.is_terminal:  # a log file (Slurm, nohup, CI): the bar is drawn only at the end
            self.console.print(self._log_line(info), markup=False, highlight=False)
        self._reset_window()

    def _log_line(self, info: str) -> str:
        """`step 46/690 (7%)  epoch 1  ce 2.301 …  lr 5.00e-03  492 img/s  ETA 0:01:20`, for logs."""
        total = self.plan.total_steps
        start, first_step = self._started
        done = self.step - first_step
        eta = (time.perf_counter() - start) / done * (total - self.step) if done > 0 else None
        shown = str(datetime.timedelta(seconds=round(eta))) if eta is not None else "-:--:--"
        return f"step {self.step}/{total} ({100 * self.step // total}%)  {info}  ETA {shown}"

    def _log_oversmoothing(self) -> None:
        """Layer-wise CosSim / attention std on a fixed small batch (every rank: ZeRO-3 collectives)."""
        images = self.preprocess(self._probe_images.to(self.device), train=False)
        with self._autocast():
            metrics = oversmoothing_metrics(self.engine.module, images)
        names = sorted(metrics)
        values = self._sum_over_ranks(torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=self.device))
        measured = dict(zip(names, (values / self.dist.world_size).tolist()))
        self.logger.scalars(self.step, measured, kind="oversmoothing")
        if self.alarm is not None:
            self._sound_alarm(self.alarm.observe(measured["cossim/last"]))

    def _sound_alarm(self, reason: str | None) -> None:
        """A warning line, an `alarm` row and a TensorBoard text when the alarm fires; with
        `--oversmoothing-action stop`, a checkpoint and then `OversmoothingStopped`. Every rank
        sees the same all-reduced CosSim, so every rank decides alike."""
        if reason is None:
            return
        stop = self.cfg.run.oversmoothing_action == "stop"
        message = f"over-smoothing alarm at step {self.step}: {reason}"
        self.console.print(f"[yellow]{message}" + ("; stopping" if stop else ""), highlight=False)
        self.logger.event(self.step, "alarm", message, {"cossim_last": self.alarm.history[-1], "threshold": self.alarm.threshold,
                                                        "action": self.cfg.run.oversmoothing_action})
        if stop:
            if self._saved_step != self.step:
                self.save()
            raise OversmoothingStopped(f"{message}; stopped with a checkpoint at step {self.step} in {self.cfg.run.out}", shared=True)

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.dist.world_size > 1:
            dist.all_reduce(values)
        return values

    def save(self) -> None:
        epoch_bad, epoch_read = self._epoch_counts()
        meta = {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step_in_epoch": self.batch_in_epoch // self.plan.batch.grad_accum,
            "epoch_bad": epoch_bad,
            "epoch_read": epoch_read,
            "model": self.cfg.model.model,
            "model_kwargs": self.plan.model_kwargs,
            "zero_stage": self.plan.zero_stage,
            "precision": self.plan.precision,
            "config": self.cfg.to_dict(),
            "val": self.last_val,
            "val_top1": self.last_val.get("top1"),
            "validated": self._validated_step == self.step,
        }
        if self.plan.layout is not None:
            meta["stream"] = self.plan.stream_info()
        self._saved_path = save_checkpoint(
            self.engine, self.out, rank=self.dist.rank, step=self.step, meta=meta,
            ema_state=self.ema.state_dict() if self.ema is not None else None,
        )
        if self.dist.is_main:
            prune_checkpoints(self.out, self.cfg.run.keep_last)
        self._saved_step = self.step


def train(plan: RunPlan, replay: StreamReplay | None = None) -> dict[str, Any]:
    """Run a planned training job in this process (one rank of many, or alone).

    Before anything is written (`make_plan` has checked every option and found the checkpoint to
    resume), the process group is formed and rank 0 takes `--out`'s lock; then `--overwrite`
    clears the old run, or a resume trims the old run's logs past its checkpoint. `replay` is
    shared by the runs of one process that read the same training stream (a grid's cells).
    """
    out = Path(plan.cfg.run.out)
    console = make_console()
    for skipped in plan.resume_skipped:
        console.print(f"[yellow]skipped checkpoint {skipped}")
    for note in plan.notes:
        console.print(f"[yellow]{note}")
    resume_path, resume_step = plan.resume_path, plan.resume_step
    if resume_step is not None and resume_step >= plan.total_steps and _finished(plan, resume_path):
        console.print(f"the run in {out} is complete: {resume_path.name} is step {resume_step} of {plan.total_steps}"
                      f"{', validated' if plan.val_info is not None else ''}; nothing to train (more steps: raise "
                      "--steps or --epochs)")
        return {"steps": resume_step, **read_marker(resume_path).get("val", {})}
    with stop_flag(announce=is_main_process()) as stop:
        dist_info = init_distributed(plan.cfg.run.dist_timeout)
        lock = RunLock(out)
        try:
            _claim_output(plan, dist_info, lock, console, resume_step)
            check_shared_output(out, dist_info)
            trainer = Trainer(plan, dist_info, stop, resume_step, replay)
            console.print(start_line(plan, dist_info), markup=False, highlight=False, soft_wrap=True)
            if resume_path is not None:
                trainer.resume(resume_path)
            result = trainer.fit()
            trainer.engine.destroy()  # its hooks, buffers and gc settings go with it: the process may train another run
            return result
        except Exception as error:
            reason = lost_peer_reason(error)
            if reason is None:
                raise
            raise TrainingStopped(lost_peer_message(reason, out)) from None
        finally:
            lock.release()


def start_line(plan: RunPlan, dist_info: DistInfo) -> str:
    """One line saying how the run is set up on this machine, the choices made for it included
    (CPU threads and loader workers per rank), so a log shows them before the first step."""
    batch = plan.batch
    threads = torch.get_num_threads()
    return (f"training {plan.cfg.model.model} ({plan.model_stats()[0] / 1e6:.1f} M parameters) on {dist_info.world_size} "
            f"rank(s) ({dist_info.device.type}), ZeRO-{plan.zero_stage} {plan.precision}; global batch {batch.global_batch} = "
            f"micro-batch {batch.micro_batch} × {batch.grad_accum} accumulation × {dist_info.world_size} ranks; "
            f"{plan.total_steps} steps; per rank {threads} CPU thread{'s' if threads != 1 else ''} (of {usable_cores()} "
            f"usable cores) and {plan.cfg.data.workers} loader worker{'s' if plan.cfg.data.workers != 1 else ''}")


def _finished(plan: RunPlan, checkpoint: Path) -> bool:
    """Whether a checkpoint at the run's last step leaves nothing to do (its validation, when the
    run has one, done too: a run saved before it was validated goes on to validate)."""
    return plan.val_info is None or bool(read_marker(checkpoint).get("validated"))


def _claim_output(plan: RunPlan, dist_info: DistInfo, lock: RunLock, console, resume_step: int | None) -> None:
    """Rank 0 locks `--out` (all ranks learn whether it could) and prepares it: `--overwrite`
    clears the old run, a resume drops log rows past its checkpoint; then `config.json`."""
    cfg = plan.cfg
    out = Path(cfg.run.out)
    refused = None
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            note = lock.acquire()
        except UserError as error:
            refused = str(error)
        else:
            if note:
                console.print(f"[yellow]{note}")
    if dist_info.world_size > 1:
        box = [refused]
        dist.broadcast_object_list(box)
        refused = box[0]
    if refused:
        raise UserError(refused, shared=True)
    if dist_info.is_main:
        if cfg.run.overwrite:
            clear_run(out)
        elif cfg.run.resume is not None:
            trim_metrics(out, resume_step or 0)
            trim_ledgers(out, resume_step or 0)
        write_json_atomic(out / "config.json", {**cfg.to_dict(), "plan": plan.summary()})


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
        raise UserError(f"`out` {out} is not shared by all ranks ({int(missing.item())} cannot see rank 0's files): put it on storage "
                        "every node mounts at the same path", params=("out",))


def plan_from_env(cfg) -> RunPlan:
    """The plan for this process's world size (set by the launcher; 1 when run alone); every read
    from here on (the shards' `_info.json`, the loaders) uses the run's timeouts and retries."""
    use_read_policy(cfg.data.read_policy())
    _, world_size, _ = world_from_env()
    return make_plan(cfg, world_size)
