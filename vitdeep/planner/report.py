"""The verdict of `vitdeep plan`: the memory at the requested settings, the largest micro-batch
that fits, the cheapest change that fits when the run does not, and the time.

The changes are tried cheapest first (`changes_to_try`), each at the largest micro-batch that keeps
the global batch, until one fits.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vitdeep.data.decode_rate import DecodeRate
from vitdeep.engine.deepspeed import fill_ds_config, load_ds_config
from vitdeep.engine.run_plan import RunPlan
from vitdeep.planner.cluster import Cluster
from vitdeep.planner.memory import MemoryEstimate, MemoryModel, Zero, gb, largest_fitting, micro_batch_options
from vitdeep.planner.timing import TimeEstimate, estimate_time


def ds_config_with_zero(plan: RunPlan, bundled: str) -> dict[str, Any]:
    """The run's ds_config with the ZeRO section of a bundled config (e.g. zero3_bf16), its
    "auto" values filled like the run's own."""
    raw = copy.deepcopy(plan.ds_config)
    raw["zero_optimization"] = load_ds_config(bundled)["zero_optimization"]
    options = {"global_batch": plan.batch.global_batch, "micro_batch": plan.batch.micro_batch, "clip_grad": plan.cfg.optim.clip_grad}
    return fill_ds_config(raw, options, frozenset(), plan.world_size, plan.model_stats()[0])[0]


@dataclass
class Option:
    """One way to run: a ds_config and checkpointing, with the largest micro-batch that fits."""

    change: str
    ds_config: dict[str, Any] = field(repr=False)
    grad_checkpointing: bool
    fitting: MemoryEstimate | None = None

    def to_dict(self, global_batch: int, world_size: int) -> dict[str, Any]:
        fit = self.fitting
        return {
            "change": self.change,
            "zero": Zero.from_ds_config(self.ds_config).label,
            "grad_checkpointing": self.grad_checkpointing,
            "largest_micro_batch": fit.micro_batch if fit else None,
            "grad_accum": global_batch // (fit.micro_batch * world_size) if fit else None,
            "GB_per_gpu": round(gb(fit.total), 2) if fit else None,
        }


def changes_to_try(plan: RunPlan) -> list[tuple[str, str | None, bool]]:
    """(change, bundled ZeRO section or None for the run's own, checkpointing), cheapest first:
    a smaller micro-batch costs no FLOPs, checkpointing a third more, ZeRO-3 more communication,
    offload PCIe-bound optimizer steps."""
    zero = Zero.from_ds_config(plan.ds_config)
    ckpt = plan.cfg.model.grad_checkpointing
    changes: list[tuple[str, str | None, bool]] = [("smaller micro-batch", None, ckpt)]
    if not ckpt:
        changes.append(("activation checkpointing", None, True))
    if zero.stage < 3:
        changes += [("ZeRO-3 (zero3_bf16's settings)", "zero3_bf16", ckpt)]
        if not ckpt:
            changes.append(("ZeRO-3 + activation checkpointing", "zero3_bf16", True))
    if not (zero.offload_optimizer and zero.offload_param):
        changes.append(("ZeRO-3 with CPU offload + activation checkpointing (zero3_offload)", "zero3_offload", True))
    return changes


