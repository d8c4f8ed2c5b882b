"""Row 6, memory: peak memory of a training step at depth 24 and 48 with and without activation
checkpointing, and what each rank holds under ZeRO stages 0-3 in a 2-rank DeepSpeed run.

Peak step memory = the bytes held when a step starts (parameters and AdamW state; gradients were
just released) + the peak of what the step allocates on top, gradients included (CUDA: `max_memory_allocated`; CPU: the profiler's
allocation events, see `common.peak_memory`). Step times of the same four models are timed in
turns as well, to show what checkpointing costs.

The ZeRO rows come from `zero_worker.py` under `deepspeed --num_gpus 2` on CPU ranks (gloo):
per rank, the parameters + optimizer state held between steps against plain data parallelism
(stage 0), with the ZeRO paper's expectation for mixed-precision Adam on N = 2 ranks
(2Ψ + 12Ψ bytes at stage 0; 2Ψ + 12Ψ/N at stages 1-2; 14Ψ/N at stage 3) as the goal; and the
per-rank peak of a step (held bytes + everything a step allocates on top: gradients, reduction
buckets, activations) against stage 0, which ZeRO should never exceed.

    .venv/bin/python benchmarks/memory.py [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import Row, Shapes, batch_for, describe, mb, peak_memory, ratio_band, standalone, state_bytes, time_interleaved, train_step

from vitdeep.engine.deepspeed import free_port
from vitdeep.models import create_model

GROUP = "6 memory"
HERE = Path(__file__).resolve().parent
#: ZeRO paper, mixed-precision Adam on N ranks: (params + optimizer state) / stage 0's.
EXPECTED = {1: (2 + 12 / 2) / 14, 2: (2 + 12 / 2) / 14, 3: (14 / 2) / 14}


def checkpointing_rows(s: Shapes) -> list[Row]:
    x, y = batch_for(s, s.depth_img_size, s.depth_batch)
    steps, models = {}, {}
    for depth in s.depths[1:]:
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = create_model(s.depth_model, img_size=s.depth_img_size, num_classes=s.num_classes, depth=depth)
            model.set_grad_checkpointing(ckpt)
            model = model.to(s.device).train()
            steps[depth, ckpt] = train_step(model, lambda m: F.cross_entropy(m(x).float(), y), s)
            models[depth, ckpt] = model
    t = time_interleaved(steps, 1, max(3, s.reps // 2))
    rows = []
    for depth in s.depths[1:]:
        peak = {}
        for ckpt in (False, True):
            step = steps[depth, ckpt]
            step.optimizer.zero_grad(set_to_none=True)  # as the step starts; its gradients count as step allocations
            held = state_bytes(models[depth, ckpt], step.optimizer)
            peak[ckpt] = (held, peak_memory(step))
        where = f"{s.depth_model} width, depth {depth}, {describe(s, s.depth_img_size, s.depth_batch)}, AdamW"
        rows.append(Row(GROUP, f"depth {depth}: peak step memory, activation checkpointing vs none", "none",
                        mb(sum(peak[False])), "checkpointing", mb(sum(peak[True])), "MB",
                        note=f"{where}; held {mb(peak[False][0]):.0f} MB (params, AdamW state), "
                             f"allocated during a step (gradients included) {mb(peak[False][1]):.0f} MB without / {mb(peak[True][1]):.0f} MB with checkpointing"))
        rows.append(Row(GROUP, f"depth {depth}: step time, activation checkpointing vs none", "none",
                        t[depth, False].median * 1e3, "checkpointing", t[depth, True].median * 1e3, "ms",
                        band=ratio_band(t[depth, False], t[depth, True], higher_is_better=False)))
    return rows


def zero_counts(model: str, timeout: float = 400) -> dict:
    """Run `zero_worker.py` on 2 CPU ranks under the deepspeed launcher; its ZERO_MEMORY record."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(HERE / "zero_worker.py"), model]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in result.stdout.splitlines():
        if line.startswith("ZERO_MEMORY "):
            return json.loads(line.removeprefix("ZERO_MEMORY "))
    raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode} without a result\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def zero_rows(s: Shapes) -> list[Row]:
    record = zero_counts(s.zero_model)
    by_stage = {ranks[0]["stage"]: ranks for ranks in record["stages"]}

    def held(r: dict) -> int:
        return r["param_bytes"] + r["optimizer_bytes"]

    def peak(r: dict) -> int:
        return held(r) + r["grad_buffer_bytes"] + r["step_peak_bytes"]

    params = by_stage[0][0]["parameters"]
    # each stage is judged by the rank holding most
    base_held, base_peak = max(map(held, by_stage[0])), max(map(peak, by_stage[0]))
    rows = []
    for stage in (1, 2, 3):
        ranks = by_stage[stage]
        r = max(ranks, key=held)
        rows.append(Row(GROUP, f"ZeRO-{stage} vs ZeRO-0, 2 ranks: parameters + optimizer state per rank", "ZeRO-0",
                        mb(base_held), f"ZeRO-{stage}", mb(held(r)), "MB", goal=("<=", EXPECTED[stage] + 0.02),
                        note=f"{s.zero_model} ({params / 1e6:.1f} M params), bf16, AdamW, {r['optimizer']}: params {mb(r['param_bytes']):.0f} MB + "
                             f"optimizer {mb(r['optimizer_bytes']):.0f} MB; ZeRO paper expects {EXPECTED[stage]:.3f}",
                        extra={"ranks": ranks}))
    for stage in (1, 2, 3):
        r = max(by_stage[stage], key=peak)
        rows.append(Row(GROUP, f"ZeRO-{stage} vs ZeRO-0, 2 ranks: per-rank peak during a step", "ZeRO-0",
                        mb(base_peak), f"ZeRO-{stage}", mb(peak(r)), "MB", goal=("<=", 1.0),
                        note=f"held + step allocations; held between steps {mb(held(r) + r['grad_buffer_bytes']):.0f} MB (largest buffer "
                             f"{mb(r['largest_buffer_bytes']):.0f} MB), allocated during a step {mb(r['step_peak_bytes']):.0f} MB"))
    rows[-1].extra.update(zero_record=record)
    rows[-2].note += (f"; ZeRO buckets are \"auto\": DeepSpeed's default of 5e8 elements capped at the model's "
                      f"{params / 1e6:.0f} M parameters (uncapped they made this row 5.0x)")
    return rows


def run(s: Shapes) -> list[Row]:
    return checkpointing_rows(s) + zero_rows(s)


if __name__ == "__main__":
    standalone(run, "Memory: activation checkpointing by depth, and ZeRO stages on 2 ranks")
