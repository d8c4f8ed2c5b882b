"""Row 1, model speed: a vitdeep `deit_*_12` training step against timm's identical ViT.

Both models have the same architecture, the same weights (timm's is loaded from vitdeep's state
dict, strictly), the same batch, dtype and optimizer (AdamW); a step is forward + cross-entropy +
backward + AdamW, in train mode. Goal: vitdeep images/s ≥ timm's.

    .venv/bin/python benchmarks/model_speed.py [--quick]
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from common import PUBLISHED_ANCHORS, Row, Shapes, batch_for, describe, ratio_band, standalone, time_interleaved, train_step
from vitdeep.models import create_model
from vitdeep.models.registry import TIMM_TWINS

GROUP = "1 model speed"


def twin_models(s: Shapes) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """vitdeep's model and timm's twin with the same weights, both in train mode on the device."""
    twin = TIMM_TWINS[s.model]
    torch.manual_seed(0)
    ours = create_model(s.model, img_size=s.img_size, num_classes=s.num_classes)
    theirs = timm.create_model(twin, pretrained=False, img_size=s.img_size, num_classes=s.num_classes)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(s.device).train(), theirs.to(s.device).train(), twin


def run(s: Shapes) -> list[Row]:
    ours, theirs, twin = twin_models(s)
    x, y = batch_for(s)
    with torch.no_grad():
        ours.eval(), theirs.eval()
        difference = (ours(x) - theirs(x)).abs().max().item()
        ours.train(), theirs.train()

    def loss(model):
        return F.cross_entropy(model(x).float(), y)

    steps = {"timm": train_step(theirs, loss, s), "vitdeep": train_step(ours, loss, s)}
    t = time_interleaved(steps, s.warmup, s.reps)
    ips = {name: s.batch / timing.median for name, timing in t.items()}
    anchor = f"; published: {PUBLISHED_ANCHORS}" if s.device == "cuda" else ""
    return [
        Row(GROUP, f"{s.model} train step vs timm {twin}", "timm", ips["timm"], "vitdeep", ips["vitdeep"], "img/s",
            goal=(">=", 1.0), band=ratio_band(t["timm"], t["vitdeep"], higher_is_better=True),
            note=f"{describe(s)}, AdamW; same weights (max |logit difference| {difference:.1e}); "
                 f"spread (IQR/median) timm {t['timm'].spread:.0%}, vitdeep {t['vitdeep'].spread:.0%}{anchor}",
            extra={"step_ms": {k: v.median * 1e3 for k, v in t.items()}, "samples_s": {k: v.samples for k, v in t.items()}}),
    ]


if __name__ == "__main__":
    standalone(run, "Model speed: vitdeep vs timm, training step")
