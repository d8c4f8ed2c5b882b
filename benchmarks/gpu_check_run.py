"""`vitdeep ARGS` as it is, plus a record of what the run really used (run under a launcher).

`benchmarks/gpu_check.py` runs every training command through this file, and the tests of
`--compile` do too. Only `Trainer.fit`, one micro-batch method and, when asked, the objective
are wrapped; the engine, data and collectives are the real ones.

Environment:
- VITDEEP_CHECK_RECORD=DIR: after `fit` each rank writes DIR/rank_R.json: the process group's
  backend, the optimizer (class, fused kernel), where ZeRO keeps the fp32 masters (device,
  pinned), the weights' dtype, whether the first batch arrived in pinned memory, vitdeep's and
  DeepSpeed's step and skip counts, the loss scale around an injected non-finite loss, peak GPU
  memory, and for `--compile` dynamo's graph count, graph breaks and the compiled model's
  largest difference from the eager one on a fixed batch.
- VITDEEP_CHECK_INJECT=K: the last rank's loss of micro-batch K (0-based) becomes NaN.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import vitdeep.engine.loop as loop
from vitdeep.cli import run

INJECT = int(os.environ["VITDEEP_CHECK_INJECT"]) if os.environ.get("VITDEEP_CHECK_INJECT") else None
RECORD = Path(os.environ["VITDEEP_CHECK_RECORD"]) if os.environ.get("VITDEEP_CHECK_RECORD") else None


class InjectedObjective(loop.Objective):
    """The real objective; the last rank's loss of micro-batch INJECT is multiplied by NaN."""

    calls = 0

    def __call__(self, *args, **kwargs):
        total, terms = super().__call__(*args, **kwargs)
        index, InjectedObjective.calls = InjectedObjective.calls, InjectedObjective.calls + 1
        if index == INJECT and dist.get_rank() == dist.get_world_size() - 1:
            total = total * torch.tensor(float("nan"), device=total.device)
        return total, terms


def loss_scale(engine) -> float | None:
    scale = getattr(engine.optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None


def masters(engine) -> torch.Tensor | None:
    """The first fp32 master partition ZeRO steps on (None without ZeRO)."""
    optimizer = engine.optimizer
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        groups = getattr(optimizer, name, None)
        if groups:
            return groups[0]
    return None


def compile_facts(trainer) -> dict:
    """Dynamo's counts, and the compiled model against its eager forward on the probe batch."""
    from torch._dynamo.utils import counters

    module = trainer.engine.module
    images = trainer.preprocess(trainer._probe_images.to(trainer.device), train=False)
    module.eval()
    with torch.no_grad(), trainer._autocast():
        compiled = module(images).float()
        with torch.compiler.set_stance("force_eager"):
            eager = module(images).float()
    module.train()
    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "max_abs_difference": (compiled - eager).abs().max().item(),
        "logit_scale": eager.abs().max().item(),
    }


def record(trainer) -> dict:
    engine, basic = trainer.engine, trainer.engine.basic_optimizer
    master = masters(engine)
    facts = {
        "rank": trainer.dist.rank,
        "world_size": trainer.dist.world_size,
        "device": str(trainer.device),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backend": dist.get_backend(),
        "precision": trainer.plan.precision,
        "zero_stage": trainer.plan.zero_stage,
        "weights_dtype": str(next(engine.module.parameters()).dtype),
        "optimizer": type(engine.optimizer).__name__,
        "basic_optimizer": type(basic).__name__,
        "fused_adamw": bool(basic.defaults.get("fused")),
        "masters_device": str(master.device) if master is not None else None,
        "masters_pinned": master.is_pinned() if master is not None and master.device.type == "cpu" else None,
        "first_batch_pinned": getattr(trainer, "_first_batch_pinned", None),
        "steps": trainer.step,
        "skipped_micro_batches": trainer.skipped_steps,
        "engine_global_steps": engine.global_steps,
        "engine_skipped_steps": engine.skipped_steps,
        "loss_scale_final": loss_scale(engine),
        "loss_scale_around_injection": getattr(trainer, "_scale_around_injection", None),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "compiled": engine.is_compiled,
    }
    if engine.is_compiled:
        facts["compile"] = compile_facts(trainer)
    return facts


def wrap_trainer() -> None:
    fit, micro_batch = loop.Trainer.fit, loop.Trainer._train_micro_batch

    def traced_micro_batch(self, images, labels, seeds):
        if not hasattr(self, "_first_batch_pinned"):
            self._first_batch_pinned = images.is_pinned()
            self._scale_around_injection = None
            self._micro_batches = 0
        index, before = self._micro_batches, loss_scale(self.engine)
        stepped = micro_batch(self, images, labels, seeds)
        if index == INJECT:
            self._scale_around_injection = [before, loss_scale(self.engine)]
        self._micro_batches += 1
        return stepped

    def recorded_fit(self):
        result = fit(self)
        facts = record(self)
        RECORD.mkdir(parents=True, exist_ok=True)
        (RECORD / f"rank_{self.dist.rank}.json").write_text(json.dumps(facts, indent=1))
        return result

    loop.Trainer._train_micro_batch = traced_micro_batch
    if RECORD is not None:
        loop.Trainer.fit = recorded_fit


if __name__ == "__main__":
    if INJECT is not None:
        loop.Objective = InjectedObjective
    wrap_trainer()
    run([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
