"""Will a run fit, and how long will it take: the planner behind `vitdeep plan`.

Not to be confused with `plan.py`, the *run plan* (batches, schedule, ds_config resolved from the
config): this module takes a run plan and prices it on a cluster, per GPU.

Memory per GPU = model states + EMA + the peak of one micro-step on top of them + an allowance:

- **Model states**, held between optimizer steps, per ZeRO stage and precision, as DeepSpeed 0.19
  allocates them around vitdeep's client AdamW (Ψ = parameters, N = data-parallel ranks, b = 2
  bytes for bf16 / fp16 and 4 for fp32): parameters bΨ (ZeRO-3: bΨ/N plus the full copies of
  parameters under `stage3_param_persistence_threshold`), fp32 master weights 4Ψ (none in fp32
  without ZeRO, where the parameters are the masters; 4Ψ/N with ZeRO), AdamW's two moments 8Ψ
  (8Ψ/N with ZeRO), and ZeRO-3's persistent gradient partition bΨ/N and reduction bucket.
  DeepSpeed's own ZeRO-2 estimate (`estimate_zero2_model_states_mem_needs*`), 2Ψ + 18Ψ/N, is
  these states plus the bf16 gradient partition and its fp32 copy, which exist only from backward
  through the optimizer step (here in the micro-step lines). Its ZeRO-3 estimate, 4 × the largest
  layer + 18Ψ/N, leaves out the bf16 parameter partition (2Ψ/N) and stands its largest-layer term
  for what vitdeep counts as persistent parameters, the reduction bucket and (in the micro-step)
  the gathered parameters. tests/test_capacity.py checks both identities.
- **EMA**: vitdeep keeps it over each rank's fp32 master partition (`ema.py`): 4Ψ/N, 4Ψ without
  ZeRO, nothing on the GPU when the optimizer is offloaded.
- **One micro-step** above the states: activations of forward + backward traced on fake tensors
  through the real model and `Objective` (`memtrace.py`), with the gradients in flight and
  DeepSpeed's reduction buckets / gathered ZeRO-3 parameters on the same timeline, then the
  optimizer step's own temporaries (the fp32 gradient partition; the fused AdamW makes none).
- **Framework allowance**: CUDA context, cuBLAS / cuDNN workspaces and NCCL buffers (a fixed
  `FRAMEWORK_BYTES`), plus `FRAGMENTATION` of the tensor peak for the caching allocator's
  fragmentation. Neither is a tensor, so neither is traced; the constants are stated, not measured.

Time: training FLOPs per image = 3 × the forward FLOPs `vitdeep models` counts (backward costs
twice the forward), 4 × with activation checkpointing (the forward runs again in backward), at
`--mfu` of `--gpu-tflops`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from vitdeep.data.decode_rate import DecodeRate, committed_decode_rate
from vitdeep.engine.cluster import Cluster
from vitdeep.engine.deepspeed import fill_ds_config, load_ds_config
from vitdeep.engine.memtrace import GradientPath, StepMemory, StepTracer
from vitdeep.engine.plan import RunPlan
from vitdeep.errors import UserError
from vitdeep.losses import Objective
from vitdeep.models import create_model
from vitdeep.models.freezing import freeze_blocks

#: CUDA context + cuBLAS / cuDNN workspaces + NCCL communicator buffers on one GPU: about 0.6 GB
#: for the context and workspaces of torch 2.x on an H100, NCCL up to 1 GB across many peers.
FRAMEWORK_BYTES = int(1.5e9)
#: The caching allocator reserves more than the live tensors (blocks split and cached): 5-15 %
#: in long training runs, hence 10 % of the tensor peak.
FRAGMENTATION = 0.10
#: Training FLOPs per forward FLOP: forward + backward (twice the forward), + the recomputed
#: forward under activation checkpointing.
TRAIN_FLOPS_FACTOR = {False: 3, True: 4}
#: DeepSpeed's engine all-reduces gradients without ZeRO in flattened chunks of this many elements
#: (`MEMORY_OPT_ALLREDUCE_SIZE`).
ALLREDUCE_CHUNK = 500_000_000


def gb(nbytes: float) -> float:
    return nbytes / 1e9


@dataclass(frozen=True)
class Zero:
    """The memory-relevant part of a ds_config, DeepSpeed's defaults filled in by its own parser."""

    stage: int
    precision: str
    overlap_comm: bool
    contiguous_gradients: bool
    reduce_bucket_size: int
    prefetch_bucket_size: int
    persistence_threshold: int
    max_live_parameters: int
    offload_optimizer: bool
    offload_param: bool

    @classmethod
    def from_ds_config(cls, ds_config: dict[str, Any]) -> "Zero":
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError

        from vitdeep.engine.deepspeed import precision

        try:
            z = DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))
        except (ValidationError, TypeError) as error:
            raise UserError(f"ds-config zero_optimization cannot be planned: {str(error).splitlines()[0]}") from None

        def offloaded(section: Any) -> bool:
            return section is not None and str(getattr(section.device, "value", section.device)) not in ("none", "None")

        return cls(
            stage=int(z.stage),
            precision=precision(ds_config),
            overlap_comm=bool(z.overlap_comm),
            contiguous_gradients=bool(z.contiguous_gradients),
            reduce_bucket_size=int(z.reduce_bucket_size),
            prefetch_bucket_size=int(z.prefetch_bucket_size),
            persistence_threshold=int(z.param_persistence_threshold),
            max_live_parameters=int(z.max_live_parameters),
            offload_optimizer=offloaded(z.offload_optimizer),
            offload_param=offloaded(z.offload_param),
        )

    @property
    def bytes_per_param(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def label(self) -> str:
        offloaded = [name for name, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_param)) if on]
        return f"ZeRO-{self.stage} {self.precision}" + (f", {' and '.join(offloaded)} offloaded" if offloaded else "")


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts that decide the model states (numbers of elements)."""

    total: int
    trainable: int
    #: ZeRO-3: elements of this rank's partition (each tensor split in N, rounded up)
    partition: int
    #: ZeRO-3: elements of the parameters small enough to stay gathered (persistent)
    persistent: int

    @classmethod
    def of(cls, blueprint: torch.nn.Module, zero: Zero, world_size: int) -> "ParamCounts":
        """Counts of `blueprint` (frozen parameters marked)."""
        params = list(blueprint.parameters())
        trainable = [p for p in params if p.requires_grad]
        return cls(
            total=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in trainable),
            partition=sum(math.ceil(p.numel() / world_size) for p in params),
            persistent=sum(p.numel() for p in params if p.numel() <= zero.persistence_threshold),
        )


@dataclass(frozen=True)
class Line:
    """One line of the memory breakdown (bytes per GPU)."""

    name: str
    nbytes: int
    note: str = ""


def model_state_lines(counts: ParamCounts, zero: Zero, world_size: int, accumulating: bool = False) -> list[Line]:
    """Parameters, gradients, optimizer state and fp32 masters held between optimizer steps
    (`accumulating`: between the micro-steps of one optimizer step)."""
    b, n = zero.bytes_per_param, world_size
    psi, total = counts.trainable, counts.total
    lines = []
    if zero.stage == 3:
        on_gpu = 0 if zero.offload_param else b * counts.partition
        lines.append(Line(f"parameters ({zero.precision})", on_gpu + b * counts.persistent,
                          f"1/{n} partition{' (offloaded to CPU)' if zero.offload_param else ''} + {counts.persistent / 1e6:.2f} M persistent parameters gathered"))
        grad_partition = 0 if zero.offload_optimizer else b * math.ceil(psi / n)
        bucket = b * zero.reduce_bucket_size if zero.contiguous_gradients else 0
        lines.append(Line("gradients", grad_partition + bucket,
                          f"{zero.precision} 1/{n} partition + reduction bucket of {zero.reduce_bucket_size / 1e6:.1f} M elements"))
    else:
        lines.append(Line(f"parameters ({zero.precision})", b * total, "full copy on every rank"))
        if accumulating and zero.stage < 2:
            lines.append(Line("gradients", b * psi, f"{zero.precision}, summed in .grad over the accumulation steps"))
        elif accumulating and zero.stage == 2 and not zero.offload_optimizer:
            lines.append(Line("gradients", b * math.ceil(psi / n), f"{zero.precision} 1/{n} partition, summed over the accumulation steps"))
        else:
            lines.append(Line("gradients", 0, "not held between steps (made in backward: see the micro-step line)"))
    partitioned = zero.stage > 0
    share = f"1/{n} partition" if partitioned else "every rank"
    optimizer_on_gpu = not zero.offload_optimizer
    moments = 8 * (math.ceil(psi / n) if partitioned else psi)
    masters = 4 * (math.ceil(psi / n) if partitioned else psi) if (partitioned or zero.precision != "fp32") else 0
    lines.append(Line("optimizer state (AdamW moments, fp32)", moments if optimizer_on_gpu else 0,
                      share if optimizer_on_gpu else "offloaded to CPU"))
    lines.append(Line("fp32 master weights", masters if optimizer_on_gpu else 0,
                      ("the fp32 parameters are the masters" if not masters else share) if optimizer_on_gpu else "offloaded to CPU"))
    return lines


def ema_line(counts: ParamCounts, zero: Zero, world_size: int, ema_decay: float) -> Line:
    """vitdeep's EMA: fp32 copy of this rank's master partition (`ema.py`)."""
    if ema_decay <= 0:
        return Line("EMA", 0, "off (--ema-decay 0)")
    if zero.stage == 0 and zero.precision != "fp32":
        raise UserError(
            f"{zero.label} uses DeepSpeed's fp16/bf16 optimizer without ZeRO, which vitdeep's EMA does not support: "
            "use a ZeRO-1..3 `ds_config`, cpu_fp32, or `ema_decay` 0", params=("ds_config", "ema_decay"),
        )
    if zero.offload_optimizer:
        return Line("EMA", 0, "beside the offloaded fp32 masters, on the CPU")
    elements = math.ceil(counts.trainable / world_size) if zero.stage else counts.trainable
    return Line("EMA", 4 * elements, "fp32, over this rank's master partition" if zero.stage else "fp32, every rank")


def gradient_path(counts: ParamCounts, zero: Zero, world_size: int, accumulating: bool = False) -> GradientPath:
    """DeepSpeed 0.19's gradient handling during backward, per stage (read from its engine and
    ZeRO optimizers, checked against measured steps). `accumulating`: the `.grad` tensors of
    ZeRO-0/1 already exist (a model-state line) and new gradients are summed into them."""
    b, psi = zero.bytes_per_param, counts.trainable
    bucket = min(zero.reduce_bucket_size, psi)
    if zero.stage == 0:
        # the engine all-reduces the .grad tensors after backward, flattened in large chunks
        return GradientPath(keep_grads=not accumulating, bucket_elements=ALLREDUCE_CHUNK, bucket_bytes=b)
    if zero.stage < 3:
        # each gradient is copied into a contiguous bucket (two with overlap_comm) allocated at
        # the first one, and freed; a full bucket is flattened once more, reduced, and its slice
        # kept in this rank's partition until the step (ZeRO-1 does so at the accumulation
        # boundary, summing into .grad before it)
        buffers = (2 if zero.overlap_comm else 1) * b * zero.reduce_bucket_size if zero.contiguous_gradients else 0
        held_partition = zero.offload_optimizer or (accumulating and zero.stage == 2)  # not made by this micro-step
        return GradientPath(keep_grads=False, buckets=buffers, bucket_elements=bucket, bucket_bytes=b, reduce_in_backward=True,
                            partition_grads=0 if held_partition else b * math.ceil(psi / world_size))
    # ZeRO-3 keeps gathered parameters within max_live_parameters (they are re-used in backward)
    # and its prefetch gathers up to one bucket ahead into a flat buffer during forward
    gathered = min(counts.total - counts.persistent, zero.max_live_parameters)
    prefetch = min(zero.prefetch_bucket_size, counts.total - counts.persistent)
    return GradientPath(keep_grads=False, gathered_forward=b * (gathered + prefetch), gathered_backward=b * gathered)


def optimizer_step_bytes(counts: ParamCounts, zero: Zero, world_size: int) -> int:
    """Bytes the optimizer step allocates on top of what backward left (the gradients of ZeRO-0,
    ZeRO-1/2's gradient partition: `StepMemory.after_backward`); the fused AdamW itself none."""
    if zero.offload_optimizer:
        return 0
    return fp32_gradient_bytes(counts, zero, world_size) + reflattened_partition_bytes(counts, zero, world_size)


def fp32_gradient_bytes(counts: ParamCounts, zero: Zero, world_size: int) -> int:
    """The gradients (ZeRO: this rank's partition) cast to fp32 for the fp32 masters."""
    if zero.precision == "fp32":
        return 0
    return 4 * (counts.trainable if zero.stage == 0 else math.ceil(counts.trainable / world_size))


def reflattened_partition_bytes(counts: ParamCounts, zero: Zero, world_size: int) -> int:
    """ZeRO flattens the gradient partition once more, beside the gradients, before casting it
    (measured at b·partition on 2 CPU ranks for ZeRO-1, 2 and 3; DeepSpeed's estimators leave it out)."""
    return 0 if zero.stage == 0 else zero.bytes_per_param * math.ceil(counts.trainable / world_size)


@dataclass
class MemoryEstimate:
    """Per-GPU memory of one configuration at one micro-batch size."""

    zero: Zero
    micro_batch: int
    grad_checkpointing: bool
    states: list[Line]
    ema: Line
    step: StepMemory
    optimizer_step: int

    @property
    def held(self) -> int:
        return sum(line.nbytes for line in self.states) + self.ema.nbytes

    @property
    def tensor_peak(self) -> int:
        return self.held + max(self.step.peak, self.step.after_backward + self.optimizer_step)

    @property
    def framework(self) -> int:
        return FRAMEWORK_BYTES + int(FRAGMENTATION * self.tensor_peak)

    @property
    def total(self) -> int:
        return self.tensor_peak + self.framework

    def lines(self) -> list[Line]:
        checkpointing = "with" if self.grad_checkpointing else "without"
        return [
            *self.states,
            self.ema,
            Line(f"micro-step: forward + backward (micro-batch {self.micro_batch})", self.step.peak,
                 f"activations {checkpointing} checkpointing, gradients in flight, DeepSpeed buckets / gathered parameters (traced)"),
            Line("micro-step: optimizer step", self.step.after_backward + self.optimizer_step,
                 "gradients kept for the step + their fp32 copy (+ ZeRO's re-flattened partition); after backward, not on top of it"),
            Line("framework allowance", self.framework,
                 f"CUDA context, workspaces, NCCL ({gb(FRAMEWORK_BYTES):.1f} GB) + {FRAGMENTATION:.0%} allocator fragmentation"),
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "zero": self.zero.label,
            "micro_batch": self.micro_batch,
            "grad_checkpointing": self.grad_checkpointing,
            "lines": [{"name": line.name, "bytes": line.nbytes, "GB": round(gb(line.nbytes), 3), "note": line.note} for line in self.lines()],
            "model_states_bytes": sum(line.nbytes for line in self.states),
            "held_bytes": self.held,
            "step_phases_bytes": {"forward": self.step.forward, "backward": self.step.backward,
                                  "end of backward": self.step.end, "kept after backward": self.step.after_backward},
            "tensor_peak_bytes": self.tensor_peak,
            "total_bytes": self.total,
        }


class MemoryModel:
    """Prices one run plan on one cluster at any micro-batch size, checkpointing and ds_config;
    the fake model is built once per precision and traced for each configuration asked."""

    def __init__(self, plan: RunPlan, cluster: Cluster) -> None:
        self.plan, self.cluster = plan, cluster
        cfg = plan.cfg
        self.objective = Objective(cfg.loss)
        mix = cfg.mix
        self.soft_targets = mix.enabled
        # Mixup gives the patch head the image's soft target over every patch (the larger loss
        # graph); patch-aligned CutMix alone gives int64 labels per patch
        self.patch_labels = self.objective.needs_patch_head and not (mix.enabled and mix.mixup > 0)
        self._tracers: dict[torch.dtype, StepTracer] = {}
        self._traces: dict[tuple, StepMemory] = {}

    def blueprint(self) -> torch.nn.Module:
        """The run's model on the meta device, frozen blocks marked."""
        with torch.device("meta"):
            model = create_model(self.plan.cfg.model.model, **self.plan.model_kwargs)
        freeze_blocks(model, self.plan.cfg.optim.freeze_blocks)
        return model

    @cached_property
    def _counted(self) -> torch.nn.Module:
        return self.blueprint()

    def estimate(self, ds_config: dict[str, Any], micro_batch: int, grad_checkpointing: bool) -> MemoryEstimate:
        zero = Zero.from_ds_config(ds_config)
        world = self.cluster.world_size
        accumulating = self.plan.batch.global_batch > micro_batch * world
        counts = ParamCounts.of(self._counted, zero, world)
        path = gradient_path(counts, zero, world, accumulating)
        key = (path, zero.precision, micro_batch, grad_checkpointing)
        if key not in self._traces:
            self._traces[key] = self._tracer(zero).trace(micro_batch, grad_checkpointing, path)
        return MemoryEstimate(
            zero=zero,
            micro_batch=micro_batch,
            grad_checkpointing=grad_checkpointing,
            states=model_state_lines(counts, zero, world, accumulating),
            ema=ema_line(counts, zero, world, self.plan.cfg.optim.ema_decay),
            step=self._traces[key],
            optimizer_step=optimizer_step_bytes(counts, zero, world),
        )

    def _tracer(self, zero: Zero) -> StepTracer:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[zero.precision]
        if dtype not in self._tracers:
            self._tracers[dtype] = StepTracer(self.blueprint(), dtype, self.objective, self.soft_targets, self.patch_labels)
        return self._tracers[dtype]


def micro_batch_options(plan: RunPlan, world_size: int) -> list[int]:
    """Micro-batch sizes that keep the requested global batch (global = micro × accumulation ×
    world) and that the data path accepts (even when mixing, a multiple of --repeated-aug)."""
    per_rank, rest = divmod(plan.batch.global_batch, world_size)
    if rest:
        return []
    multiple = plan.cfg.augment.repeated_aug or 1
    if plan.cfg.mix.enabled:
        multiple = math.lcm(multiple, 2)
    return [m for m in range(1, per_rank + 1) if per_rank % m == 0 and m % multiple == 0]


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


def largest_fitting(model: MemoryModel, ds_config: dict[str, Any], grad_checkpointing: bool, options: list[int], budget: int) -> MemoryEstimate | None:
    """The estimate at the largest micro-batch in `options` that fits `budget` (memory grows with
    the micro-batch, so a bisection over the options, after trying the largest)."""
    if not options:
        return None
    top = model.estimate(ds_config, options[-1], grad_checkpointing)
    if top.total <= budget:
        return top
    best, low, high = None, 0, len(options) - 2
    while low <= high:
        middle = (low + high) // 2
        estimate = model.estimate(ds_config, options[middle], grad_checkpointing)
        if estimate.total <= budget:
            best, low = estimate, middle + 1
        else:
            high = middle - 1
    return best


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
class TimeEstimate:
    forward_flops: int
    train_factor: int
    gpu_tflops: float
    mfu: float
    step_seconds: float
    steps_per_epoch: int
    total_steps: int
    images_per_second_node: float
    decode: DecodeRate | None

    @property
    def epoch_seconds(self) -> float:
        return self.steps_per_epoch * self.step_seconds

    @property
    def total_seconds(self) -> float:
        return self.total_steps * self.step_seconds

    def hours_for(self, epochs: int) -> float:
        return epochs * self.epoch_seconds / 3600

    @property
    def cores_per_node(self) -> float | None:
        return self.images_per_second_node / self.decode.per_core if self.decode else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "forward_GFLOPs_per_image": round(self.forward_flops / 1e9, 3),
            "train_flops_factor": self.train_factor,
            "train_GFLOPs_per_image": round(self.train_factor * self.forward_flops / 1e9, 3),
            "gpu_tflops": self.gpu_tflops,
            "mfu": self.mfu,
            "step_seconds": self.step_seconds,
            "epoch_hours": self.epoch_seconds / 3600,
            "total_hours": self.total_seconds / 3600,
            "total_steps": self.total_steps,
            "images_per_second_per_node": self.images_per_second_node,
            "decode_images_per_second_per_core": self.decode.per_core if self.decode else None,
            "decode_source": self.decode.source if self.decode else None,
            "cpu_cores_per_node_for_decoding": self.cores_per_node,
        }


