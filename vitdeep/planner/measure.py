"""`vitdeep plan --measure`: one real training step at the planned settings, measured here.

The engine is built as the trainer builds it (model, frozen blocks, checkpointing, vitdeep's
AdamW, `deepspeed.initialize`, the partitioned EMA) and fed a synthetic uint8 batch of the
planned shape through the loop's own pieces (`BatchPreprocessor`, the mixer,
`engine(x, aux=True)`, `Objective`, `engine.backward`, `engine.step`, the EMA update). A first
step lets DeepSpeed and AdamW create their lazily allocated state; the second is measured:

- **held model states**: the distinct storages reachable from the engine — the module's
  parameters (ZeRO-3: their partitions) and `.grad`, every tensor of the DeepSpeed optimizer
  (fp32 partitions, gradient partitions, buckets), the inner AdamW's parameters and state — and
  the EMA, each storage counted once at its full size;
- **the forward + backward and optimizer-step peaks above them**: on CUDA from
  `torch.cuda.max_memory_allocated`; on the CPU, where torch keeps no allocator statistics, from
  the running sum of the profiler's allocation events (every allocation and free of torch's CPU
  allocator: tensor storage, and oneDNN's scratchpad, about 5 MB for the fp32 patch embedding's
  backward, which the planner does not model; not the Python heap or gloo's buffers).

On CUDA the step's absolute `max_memory_allocated` / `max_memory_reserved` and the device memory
torch does not manage (context, NCCL) are recorded as well, against the planner's total and its
framework allowance. Each rank measures itself; the report takes the largest value over ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from vitdeep.engine.run_plan import RunPlan
from vitdeep.errors import UserError


def storages(tensors: Iterable[torch.Tensor | None], device: torch.device) -> dict[int, int]:
    """Distinct storages on `device` behind `tensors`: data pointer → bytes (None and empty ones skipped)."""
    out = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.device.type == device.type:
            storage = tensor.untyped_storage()
            if storage.nbytes():
                out[storage.data_ptr()] = storage.nbytes()
    return out


def _reachable(obj: Any, seen: set[int], depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors reachable from a DeepSpeed optimizer through containers and DeepSpeed / torch.optim
    objects (not through modules: the model's parameters are counted on their own)."""
    if id(obj) in seen or depth > 10:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, dict):
        for key, value in list(obj.items()):
            yield from _reachable(key, seen, depth + 1)
            yield from _reachable(value, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in list(obj):
            yield from _reachable(value, seen, depth + 1)
    elif not isinstance(obj, nn.Module) and type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for value in list(vars(obj).values()):
            yield from _reachable(value, seen, depth + 1)


def held_storages(engine: Any, ema: Any, device: torch.device) -> dict[str, int]:
    """Bytes held on `device` by the engine and the EMA, by kind (each storage once, in the first
    kind it appears in): parameters, EMA, AdamW moments, fp32 masters, and everything else of the
    DeepSpeed optimizer and the parameters' `.grad` (gradient partitions, buckets)."""
    module_params = list(engine.module.parameters())
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    masters = [p for group in inner.param_groups for p in group["params"]] + [p for p in inner.state if isinstance(p, torch.Tensor)]
    kinds = {
        "parameters": [getattr(p, "ds_tensor", None) for p in module_params] + module_params,
        "EMA": list(ema.shadow) if ema is not None else [],
        "optimizer state": [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)],
        "fp32 masters": masters,
        "gradients and DeepSpeed buffers": list(_reachable(engine.optimizer, set())) + [p.grad for p in module_params],
    }
    counted: set[int] = set()
    held = {}
    for kind, tensors in kinds.items():
        found = {ptr: n for ptr, n in storages(tensors, device).items() if ptr not in counted}
        counted.update(found)
        held[kind] = sum(found.values())
    return held


