"""Will a run fit: the memory model of `vitdeep plan`, per GPU.

It takes the *run plan* (`vitdeep.engine.run_plan`: batches, schedule, ds_config resolved from the
config) and prices its memory on a cluster.

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
- **EMA**: vitdeep keeps it over each rank's fp32 master partition (`vitdeep.engine.ema`): 4Ψ/N, 4Ψ without
  ZeRO, nothing on the GPU when the optimizer is offloaded.
- **One micro-step** above the states: activations of forward + backward traced on fake tensors
  through the real model and `Objective` (`trace.py`), with the gradients in flight and
  DeepSpeed's reduction buckets / gathered ZeRO-3 parameters on the same timeline, then the
  optimizer step's own temporaries (the fp32 gradient partition; the fused AdamW makes none).
- **Framework allowance**: CUDA context, cuBLAS / cuDNN workspaces and NCCL buffers (a fixed
  `FRAMEWORK_BYTES`), plus `FRAGMENTATION` of the tensor peak for the caching allocator's
  fragmentation. Neither is a tensor, so neither is traced; the constants are stated, not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from vitdeep.engine.run_plan import RunPlan
from vitdeep.errors import UserError
from vitdeep.losses import Objective
from vitdeep.models import create_model
from vitdeep.models.freezing import freeze_blocks
from vitdeep.planner.cluster import Cluster
from vitdeep.planner.trace import GradientPath, StepMemory, StepTracer

#: CUDA context + cuBLAS / cuDNN workspaces + NCCL communicator buffers on one GPU: about 0.6 GB
#: for the context and workspaces of torch 2.x on an H100, NCCL up to 1 GB across many peers.
FRAMEWORK_BYTES = int(1.5e9)
#: The caching allocator reserves more than the live tensors (blocks split and cached): 5-15 %
#: in long training runs, hence 10 % of the tensor peak.
FRAGMENTATION = 0.10
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
    """vitdeep's EMA: fp32 copy of this rank's master partition (`vitdeep.engine.ema`)."""
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


#: Traces of this process, shared by every `MemoryModel` of the same model and objective: a grid's
#: cells that differ only in seed or lr, or a dry run repeated, trace once. Bounded like an LRU.
_TRACES: dict[tuple, StepMemory] = {}
_TRACES_KEPT = 256


class MemoryModel:
    """Prices one run plan on one cluster at any micro-batch size, checkpointing and ds_config;
    the fake model is built once per precision and traced for each configuration asked (once per
    process: `_TRACES`)."""

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
        #: What a trace depends on besides the micro-step's shape: the model, its frozen blocks,
        #: the objective and the targets it is given.
        self._identity = (cfg.model.model, repr(sorted(plan.model_kwargs.items())), cfg.optim.freeze_blocks, repr(cfg.loss),
                          self.soft_targets, self.patch_labels)

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
        key = (*self._identity, path, zero.precision, micro_batch, grad_checkpointing)
        if key not in _TRACES:
            while len(_TRACES) >= _TRACES_KEPT:
                del _TRACES[next(iter(_TRACES))]
            _TRACES[key] = self._tracer(zero).trace(micro_batch, grad_checkpointing, path)
        _TRACES[key] = step = _TRACES.pop(key)  # now the most recently used
        return MemoryEstimate(
            zero=zero,
            micro_batch=micro_batch,
            grad_checkpointing=grad_checkpointing,
            states=model_state_lines(counts, zero, world, accumulating),
            ema=ema_line(counts, zero, world, self.plan.cfg.optim.ema_decay),
            step=step,
            optimizer_step=optimizer_step_bytes(counts, zero, world),
        )

    def floor(self, ds_config: dict[str, Any]) -> int:
        """A lower bound of `estimate(...).total` at any micro-batch: the held states and EMA with
        the framework allowance on them, before any activation. Above a budget, no micro-batch of
        this configuration fits, and none need be traced to say so."""
        zero = Zero.from_ds_config(ds_config)
        world = self.cluster.world_size
        counts = ParamCounts.of(self._counted, zero, world)
        held = min(sum(line.nbytes for line in model_state_lines(counts, zero, world, accumulating)) for accumulating in (False, True))
        held += ema_line(counts, zero, world, self.plan.cfg.optim.ema_decay).nbytes
        return held + FRAMEWORK_BYTES + int(FRAGMENTATION * held)

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


def largest_fitting(model: MemoryModel, ds_config: dict[str, Any], grad_checkpointing: bool, options: list[int], budget: int) -> MemoryEstimate | None:
    """The estimate at the largest micro-batch in `options` that fits `budget` (memory grows with
    the micro-batch, so a bisection over the options, after trying the largest)."""
    if not options or model.floor(ds_config) > budget:
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
