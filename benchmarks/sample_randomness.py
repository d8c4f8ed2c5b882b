"""The cost of drawing randomness per sample (the lane order's elastic runs) against timm's per batch.

A training run in the lane order draws each sample's random erasing and drop-path masks, and each
pair's Mixup / CutMix, from seeds of their global positions (`vitdeep.data.seeding`), so that the
draws do not depend on the micro-batch a sample lands in; timm draws them once per batch from the
process's generators. Three rows, each against timm's way in the same process: random erasing of a
batch, patch-aligned Mixup / CutMix of a batch, and a whole training step (erasing, mixing, forward
and backward of a deep model with drop path 0.1).

    .venv/bin/python benchmarks/sample_randomness.py
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from common import Row, Shapes, describe, ratio_band, standalone, time_interleaved

from vitdeep.data.mixing import Mixer
from vitdeep.data.options import AugmentConfig, MixConfig
from vitdeep.data.pipeline import BatchPreprocessor
from vitdeep.data.seeding import DROP_PATH, uniforms
from vitdeep.losses import Objective
from vitdeep.loss_options import ObjectiveConfig
from vitdeep.models import create_model
from vitdeep.models.layers import drop_path_layers, sample_drop_paths

GROUP = "9 per-sample randomness"


def run(s: Shapes) -> list[Row]:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (s.batch, 3, s.img_size, s.img_size), dtype=torch.uint8, device=s.device)
    labels = torch.randint(0, s.num_classes, (s.batch,), device=s.device)
    seeds = torch.randint(-2**62, 2**62, (s.batch,), dtype=torch.int64)
    preprocess = BatchPreprocessor(AugmentConfig(reprob=0.25), s.device)
    patch = 16 if s.img_size % 16 == 0 else 4
    mixer = Mixer(MixConfig(mixup=0.8, cutmix=1.0, patch_aligned=True), s.num_classes, s.img_size, patch, label_smoothing=0.1)
    x = preprocess(images)
    rows = []

    cases = {"per batch": lambda: preprocess(images, train=True), "per sample": lambda: preprocess(images, train=True, seeds=seeds)}
    t = time_interleaved(cases, s.warmup, s.reps * 2)
    rows.append(_row("normalise + random erasing (0.25) of a batch", t, s))

    cases = {"per batch": lambda: mixer(x.clone(), labels), "per sample": lambda: mixer(x.clone(), labels, seeds)}
    t = time_interleaved(cases, s.warmup, s.reps * 2)
    rows.append(_row("patch-aligned Mixup / CutMix of a batch", t, s))

    model = create_model(s.model.replace("_12", "_24"), img_size=s.img_size, patch_size=patch, num_classes=s.num_classes,
                         drop_path_rate=0.1, patch_head=True).to(s.device).train()
    objective = Objective(ObjectiveConfig(label_smoothing=0.1, cos_weight=1.0, contrastive_weight=1.0, patch_mix_weight=1.0))
    layers = len(drop_path_layers(model))

    def step(per_sample: bool) -> None:
        batch_seeds = seeds if per_sample else None
        inputs = preprocess(images, train=True, seeds=batch_seeds)
        mixed = mixer(inputs, labels, batch_seeds)
        draws = torch.from_numpy(uniforms(seeds, DROP_PATH, layers)).to(s.device, torch.float32) if per_sample else None
        with sample_drop_paths(model, draws) if per_sample else nullcontext():
            with torch.autocast(s.device, s.dtype, enabled=s.autocast):
                out = model(mixed.images, aux=True)
            loss, _ = objective(out, mixed.targets, patch_labels=mixed.patch_labels, patch_soft=mixed.patch_soft)
            loss.backward()
        model.zero_grad(set_to_none=True)

    cases = {"per batch": lambda: step(False), "per sample": lambda: step(True)}
    t = time_interleaved(cases, s.warmup, s.reps)
    rows.append(_row(f"training step of {s.model.replace('_12', '_24')} (drop path 0.1, erasing, mixing, the losses)", t, s,
                     goal=("<=", 1.05)))
    return rows


def _row(name: str, t: dict, s: Shapes, goal: tuple[str, float] | None = None) -> Row:
    """The goal is on the step: the parts alone do per-sample work that a batch-wide draw skips
    (tens of microseconds per image), which only the step can put in proportion."""
    return Row(GROUP, f"{name}: per sample vs per batch", "per batch (timm)", t["per batch"].median * 1e3,
               "per sample", t["per sample"].median * 1e3, "ms", goal=goal,
               band=ratio_band(t["per batch"], t["per sample"], higher_is_better=False), note=describe(s))


if __name__ == "__main__":
    standalone(run, GROUP)
