"""Learning-rate schedule, a pure function of the optimizer step.

Deriving the rate from the step count (rather than stepping a scheduler object) makes a resumed
run use exactly the rate the uninterrupted run would have used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LrSchedule:
    """Linear warm-up from `warmup_lr` to `peak_lr`, then cosine to `min_lr` (or constant)."""

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    kind: str = "cosine"

    def lr_at(self, step: int) -> float:
        """Rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's rate (times its layer-decay `lr_scale`); returns the base rate."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
