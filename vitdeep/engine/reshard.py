"""Resuming a checkpoint on another number of ranks: the ZeRO state cut anew.

DeepSpeed's own route (`ds_to_universal.py`, then `"checkpoint": {"load_universal": true}`)
unpickles its files. Here every file is read by the safe reader, merged into whole fp32 tensors by
DeepSpeed's `zero_to_fp32` (`checkpoint.consolidate`: the weights, both Adam moments and the EMA
alike), and each rank of the new world cuts its own partitions out of them along DeepSpeed's own
parameter → partition mapping (the engine's `_hp_mapping` fragments under ZeRO 1/2, its
`grad_position` under ZeRO-3). Only copies: what the new ranks hold is bitwise what was saved.

Without ZeRO every rank holds everything, and DeepSpeed's loader reads rank 0's files for any
number of ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vitdeep.engine.checkpoint import MOMENTS, consolidate, load_safely, rank_file, saved_optimizer_step
from vitdeep.engine.ema import ZERO_3, PartitionedEma, master_weights, optimizer_kind, write_working_copy


def load_resharded(engine: Any, path: Path, marker: dict[str, Any], ema: PartitionedEma | None) -> None:
    """Load the checkpoint at `path` (saved by `marker["world_size"]` ranks) into `engine` running on
    another number of ranks: fp32 masters, Adam moments and step, loss scaler, EMA; every rank
    takes part."""
    stage = marker["zero_stage"]
    if stage == 0:
        engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False)
        if ema is not None:
            ema.load_state_dict(_saved_ema(path))
        return
    weights = consolidate(path, stage)
    trainable = [(name, param) for name, param in engine.module.named_parameters() if param.requires_grad]
    moments = {key: _partitions(engine, trainable, consolidate(path, stage, part=key)) for key in MOMENTS}
    ema_partitions = _partitions(engine, trainable, consolidate(path, stage, part="ema")) if ema is not None else None
    masters = _partitions(engine, trainable, weights, keep=True)
    _load_optimizer_state(engine, path, stage, moments)
    write_working_copy(engine, masters)
    _load_frozen(engine, weights, stage)
    if ema is not None:
        for shadow, saved in zip(ema.shadow, ema_partitions):
            shadow.copy_(saved)
        ema.num_updates = _saved_ema(path)["num_updates"]
    engine.global_steps = marker["step"]
    engine.global_samples = marker["step"] * engine.train_batch_size()


def _saved_ema(path: Path) -> dict[str, Any]:
    return load_safely(rank_file(path, 0))["ema"]


@torch.no_grad()
def _partitions(engine: Any, trainable: list[tuple[str, torch.nn.Parameter]], full: dict[str, torch.Tensor],
                keep: bool = False) -> list[torch.Tensor]:
    """This rank's partitions of whole tensors `full`, laid out as its fp32 masters: written
    through the masters (zeroed first, so padding is 0 as in a fresh state); with `keep` the
    masters keep them, else they are copied out."""
    masters = master_weights(engine)
    for master in masters:
        master.zero_()
    for name, param in trainable:
        _set_master(engine, param, full[name])
    return masters if keep else [master.clone() for master in masters]


def _set_master(engine: Any, param: torch.nn.Parameter, value: torch.Tensor) -> None:
    optimizer = engine.optimizer
    if optimizer_kind(optimizer) != ZERO_3:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value)
        return
    # ZeRO-3: rank r holds elements [r·n, (r+1)·n) of the flattened parameter, zero-padded at the end
    # (DeepSpeed's own setter narrows past the end of a padded parameter)
    group, offset, numel = optimizer.grad_position[optimizer.get_param_id(param)]
    rank = dist.get_rank(group=optimizer.dp_process_group)
    mine = value.flatten()[rank * numel:(rank + 1) * numel]
    optimizer.fp32_partitioned_groups_flat[group].narrow(0, offset, mine.numel()).copy_(mine)


def _load_optimizer_state(engine: Any, path: Path, stage: int, moments: dict[str, list[torch.Tensor]]) -> None:
    """The base optimizer's state (step and moments per flat group) and the loss scaler, as
    DeepSpeed's own `load_state_dict` sets them."""
    optimizer = engine.optimizer
    base = optimizer.optimizer
    step = saved_optimizer_step(path, stage)
    zero3 = optimizer_kind(optimizer) == ZERO_3
    if zero3:
        optimizer._set_fp32_optimizer_param_groups()  # ZeRO-3 hands its partitions to the optimizer only around a step
    state = base.state_dict()
    state["state"] = {group: {"step": step.clone(), **{key: moments[key][group] for key in MOMENTS}}
                      for group in range(len(moments[MOMENTS[0]]))}
    base.load_state_dict(state)
    if zero3:
        optimizer._clear_fp32_optimizer_param_groups()
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False  # ZeRO 1/2 links the new state at the next step
    saved = load_safely(next(path.glob("*zero_pp_rank_0_*optim_states.pt")), mmap=True)["optimizer_state_dict"]
    for name in ("loss_scaler", "dynamic_loss_scale", "overflow"):
        if name in saved:
            setattr(optimizer, name, saved[name])


@torch.no_grad()
def _load_frozen(engine: Any, weights: dict[str, torch.Tensor], stage: int) -> None:
    """Parameters without an fp32 master (frozen blocks) and buffers, from the saved weights."""
    frozen = [(name, param) for name, param in engine.module.named_parameters() if not param.requires_grad]
    if stage == 3 and frozen:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=0):
            if dist.get_rank() == 0:
                for name, param in frozen:
                    param.copy_(weights[name])
    else:
        for name, param in frozen:
            param.copy_(weights[name])
    for name, buffer in engine.module.named_buffers():
        if name in weights:
            buffer.copy_(weights[name])
