"""Row 8, `--compile`: a training step through DeepSpeed's engine with `engine.compile()` against
the same engine eager — what `vitdeep train --compile` changes.

Both sides run the training loop's own path on one rank: `engine(x, aux=True)`, vitdeep's
Objective with every loss (ℓ_ce + ℓ_cos + ℓ_cons + ℓ_token on a patch-aligned CutMix batch),
`engine.backward`, `engine.step`; same initial weights, batch and AdamW. The engine is ZeRO-2 bf16
on CUDA and `cpu_fp32` on the CPU (whose bf16 arithmetic can be emulated and slow). The first
compiled step (tracing and code generation) is timed apart and reported in the note. On CUDA the
model is `deit_base_12` (`Shapes.compile_model`): compiling grows with depth, and a 24-block
compile would not fit `make gpu-check`'s 5 minutes.

    .venv/bin/python benchmarks/compile_speed.py [--quick]
"""

from __future__ import annotations

import time

import torch
from common import Row, Shapes, ratio_band, standalone, sync, time_interleaved
from engine import start_process_group
from remedies import ALL_LOSSES, mixed_batch

from vitdeep.engine.deepspeed import build_optimizer, engine_dtype, fill_ds_config, initialize, load_ds_config
from vitdeep.losses import Objective
from vitdeep.models import count_parameters, create_model

GROUP = "8 compile"


def engine_step(s: Shapes, ds_name: str, compiled: bool):
    x, targets, patch_labels = mixed_batch(s)
    torch.manual_seed(0)
    model = create_model(s.compile_model, img_size=s.img_size, num_classes=s.num_classes, patch_head=True).train()
    options = {"global_batch": s.batch, "micro_batch": s.batch, "clip_grad": 0.0}
    config, _, _ = fill_ds_config(load_ds_config(ds_name), options, frozenset(), 1, count_parameters(model))
    engine = initialize(model, build_optimizer(model, 0.05, None, 1e-4), config)
    if compiled:
        engine.compile(backend=s.compile_backend)
    objective = Objective(ALL_LOSSES)
    xe = x.to(engine.device, engine_dtype(config))

    def step() -> None:
        loss, _ = objective(engine(xe, aux=True), targets, patch_labels=patch_labels)
        engine.backward(loss)
        engine.step()

    return step


def run(s: Shapes) -> list[Row]:
    start_process_group()
    ds_name = "zero2_bf16" if s.device == "cuda" else "cpu_fp32"
    cases = {"eager": engine_step(s, ds_name, False), "compiled": engine_step(s, ds_name, True)}
    sync()
    start = time.perf_counter()
    cases["compiled"]()  # tracing and code generation
    sync()
    first = time.perf_counter() - start
    t = time_interleaved(cases, s.warmup, s.reps)
    ips = {name: s.batch / timing.median for name, timing in t.items()}
    return [
        Row(GROUP, f"train step with the losses: engine.compile() ({s.compile_backend}) vs eager", "eager", ips["eager"],
            "compiled", ips["compiled"], "img/s", band=ratio_band(t["eager"], t["compiled"], higher_is_better=True),
            note=f"{s.compile_model}, {s.img_size} px, batch {s.batch}, {ds_name}, 1 rank, aux path + every loss; first compiled step "
                 f"(tracing and code generation) {first:.1f} s",
            extra={"first_compiled_step_s": first}),
    ]


if __name__ == "__main__":
    standalone(run, "--compile: engine.compile() vs eager, training step")
