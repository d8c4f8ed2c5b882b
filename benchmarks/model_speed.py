"""Row 1, model speed: a vitdeep DeiT training step against timm's identical ViT, at each image size
of the machine's shapes (CPU: `deit_small_12` at 64 px; CUDA: `deit_base_24` at 224 and 384 px).

Both models have the same architecture (timm's twin of the depth-12 model, built at the same
depth), the same weights (timm's is loaded from vitdeep's state dict, strictly), the same batch,
dtype and optimizer (AdamW); a step is forward + cross-entropy + backward + AdamW, in train mode.
Goal: vitdeep images/s ≥ timm's. Where the GPU's datasheet bf16 peak is known, a second row per
size gives vitdeep's MFU: training FLOP/s (3 × the forward FLOPs `model_stats` counts) over it.

    .venv/bin/python benchmarks/model_speed.py [--quick]
"""

from __future__ import annotations

import re

import timm
import torch
import torch.nn.functional as F

from common import PUBLISHED_ANCHORS, Row, Shapes, batch_for, datasheet_peak, describe, ratio_band, standalone, time_interleaved, train_step
from vitdeep.models import create_model, get_spec, model_stats
from vitdeep.models.registry import TIMM_TWINS

GROUP = "1 model speed"


def timm_twin(name: str) -> tuple[str, int]:
    """timm's model of the same family and width, and the depth to build it at."""
    return TIMM_TWINS[re.sub(r"_\d+$", "_12", name)], get_spec(name).depth


def twin_models(s: Shapes, img_size: int) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """vitdeep's model and timm's twin with the same weights, both in train mode on the device."""
    twin, depth = timm_twin(s.model)
    torch.manual_seed(0)
    ours = create_model(s.model, img_size=img_size, num_classes=s.num_classes)
    theirs = timm.create_model(twin, pretrained=False, img_size=img_size, num_classes=s.num_classes, depth=depth)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(s.device).train(), theirs.to(s.device).train(), twin


def run(s: Shapes) -> list[Row]:
    rows = []
    peak = datasheet_peak()
    for img_size, batch in s.speed_batches.items():
        ours, theirs, twin = twin_models(s, img_size)
        x, y = batch_for(s, img_size, batch)
        with torch.no_grad():
            ours.eval(), theirs.eval()
            difference = (ours(x) - theirs(x)).abs().max().item()
            ours.train(), theirs.train()

        def loss(model, x=x, y=y):
            return F.cross_entropy(model(x).float(), y)

        steps = {"timm": train_step(theirs, loss, s), "vitdeep": train_step(ours, loss, s)}
        t = time_interleaved(steps, s.warmup, s.reps)
        ips = {name: batch / timing.median for name, timing in t.items()}
        anchor = f"; published (depth 12): {PUBLISHED_ANCHORS}" if s.device == "cuda" else ""
        twin_name = f"{twin} (depth {get_spec(s.model).depth})" if get_spec(s.model).depth != 12 else twin
        rows.append(Row(
            GROUP, f"{s.model} train step vs timm {twin_name}" + (f", {img_size} px" if len(s.speed_batches) > 1 else ""),
            "timm", ips["timm"], "vitdeep", ips["vitdeep"], "img/s",
            goal=(">=", 1.0), band=ratio_band(t["timm"], t["vitdeep"], higher_is_better=True),
            note=f"{describe(s, img_size, batch)}, AdamW; same weights (max |logit difference| {difference:.1e}); "
                 f"spread (IQR/median) timm {t['timm'].spread:.0%}, vitdeep {t['vitdeep'].spread:.0%}{anchor}",
            extra={"step_ms": {k: v.median * 1e3 for k, v in t.items()}, "samples_s": {k: v.samples for k, v in t.items()}}))
        if peak is not None:
            _, forward = model_stats(s.model, img_size, num_classes=s.num_classes)
            flops = {name: 3 * forward * value for name, value in ips.items()}
            rows.append(Row(GROUP, f"{s.model}, {img_size} px: MFU = training FLOP/s / datasheet bf16 peak "
                                   f"(timm {flops['timm'] / peak:.1%})",
                            "datasheet peak", peak / 1e9, "vitdeep", flops["vitdeep"] / 1e9, "GFLOP/s",
                            note=f"{3 * forward / 1e9:.1f} GFLOP per image per training step"))
        del ours, theirs, steps
    return rows


if __name__ == "__main__":
    standalone(run, "Model speed: vitdeep vs timm, training step")
