"""Memory of one training micro-step, traced on fake tensors: nothing is allocated.

The real model (`create_model` with the run's options, parameters in the engine's dtype: bf16
under DeepSpeed bf16) runs the training loop's path, `model(x, aux=True)` → `Objective` →
`backward()`, under torch's `FakeTensorMode`, so shapes and dtypes are real and no memory is
touched. `LiveBytes`, a `TorchDispatchMode` under it, adds up the storage of every tensor an op
creates, drops it when the storage dies, and keeps the peak per phase (forward + loss, backward,
the end of backward). Tensors made before the trace (the parameters) are not counted: they are
model states, priced by `memory.py`.

What the trace cannot see is DeepSpeed's own handling of gradients: `GradientPath` replays it on
the same timeline (buffers allocated at the first gradient, each filled reduction bucket
flattened once, ZeRO-3's gathered parameters), as DeepSpeed 0.19's engine and ZeRO optimizers do.

Attention is traced on the fake CPU device. torch's CPU `scaled_dot_product_attention` is a
flash-attention kernel that keeps the output and an fp32 log-sum-exp per query for backward,
which is what CUDA's flash and memory-efficient kernels keep, so the fused path costs O(N) memory
in the trace as on the GPU (their backward scratch differs by less than one layer's q, k, v).
Talking heads, Re-attention or requested attention maps take the explicit N×N path on both devices
(`Attention._uses_fused_kernel`), and the trace materialises those matrices like the GPU does.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vitdeep.losses import Objective

PHASES = ("forward", "backward", "end")


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive, with a peak per phase.

    A storage counts once, at its full size, from the op that created it until it dies (views and
    in-place results share their input's storage and add nothing). `hold` / `release` /
    `spike` add memory the trace does not allocate itself (DeepSpeed's buffers).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.phase = PHASES[0]
        self.peaks = dict.fromkeys(PHASES, 0)
        self._alive: dict[int, Any] = {}

    def enter_phase(self, phase: str) -> None:
        self.phase = phase
        self._note(self.live)

    def hold(self, nbytes: int) -> None:
        self.live += nbytes
        self._note(self.live)

    def release(self, nbytes: int) -> None:
        self.live -= nbytes

    def spike(self, nbytes: int) -> None:
        """A temporary of `nbytes` that lives for a moment on top of what is live."""
        self._note(self.live + nbytes)

    def _note(self, value: int) -> None:
        self.peaks[self.phase] = max(self.peaks[self.phase], value)

    def _add(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in inputs or key in self._alive:
            return
        nbytes = storage.nbytes()
        self._alive[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._free(key, nbytes))
        self.hold(nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        if self._alive.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor, inputs)
        return out


@dataclass(frozen=True)
class GradientPath:
    """What DeepSpeed holds besides the model's own tensors during forward and backward, in bytes
    (`capacity.gradient_path` fills it per ZeRO stage).

    - `keep_grads`: gradients stay in `.grad` until the optimizer step (no ZeRO) rather than
      being copied into a reduction bucket and freed as they arrive (ZeRO);
    - `buckets`: allocated when the first gradient arrives, freed when backward ends (ZeRO-1/2's
      contiguous reduction buckets);
    - `bucket_elements` / `bucket_bytes`: each reduction flattens up to one bucket of gradients
      into a temporary of `bucket_bytes` per element, during backward each time a bucket fills
      (`reduce_in_backward`), otherwise once after it (the engine's all-reduce without ZeRO);
    - `partition_grads`: allocated at the first reduction and kept into the optimizer step
      (ZeRO-1/2's gradient partition);
    - `gathered_forward` / `gathered_backward`: ZeRO-3's parameters gathered from the partitions.
    """

    keep_grads: bool = True
    buckets: int = 0
    bucket_elements: int = 0
    bucket_bytes: int = 0
    reduce_in_backward: bool = False
    partition_grads: int = 0
    gathered_forward: int = 0
    gathered_backward: int = 0


@dataclass(frozen=True)
class StepMemory:
    """Peak bytes of one micro-step above the model states, per phase."""

    micro_batch: int
    forward: int
    backward: int
    end: int
    after_backward: int

    @property
    def peak(self) -> int:
        return max(self.forward, self.backward, self.end)


class StepTracer:
    """One fake copy of a model, traced at any micro-batch size, with or without checkpointing.

    `blueprint`: the model built on the meta device with the run's options (frozen parameters
    marked with `requires_grad=False`); `soft_targets`: the batch was mixed (Mixup / CutMix give per-image class distributions);
    `patch_labels`: patch-aligned CutMix gives int64 labels per patch (else the patch head takes
    the image targets).
    """

    def __init__(self, blueprint: nn.Module, dtype: torch.dtype, objective: Objective, soft_targets: bool, patch_labels: bool) -> None:
        self.dtype, self.objective = dtype, objective
        self.soft_targets, self.patch_labels = soft_targets, patch_labels
        self.mode = FakeTensorMode()
        self.model = _fake_copy(blueprint, self.mode, dtype)

    def trace(self, micro_batch: int, grad_checkpointing: bool, path: GradientPath) -> StepMemory:
        model = self.model
        model.set_grad_checkpointing(grad_checkpointing)
        tracker = LiveBytes()
        params = [p for p in model.parameters() if p.requires_grad]
        state = {"grads": 0, "pending": 0, "reduced": False}

        def reduce(elements: int) -> None:
            tracker.spike(elements * path.bucket_bytes)
            if not state["reduced"]:
                tracker.hold(path.partition_grads)
                state["reduced"] = True

        def on_grad(param: torch.Tensor) -> None:
            if state["grads"] == 0:
                tracker.hold(path.buckets)
            state["grads"] += 1
            state["pending"] += param.numel()
            if path.reduce_in_backward and state["pending"] >= path.bucket_elements:
                reduce(path.bucket_elements)
                state["pending"] -= path.bucket_elements
            if not path.keep_grads:
                param.grad = None

        handles = [p.register_post_accumulate_grad_hook(on_grad) for p in params]
        try:
            with self.mode, tracker:
                tracker.hold(path.gathered_forward)
                loss = self._loss(micro_batch)
                tracker.enter_phase("backward")
                tracker.release(path.gathered_forward - path.gathered_backward)
                loss.backward()
                del loss
                tracker.enter_phase("end")
                if state["pending"]:
                    reduce(min(state["pending"], path.bucket_elements or state["pending"]))
                tracker.release(path.gathered_backward + (path.buckets if state["grads"] else 0))
                after = tracker.live
        finally:
            for handle in handles:
                handle.remove()
            for p in params:
                p.grad = None
        return StepMemory(micro_batch, tracker.peaks["forward"], tracker.peaks["backward"], tracker.peaks["end"], after)

    def _loss(self, micro_batch: int) -> torch.Tensor:
        """The batch as the training loop holds it, forward with the aux outputs, the objective."""
        model = self.model
        x = torch.empty(micro_batch, 3, model.img_size, model.img_size, dtype=self.dtype)
        if self.soft_targets:
            targets = torch.empty(micro_batch, model.num_classes)
        else:
            targets = torch.zeros(micro_batch, dtype=torch.long)
        patches = model.patch_embed.num_patches
        patch_labels = torch.zeros(micro_batch, patches, dtype=torch.long) if self.patch_labels else None
        out = model(x, aux=True)
        loss, _ = self.objective(out, targets, patch_labels=patch_labels)
        return loss


def _fake_copy(blueprint: nn.Module, mode: FakeTensorMode, dtype: torch.dtype) -> nn.Module:
    """`blueprint` (built on the meta device) with fake parameters and buffers of `dtype`, as the
    engine holds them (the engine casts every floating-point parameter and buffer). Buffers too:
    a training step updates some in place (Re-attention's BatchNorm statistics)."""
    with mode:
        for module in blueprint.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    fake = torch.empty(param.shape, dtype=dtype if param.is_floating_point() else param.dtype)
                    module._parameters[name] = nn.Parameter(fake, requires_grad=param.requires_grad)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = torch.empty(buffer.shape, dtype=dtype if buffer.is_floating_point() else buffer.dtype)
    return blueprint.train()
