"""How long will a run take: the time model of `vitdeep plan`.

Training FLOPs per image = 3 × the forward FLOPs `vitdeep models` counts (backward costs twice the
forward), 4 × with activation checkpointing (the forward runs again in backward), at `--mfu` of
`--gpu-tflops`. The same step time gives the images per second each node's data pipeline must
decode and augment, and the CPU cores that takes at a per-core decoding rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitdeep.data.decode_rate import DecodeRate, committed_decode_rate
from vitdeep.engine.run_plan import RunPlan
from vitdeep.planner.cluster import Cluster

#: Training FLOPs per forward FLOP: forward + backward (twice the forward), + the recomputed
#: forward under activation checkpointing.
TRAIN_FLOPS_FACTOR = {False: 3, True: 4}


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