def estimate_time(plan: RunPlan, cluster: Cluster, grad_checkpointing: bool, decode: DecodeRate | None = None) -> TimeEstimate:
    """Step, epoch and total time at `cluster.mfu` of `cluster.gpu_tflops`, and the image rate the
    data pipeline must sustain on each node (its ranks' share: the global batch over the nodes),
    with the CPU cores that takes at `decode` (default: the committed benchmark's rate)."""
    _, forward = plan.model_stats()
    factor = TRAIN_FLOPS_FACTOR[grad_checkpointing]
    flops_per_step = factor * forward * plan.batch.global_batch
    step = flops_per_step / (cluster.world_size * cluster.gpu_tflops * 1e12 * cluster.mfu)
    return TimeEstimate(
        forward_flops=forward,
        train_factor=factor,
        gpu_tflops=cluster.gpu_tflops,
        mfu=cluster.mfu,
        step_seconds=step,
        steps_per_epoch=plan.steps_per_epoch,
        total_steps=plan.total_steps,
        images_per_second_node=plan.batch.global_batch / step / cluster.nodes,
        decode=decode or committed_decode_rate(),
    )


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


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.0f} ms"


def memory_table(estimate: MemoryEstimate, title: str):
    from rich.table import Table

    table = Table(title=title)
    for column, justify in (("per GPU", "left"), ("", "right"), ("how", "left")):
        table.add_column(column, justify=justify)
    for line in estimate.lines():
        table.add_row(line.name, _size(line.nbytes), line.note)
    table.add_row("[bold]total", f"[bold]{_size(estimate.total)}", "model states + EMA + the larger micro-step line + allowance")
    return table


