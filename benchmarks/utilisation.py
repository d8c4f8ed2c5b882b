"""Row 5, hardware utilisation: achieved training FLOP/s over the machine's measured matmul peak,
for depths 12, 24 and 48 of one width — the number that must stay flat as depth grows.

Training FLOPs per image are 3 × the model's forward FLOPs as `vitdeep.models.model_stats`
counts them (torch's FlopCounterMode: matmuls, the patch convolution and attention; a
multiply-add counts 2; backward ≈ 2 × forward). The peak is a large square GEMM in the
compute dtype (fp32 on CPU, bf16 on CUDA), timed in the same rounds as the training steps so
that the machine's load weighs on both alike.

    .venv/bin/python benchmarks/utilisation.py [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import Row, Shapes, batch_for, datasheet_peak, describe, quartile_band, standalone, time_interleaved, train_step

from vitdeep.models import create_model, model_stats

GROUP = "5 utilisation"


def gemm(s: Shapes):
    """(function, FLOPs per call) of the peak GEMM."""
    n = 8192 if s.device == "cuda" else 1536
    dtype = s.dtype if s.device == "cuda" else torch.float32
    a = torch.randn(n, n, device=s.device, dtype=dtype)
    b = torch.randn(n, n, device=s.device, dtype=dtype)
    out = torch.empty(n, n, device=s.device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2 * n**3


def run(s: Shapes) -> list[Row]:
    x, y = batch_for(s, s.depth_img_size, s.depth_batch)
    cases, flops = {}, {}
    cases["peak"], flops["peak"] = gemm(s)
    for depth in s.depths:
        torch.manual_seed(0)
        model = create_model(s.depth_model, img_size=s.depth_img_size, num_classes=s.num_classes, depth=depth)
        model = model.to(s.device).train()
        cases[depth] = train_step(model, lambda m: F.cross_entropy(m(x).float(), y), s)
        _, forward = model_stats(s.depth_model, s.depth_img_size, depth=depth, num_classes=s.num_classes)
        flops[depth] = 3 * forward * s.depth_batch
    t = time_interleaved(cases, s.warmup, s.reps)
    rate = {k: flops[k] / t[k].median / 1e9 for k in cases}  # GFLOP/s
    per_round = {k: [flops[k] / v / 1e9 for v in t[k].samples] for k in cases}
    first = s.depths[0]
    where = f"{s.depth_model} width at depth d, {describe(s, s.depth_img_size, s.depth_batch)}, AdamW"
    mfu = {d: rate[d] / rate["peak"] for d in s.depths}
    sheet = datasheet_peak()
    sheet_note = "" if sheet is None else (f"; against the datasheet bf16 peak ({sheet / 1e12:.0f} TFLOP/s): MFU "
                                           + ", ".join(f"depth {d} {rate[d] * 1e9 / sheet:.1%}" for d in s.depths))
    rows = [
        Row(GROUP, f"depth {first}: MFU = training FLOP/s / measured matmul peak", "matmul peak", rate["peak"], f"depth {first}",
            rate[first], "GFLOP/s", band=_band(per_round[first], per_round["peak"]),
            note=f"{where}; {flops[first] / s.depth_batch / 1e9:.2f} GFLOP per image per step; "
                 f"peak = {'bf16' if s.device == 'cuda' else 'fp32'} GEMM, {torch.get_num_threads()} thread(s){sheet_note}"),
    ]
    for depth in s.depths[1:]:
        rows.append(Row(GROUP, f"depth {depth} vs depth {first}: training FLOP/s (MFU {mfu[depth]:.1%} vs {mfu[first]:.1%})",
                        f"depth {first}", rate[first], f"depth {depth}", rate[depth], "GFLOP/s", goal=(">=", 0.9),
                        band=_band(per_round[depth], per_round[first])))
    rows[0].extra["mfu"] = {str(k): v for k, v in mfu.items()}
    return rows


def _band(ours: list[float], baseline: list[float]) -> tuple[float, float]:
    """IQR of the per-round ratio of two FLOP rates."""
    return quartile_band([o / b for o, b in zip(ours, baseline)])


if __name__ == "__main__":
    standalone(run, "Hardware utilisation: training FLOP/s over matmul peak, by depth")