def peak_above_start(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensors allocated while `fn` runs, above what was live when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_step(plan: RunPlan) -> dict[str, Any]:
    """Measure one training step of `plan` on this process's device; every rank of the launch
    must call it. Returns the largest value of each measurement over the ranks."""
    from vitdeep.data.mixing import build_mixer
    from vitdeep.data.pipeline import BatchPreprocessor
    from vitdeep.engine.deepspeed import build_optimizer, engine_dtype, init_distributed, initialize
    from vitdeep.engine.ema import PartitionedEma
    from vitdeep.losses import Objective
    from vitdeep.models import create_model
    from vitdeep.models.freezing import freeze_blocks

    cfg = plan.cfg
    objective = Objective(cfg.loss)
    if objective.needs_teacher:
        raise UserError("`measure` does not load a distillation teacher: measure with `distill` none", params=("measure", "distill"))
    info = init_distributed(cfg.run.dist_timeout)
    device, dtype = info.device, engine_dtype(plan.ds_config)
    torch.manual_seed(cfg.run.seed)
    model = create_model(cfg.model.model, **plan.model_kwargs)
    freeze_blocks(model, cfg.optim.freeze_blocks)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    engine = initialize(model, build_optimizer(model, cfg.optim.weight_decay, cfg.optim.layer_decay, plan.schedule.lr_at(0)), plan.ds_config)
    ema = PartitionedEma(engine, cfg.optim.ema_decay, cfg.optim.ema_warmup) if cfg.optim.ema_decay > 0 else None
    preprocess = BatchPreprocessor(cfg.augment, device, dtype)
    mix = dataclasses.replace(cfg.mix, patch_aligned=cfg.mix.patch_aligned or objective.needs_patch_head)
    mixer = build_mixer(mix, plan.num_classes, cfg.model.img_size, cfg.model.patch_size, cfg.loss.label_smoothing)
    generator = torch.Generator().manual_seed(cfg.run.seed + info.rank)
    shape = (plan.batch.micro_batch, 3, cfg.model.img_size, cfg.model.img_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, plan.num_classes, (plan.batch.micro_batch,), generator=generator)

    def forward_backward() -> None:
        x, targets, patch_labels = preprocess(images.to(device), train=True), labels.to(device), None
        if mixer is not None:
            mixed = mixer(x, targets)
            x, targets, patch_labels = mixed.images, mixed.targets, mixed.patch_labels
        loss, _ = objective(engine(x, aux=True), targets, patch_labels=patch_labels)
        engine.backward(loss)

    def optimizer_step() -> None:
        engine.step()
        if ema is not None:
            ema.update()

    forward_backward()
    optimizer_step()
    on_gpu = device.type == "cuda"
    allocated = torch.cuda.memory_allocated if on_gpu else (lambda _: 0)
    held = held_storages(engine, ema, device)
    start = allocated(device)
    forward_backward_peak = peak_above_start(forward_backward, device)
    reserved = torch.cuda.max_memory_reserved(device) if on_gpu else 0
    after_backward = allocated(device)
    kept = sum(held_storages(engine, ema, device).values()) - sum(held.values())
    optimizer_peak = peak_above_start(optimizer_step, device)
    step_peak = kept + optimizer_peak
    mine = {
        "device": str(device),
        "held": held,
        "model_states": sum(v for k, v in held.items() if k != "EMA"),
        "forward_backward": forward_backward_peak,
        "optimizer_step": step_peak,
        "tensor_peak": sum(held.values()) + max(forward_backward_peak, step_peak),
    }
    if on_gpu:
        free, total = torch.cuda.mem_get_info(device)
        mine.update(
            cuda_max_allocated=max(start + forward_backward_peak, after_backward + optimizer_peak),
            cuda_max_reserved=max(reserved, torch.cuda.max_memory_reserved(device)),
            cuda_outside_torch=total - free - torch.cuda.memory_reserved(device),
        )
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    if hasattr(engine, "destroy"):
        engine.destroy()
    return _largest(everyone)


def _largest(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per measurement, the largest value over ranks (the rank that would run out first)."""
    merged: dict[str, Any] = {"device": results[0]["device"], "ranks": len(results)}
    merged["held"] = {kind: max(r["held"][kind] for r in results) for kind in results[0]["held"]}
    for key, value in results[0].items():
        if isinstance(value, int):
            merged[key] = max(r[key] for r in results)
    return merged