def print_report(report: CapacityReport) -> None:
    """The `vitdeep plan` output: memory breakdown, verdict, changes tried, time."""
    from rich.table import Table

    from vitdeep.monitor import make_console

    plan, cluster, est = report.plan, report.cluster, report.requested
    console = make_console()
    title = (f"vitdeep plan: {plan.cfg.model.model} at {plan.cfg.model.img_size} px on {cluster.nodes} × {cluster.gpus_per_node} "
             f"GPUs of {gb(cluster.gpu_memory):.1f} GB — {est.zero.label}, micro-batch {est.micro_batch}, global batch "
             f"{plan.batch.global_batch}, gradient accumulation {plan.batch.grad_accum}")
    console.print(memory_table(est, title))
    for line in report.verdict():
        console.print(line)
    if report.options:
        tried = Table(title="changes tried, cheapest first")
        for column in ("change", "ZeRO", "checkpointing", "largest micro-batch", "accumulation", "GB per GPU"):
            tried.add_column(column)
        for row in (o.to_dict(plan.batch.global_batch, cluster.world_size) for o in report.options):
            tried.add_row(row["change"], row["zero"], "yes" if row["grad_checkpointing"] else "no",
                          str(row["largest_micro_batch"] or "none fits"), str(row["grad_accum"] or ""), str(row["GB_per_gpu"] or ""))
        console.print(tried)
    t = report.time
    timing = Table(title=f"time at {t.mfu:.0%} MFU of {t.gpu_tflops:g} TFLOP/s per GPU", show_header=False)
    timing.add_row("forward GFLOPs per image", f"{t.forward_flops / 1e9:.2f}", "the counter of `vitdeep models`")
    timing.add_row("training GFLOPs per image", f"{t.train_factor * t.forward_flops / 1e9:.2f}",
                   f"{t.train_factor}× forward ({'with' if t.train_factor == 4 else 'without'} activation checkpointing)")
    timing.add_row("step", _duration(t.step_seconds), f"global batch {plan.batch.global_batch} on {cluster.world_size} GPU(s)")
    timing.add_row("epoch", _duration(t.epoch_seconds), f"{t.steps_per_epoch:,} steps of {plan.train_info.num_samples:,} images")
    timing.add_row("total", _duration(t.total_seconds), f"{t.total_steps:,} steps ({plan.epochs} epochs)")
    timing.add_row("images/s per node", f"{t.images_per_second_node:,.0f}", "what the data pipeline must decode and augment")
    if t.decode is not None:
        timing.add_row("CPU cores per node to decode", f"{t.cores_per_node:.1f}",
                       f"at {t.decode.per_core:.0f} images/s per core ({t.decode.source}: {t.decode.detail})")
    console.print(timing)
    for note in report.notes:
        console.print(f"note: {note}")


