"""Model EMA that works under ZeRO 1, 2 and 3 without gathering the model every step.

Each rank keeps the EMA of exactly the fp32 master tensors its optimizer updates: its ZeRO
partition (the flat groups DeepSpeed checkpoints as `single_partition_of_fp32_groups` /
`fp32_flat_groups`), or the whole fp32 model without ZeRO. The update is one fused lerp over
1/world of the parameters. The EMA is saved per rank beside the engine state and consolidated
by DeepSpeed's own ZeRO → fp32 code, exactly like the weights (see `checkpoint.py`).

To evaluate the EMA, `applied()` writes it into the low-precision working copy of the weights
(re-gathering across ranks for ZeRO 1/2, dropping ZeRO-3's gathered copies) and puts the master
weights back afterwards. This touches DeepSpeed optimizer internals, checked against the
pinned DeepSpeed release by the tests.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

ZERO_1_2 = "zero1_2"
ZERO_3 = "zero3"
PLAIN = "plain"


def optimizer_kind(optimizer: Any) -> str:
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return ZERO_3
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return ZERO_1_2
    if isinstance(optimizer, torch.optim.Optimizer):
        return PLAIN
    raise NotImplementedError(f"model EMA does not support the DeepSpeed optimizer {type(optimizer).__name__}")


def master_weights(engine: Any) -> list[torch.Tensor]:
    """This rank's fp32 master tensors: its ZeRO partition of each flat group, or without ZeRO
    the trainable parameters themselves."""
    optimizer = engine.optimizer
    kind = optimizer_kind(optimizer)
    if kind == ZERO_3:
        return list(optimizer.fp32_partitioned_groups_flat)
    if kind == ZERO_1_2:
        return list(optimizer.single_partition_of_fp32_groups)
    return [p for p in engine.module.parameters() if p.requires_grad]


@torch.no_grad()
def write_working_copy(engine: Any, source: list[torch.Tensor]) -> None:
    """Make the weights the model computes with (the low-precision copy under ZeRO; all ranks
    take part) equal `source`, tensors laid out as `master_weights(engine)`; the masters stay."""
    optimizer = engine.optimizer
    kind = optimizer_kind(optimizer)
    if kind == PLAIN:
        for param, value in zip(master_weights(engine), source):
            param.copy_(value)
    elif kind == ZERO_3:
        for i, value in enumerate(source):
            optimizer.fp16_partitioned_groups_flat[i].copy_(value)
            optimizer._unflatten_partitioned_parameters(i)
        # drop every gathered copy (persistent and cached ones too): the next forward
        # gathers the new partitions
        engine.empty_partition_cache()
    else:
        from deepspeed.runtime.utils import all_gather_dp_groups
        import torch.distributed as dist

        for i, value in enumerate(source):
            partition_id = dist.get_rank(group=optimizer.real_dp_process_group[i])
            optimizer.parallel_partitioned_bit16_groups[i][partition_id].copy_(value)
        all_gather_dp_groups(
            groups_flat=optimizer.bit16_groups_flat,
            partitioned_param_groups=optimizer.parallel_partitioned_bit16_groups,
            dp_process_group=optimizer.real_dp_process_group,
            start_alignment_factor=optimizer.nccl_start_alignment_factor,
            allgather_bucket_size=optimizer.allgather_bucket_size,
        )


class PartitionedEma:
    """EMA of this rank's master weights; `decay` per optimizer step, optional warm-up
    (`decay_t = min(decay, (1 + t) / (10 + t))`, as timm's ModelEmaV3)."""

    def __init__(self, engine: Any, decay: float, warmup: bool = True) -> None:
        self.engine = engine
        self.decay = decay
        self.warmup = warmup
        self.kind = optimizer_kind(engine.optimizer)
        self.num_updates = 0
        self.shadow = [t.detach().float().clone() for t in self._masters()]

    def _masters(self) -> list[torch.Tensor]:
        return master_weights(self.engine)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        """Call after every optimizer step."""
        masters = [t.detach().float() for t in self._masters()]
        torch._foreach_lerp_(self.shadow, masters, 1.0 - self.current_decay())
        self.num_updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The model computes with the EMA weights inside this block (all ranks must enter).

        Under ZeRO the fp32 masters stay untouched and are written back afterwards; without ZeRO
        the parameters are the masters, so they are copied aside first.
        """
        backup = [p.detach().clone() for p in self._masters()] if self.kind == PLAIN else None
        write_working_copy(self.engine, self.shadow)
        try:
            yield
        finally:
            write_working_copy(self.engine, backup if backup is not None else self._masters())

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kind": self.kind, "num_updates": self.num_updates, "partitions": [t.cpu() for t in self.shadow]}
        if self.kind == PLAIN:
            state["names"] = [n for n, p in self.engine.module.named_parameters() if p.requires_grad]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind or len(state["partitions"]) != len(self.shadow):
            raise ValueError("EMA state was saved with a different ZeRO layout")
        for shadow, saved in zip(self.shadow, state["partitions"]):
            shadow.copy_(saved)
        self.num_updates = state["num_updates"]
