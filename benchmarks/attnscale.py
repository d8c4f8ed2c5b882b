"""Row 3, AttnScale: the fused form against the explicit N×N form, at 197 and 577 tokens.

One vitdeep `Attention(attn_scale_layer=AttnScale)` module, forward + backward in train mode without
dropout. The fused form is its default path: `(1+ω)·SDPA(q,k,v) − ω·mean_tokens(v)`. The
explicit form is the same module with `need_weights=True`, which builds the attention matrix as
the official AttnScale code does — `softmax(q·kᵀ·scale)`, then `U + (1+ω)(A − U)`, then `Â·V` —
so both run the same projections and differ only in the attention core.

Memory is the peak of tensor bytes allocated during one forward + backward above what was live
before it (CUDA: `max_memory_allocated`; CPU: the profiler's allocation events, see
`common.peak_memory`). The note gives the size of one B×H×N×N matrix for scale.

    .venv/bin/python benchmarks/attnscale.py [--quick]
"""

from __future__ import annotations

import torch
from common import Row, Shapes, mb, peak_memory, ratio_band, standalone, time_interleaved

from vitdeep.models.layers import Attention, AttnScale

GROUP = "3 AttnScale fused"


def run(s: Shapes) -> list[Row]:
    dtype = s.dtype  # fp32 on CPU (the shapes' own), bf16 on CUDA
    rows = []
    for tokens, batch in s.attn_batch.items():
        torch.manual_seed(0)
        attn = Attention(s.attn_dim, s.attn_heads, attn_scale_layer=AttnScale).to(s.device, dtype).train()
        with torch.no_grad():
            attn.attn_scale.omega.uniform_(-0.5, 0.5)  # a trained-looking ω (0 would be vanilla attention)
        x = torch.randn(batch, tokens, s.attn_dim, device=s.device, dtype=dtype, requires_grad=True)
        grad = torch.randn(batch, tokens, s.attn_dim, device=s.device, dtype=dtype)
        with torch.no_grad():
            difference = (attn(x)[0] - attn(x, need_weights=True)[0]).abs().max().item()

        def step(need_weights: bool) -> None:
            out, _ = attn(x, need_weights=need_weights)
            out.backward(grad)
            x.grad = None
            attn.zero_grad(set_to_none=True)

        cases = {"explicit": lambda: step(True), "fused": lambda: step(False)}
        t = time_interleaved(cases, s.warmup, s.reps * 2)
        memory = {name: peak_memory(fn) for name, fn in cases.items()}
        matrix = batch * s.attn_heads * tokens * tokens * x.element_size()
        shape = f"width {s.attn_dim}, {s.attn_heads} heads, batch {batch}, {str(dtype).removeprefix('torch.')}"
        rows.append(Row(GROUP, f"{tokens} tokens, forward + backward time: fused vs explicit N×N", "explicit N×N", t["explicit"].median * 1e3,
                        "fused", t["fused"].median * 1e3, "ms", goal=("<=", 1.0),
                        band=ratio_band(t["explicit"], t["fused"], higher_is_better=False),
                        note=f"{shape}; outputs agree to {difference:.1e}"))
        rows.append(Row(GROUP, f"{tokens} tokens, forward + backward peak memory: fused vs explicit N×N", "explicit N×N", mb(memory["explicit"]),
                        "fused", mb(memory["fused"]), "MB", goal=("<=", 1.0),
                        note=f"one B×H×N×N matrix is {mb(matrix):.1f} MB"))
    return rows


if __name__ == "__main__":
    standalone(run, "AttnScale: fused form vs explicit N×N form")