def check_fits(plan: RunPlan, gpu_memory: int | None = None) -> None:
    """Refuse (`UserError`) a run the planner says cannot fit this GPU, before anything starts.

    `gpu_memory` defaults to this process's CUDA device; without one (or with --no-plan-check)
    nothing is checked.
    """
    if not plan.cfg.run.plan_check:
        return
    if gpu_memory is None:
        if not torch.cuda.is_available():
            return
        from vitdeep.engine.deepspeed import world_from_env

        gpu_memory = torch.cuda.get_device_properties(world_from_env()[2]).total_memory
    cluster = Cluster(nodes=1, gpus_per_node=plan.world_size, gpu_memory=gpu_memory)
    model = MemoryModel(plan, cluster)
    ckpt = plan.cfg.model.grad_checkpointing
    estimate = model.estimate(plan.ds_config, plan.batch.micro_batch, ckpt)
    if estimate.total <= gpu_memory:
        return
    largest = largest_fitting(model, plan.ds_config, ckpt, micro_batch_options(plan, plan.world_size), gpu_memory)
    hint = f"`micro_batch` {largest.micro_batch} fits" if largest else "no micro-batch fits with these settings"
    raise UserError(
        f"the memory planner says this run needs {gb(estimate.total):.1f} GB per GPU and this GPU has {gb(gpu_memory):.1f} GB "
        f"({hint}; `vitdeep plan` with the same options shows what fits); `no_plan_check` starts it anyway",
        params=("micro_batch", "no_plan_check"),
    )


def this_machine_memory(plan: RunPlan) -> tuple[MemoryEstimate, int | None]:
    """The memory per rank of `plan` on this launch's ranks and this machine's GPU, and that GPU's
    memory (None without one: there is no verdict to give)."""
    on_gpu = torch.cuda.is_available()
    memory = torch.cuda.get_device_properties(0).total_memory if on_gpu else Cluster().gpu_memory
    cluster = Cluster(nodes=1, gpus_per_node=plan.world_size, gpu_memory=memory, device="cuda" if on_gpu else "cpu")
    estimate = MemoryModel(plan, cluster).estimate(plan.ds_config, plan.batch.micro_batch, plan.cfg.model.grad_checkpointing)
    return estimate, memory if on_gpu else None