@dataclass
class CapacityReport:
    """Everything `vitdeep plan` prints: the estimate at the requested settings, the verdict, the
    largest micro-batch, the cheapest change that fits (when needed) and the time."""

    plan: RunPlan
    cluster: Cluster
    requested: MemoryEstimate
    largest: MemoryEstimate | None
    options: list[Option]
    time: TimeEstimate
    notes: list[str]

    @property
    def fits(self) -> bool:
        return self.requested.total <= self.cluster.gpu_memory

    @property
    def recommended(self) -> Option | None:
        """The cheapest change that fits (None when the run fits as asked, or nothing tried fits)."""
        return next((option for option in self.options if option.fitting), None)

    def accumulation(self, micro_batch: int) -> int:
        return self.plan.batch.global_batch // (micro_batch * self.cluster.world_size)

    def verdict(self) -> list[str]:
        budget = f"{gb(self.cluster.gpu_memory):.1f} GB"
        need = f"{gb(self.requested.total):.1f} GB"
        lines = [f"fits: {need} of {budget} per GPU" if self.fits else f"does not fit: {need} needed, {budget} per GPU"]
        global_batch = self.plan.batch.global_batch
        if self.largest is not None:
            m = self.largest.micro_batch
            lines.append(f"largest micro-batch that fits at global batch {global_batch}: {m} (gradient accumulation "
                         f"{self.accumulation(m)}, {gb(self.largest.total):.1f} GB)")
        else:
            lines.append(f"no micro-batch fits at global batch {global_batch} with these settings")
        if not self.fits:
            best = self.recommended
            if best is None:
                lines.append("nothing tried fits (smaller micro-batch, checkpointing, ZeRO-3, offload): more GPUs or a smaller model")
            else:
                m = best.fitting.micro_batch
                lines.append(f"cheapest change that fits: {best.change}, micro-batch {m} (gradient accumulation "
                             f"{self.accumulation(m)}), {gb(best.fitting.total):.1f} GB")
        return lines

    def to_dict(self) -> dict[str, Any]:
        plan, cluster = self.plan, self.cluster
        return {
            "model": plan.cfg.model.model,
            "img_size": plan.cfg.model.img_size,
            "parameters": plan.model_stats()[0],
            "num_classes": plan.num_classes,
            "train_samples": plan.train_info.num_samples,
            "cluster": dataclasses.asdict(cluster),
            "world_size": cluster.world_size,
            "global_batch": plan.batch.global_batch,
            "requested": self.requested.to_dict(),
            "fits": self.fits,
            "verdict": self.verdict(),
            "largest_micro_batch": self.largest.micro_batch if self.largest else None,
            "largest_grad_accum": self.accumulation(self.largest.micro_batch) if self.largest else None,
            "largest": self.largest.to_dict() if self.largest else None,
            "changes_tried": [option.to_dict(plan.batch.global_batch, cluster.world_size) for option in self.options],
            "time": self.time.to_dict(),
            "notes": self.notes,
        }


def build_report(plan: RunPlan, cluster: Cluster, notes: list[str] | None = None, decode: DecodeRate | None = None) -> CapacityReport:
    """Price `plan` on `cluster`: the requested settings, the largest micro-batch, and, when the
    run does not fit, the changes of `changes_to_try` in order until one fits (`decode`: the
    per-core decoding rate to price the input pipeline at)."""
    if plan.world_size != cluster.world_size:
        raise ValueError(f"the plan is for {plan.world_size} ranks, the cluster has {cluster.world_size}")
    model = MemoryModel(plan, cluster)
    ckpt = plan.cfg.model.grad_checkpointing
    requested = model.estimate(plan.ds_config, plan.batch.micro_batch, ckpt)
    sizes = micro_batch_options(plan, cluster.world_size)
    largest = largest_fitting(model, plan.ds_config, ckpt, sizes, cluster.gpu_memory)
    options: list[Option] = []
    if requested.total > cluster.gpu_memory:
        for change, bundled, with_ckpt in changes_to_try(plan):
            ds_config = plan.ds_config if bundled is None else ds_config_with_zero(plan, bundled)
            fitting = largest if (bundled is None and with_ckpt == ckpt) else largest_fitting(model, ds_config, with_ckpt, sizes, cluster.gpu_memory)
            options.append(Option(change, ds_config, with_ckpt, fitting))
            if fitting is not None and with_ckpt:
                break  # the cheapest fitting change, and what checkpointing alone buys, are known
    best = next((option for option in options if option.fitting), None)
    time = estimate_time(plan, cluster, best.grad_checkpointing if best else ckpt, decode)
    return CapacityReport(plan, cluster, requested, largest, options, time, list(notes or []))
