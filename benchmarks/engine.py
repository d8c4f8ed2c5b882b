"""Row 4, engine overhead: DeepSpeed ZeRO-2 bf16 steps on one rank against the same step in a
plain PyTorch loop with autocast.

Both sides train the same model from the same initial weights on the same batch, with
vitdeep's AdamW (`build_optimizer`: weight-decay groups) and no gradient clipping (vitdeep's
default). The engine side is what `vitdeep train` runs: the bundled `zero2_bf16` config filled by
`fill_ds_config`, bf16 inputs, `engine.backward` / `engine.step`. The plain side keeps fp32
weights and runs the forward under `torch.autocast(bf16)`. Goal: engine images/s ≥ 0.9 × plain.

The autocast engine (`zero2_autocast_bf16`: fp32 weights and ZeRO masters, forward under
DeepSpeed's `torch_autocast`) runs the plain loop's arithmetic; goal ≥ 0.95 × plain.

On the CPU two fp32 rows separate the engine from the precision: the `cpu_fp32` config (ZeRO
off) and the autocast engine with its autocast switched off (its ZeRO-2 optimizer path on fp32
masters), each against a plain fp32 loop. On a CPU without native bf16 matrix units the bf16
arithmetic itself dwarfs any engine cost, and these rows are where the engine's own overhead
shows. (A GPU has bf16 tensor cores, and `make gpu-check` has 5 minutes: it runs the bf16 rows.)

The process group is created in this process (gloo on CPU, NCCL on CUDA; rank 0 of 1, a free
MASTER_PORT unless the environment sets one).

    .venv/bin/python benchmarks/engine.py [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import Row, Shapes, batch_for, ratio_band, standalone, time_interleaved

from vitdeep.engine.deepspeed import build_optimizer, engine_dtype, fill_ds_config, init_distributed, initialize, load_ds_config
from vitdeep.models import count_parameters, create_model

GROUP = "4 engine overhead"


def start_process_group() -> None:
    """Rank 0 of 1 in this process (`init_distributed` sets the environment for a lone process).
    Starting it resets torch's thread count on CPU; the benchmark's own setting is put back."""
    threads = torch.get_num_threads()
    init_distributed(timeout_minutes=10)
    torch.set_num_threads(threads)


def engine_step(s: Shapes, ds_config: dict, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = create_model(s.model, img_size=s.img_size, num_classes=s.num_classes).train()
    options = {"global_batch": s.batch, "micro_batch": s.batch, "clip_grad": 0.0}
    config, _, _ = fill_ds_config(ds_config, options, frozenset(), 1, count_parameters(model))
    engine = initialize(model, build_optimizer(model, 0.05, None, 1e-4), config)
    xe = x.to(engine.device, engine_dtype(config))
    ye = y.to(engine.device)

    def step() -> None:
        engine.backward(F.cross_entropy(engine(xe).float(), ye))
        engine.step()

    return step


def plain_step(s: Shapes, dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = create_model(s.model, img_size=s.img_size, num_classes=s.num_classes).to(s.device).train()
    optimizer = build_optimizer(model, 0.05, None, 1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=s.device, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()

    return step


def run(s: Shapes) -> list[Row]:
    start_process_group()
    x, y = batch_for(s)
    cases = {
        "plain bf16": plain_step(s, torch.bfloat16, x, y),
        "zero2_bf16": engine_step(s, load_ds_config("zero2_bf16"), x, y),
        "zero2_autocast_bf16": engine_step(s, load_ds_config("zero2_autocast_bf16"), x, y),
    }
    if s.device == "cpu":
        autocast_off = load_ds_config("zero2_autocast_bf16")
        autocast_off["torch_autocast"]["enabled"] = False
        cases.update({
            "plain fp32": plain_step(s, torch.float32, x, y),
            "cpu_fp32": engine_step(s, load_ds_config("cpu_fp32"), x, y),
            "zero2 fp32 masters": engine_step(s, autocast_off, x, y),
        })
    t = time_interleaved(cases, s.warmup, s.reps)
    ips = {name: s.batch / timing.median for name, timing in t.items()}
    where = f"{s.model}, {s.img_size} px, batch {s.batch}, 1 rank, vitdeep's AdamW"
    rows = [
        Row(GROUP, "DeepSpeed ZeRO-2 bf16 step vs plain loop with bf16 autocast", "plain + autocast", ips["plain bf16"],
            "ZeRO-2 bf16", ips["zero2_bf16"], "img/s", goal=(">=", 0.9),
            band=ratio_band(t["plain bf16"], t["zero2_bf16"], higher_is_better=True), note=where),
        Row(GROUP, "autocast-bf16 engine (zero2_autocast_bf16) vs plain loop with bf16 autocast", "plain + autocast",
            ips["plain bf16"], "autocast engine", ips["zero2_autocast_bf16"], "img/s", goal=(">=", 0.95),
            band=ratio_band(t["plain bf16"], t["zero2_autocast_bf16"], higher_is_better=True), note=where),
    ]
    if s.device != "cpu":
        return rows
    return rows + [
        Row(GROUP, "DeepSpeed engine fp32 (cpu_fp32, ZeRO off) vs plain fp32 loop", "plain fp32", ips["plain fp32"],
            "engine fp32", ips["cpu_fp32"], "img/s", band=ratio_band(t["plain fp32"], t["cpu_fp32"], higher_is_better=True)),
        Row(GROUP, "autocast engine with autocast off (ZeRO-2 on fp32 masters) vs plain fp32 loop", "plain fp32",
            ips["plain fp32"], "ZeRO-2 fp32", ips["zero2 fp32 masters"], "img/s",
            band=ratio_band(t["plain fp32"], t["zero2 fp32 masters"], higher_is_better=True),
            note="the autocast engine's optimizer path without the bf16 arithmetic"),
    ]


if __name__ == "__main__":
    standalone(run, "Engine overhead: DeepSpeed step vs plain PyTorch loop")
