"""Row 2, remedy overhead: training-step time with each over-smoothing remedy against the plain model.

Every case runs the training loop's own path — `model(x, aux=True)` and vitdeep's `Objective` —
on the same patch-aligned CutMix batch (soft image targets and one label per patch), with AdamW:

- plain: the model without options, cross-entropy only (the baseline of every row);
- talking heads, AttnScale, FeatScale: the option alone, cross-entropy only;
- losses: ℓ_ce + ℓ_cos + ℓ_cons + ℓ_token (weights 1; `patch_head=True`);
- losses + AttnScale + FeatScale: everything but talking heads — the row with the goal (≤ +10 %).

An extra row prices the aux path itself: `model(x, aux=True)` + Objective (CE only) against
`model(x)` + cross-entropy.

    .venv/bin/python benchmarks/remedies.py [--quick]
"""

from __future__ import annotations

import torch
from common import Row, Shapes, batch_for, describe, ratio_band, standalone, time_interleaved, train_step

from vitdeep.data.mixing import MixConfig, build_mixer
from vitdeep.losses import Objective, ObjectiveConfig, soft_target_cross_entropy
from vitdeep.models import create_model

GROUP = "2 remedy overhead"
CE_ONLY = ObjectiveConfig(cos_weight=0.0, contrastive_weight=0.0, patch_mix_weight=0.0)
ALL_LOSSES = ObjectiveConfig(cos_weight=1.0, contrastive_weight=1.0, patch_mix_weight=1.0)

#: case → (model options, objective config)
CASES = {
    "plain": ({}, CE_ONLY),
    "talking heads": ({"talking_heads": True}, CE_ONLY),
    "AttnScale": ({"attnscale": True}, CE_ONLY),
    "FeatScale": ({"featscale": True}, CE_ONLY),
    "losses (ℓ_cos + ℓ_cons + ℓ_token)": ({"patch_head": True}, ALL_LOSSES),
    "losses + AttnScale + FeatScale": ({"patch_head": True, "attnscale": True, "featscale": True}, ALL_LOSSES),
}
GOAL_CASE = "losses + AttnScale + FeatScale"


def mixed_batch(s: Shapes):
    """A patch-aligned CutMix batch: images, soft targets [B, C], patch labels [B, n]."""
    x, y = batch_for(s)
    mixer = build_mixer(MixConfig(mixup=0.0, cutmix=1.0, patch_aligned=True), s.num_classes, s.img_size, 16, 0.1)
    torch.manual_seed(0)
    mixed = mixer(x, y)
    return mixed.images, mixed.targets, mixed.patch_labels


def run(s: Shapes) -> list[Row]:
    x, targets, patch_labels = mixed_batch(s)
    steps = {}
    for case, (options, objective_cfg) in CASES.items():
        torch.manual_seed(0)
        model = create_model(s.model, img_size=s.img_size, num_classes=s.num_classes, **options).to(s.device).train()
        objective = Objective(objective_cfg)

        def loss(m, objective=objective):
            return objective(m(x, aux=True), targets, patch_labels=patch_labels)[0]

        steps[case] = train_step(model, loss, s)
    torch.manual_seed(0)
    plain_model = create_model(s.model, img_size=s.img_size, num_classes=s.num_classes).to(s.device).train()
    steps["model(x) + CE"] = train_step(plain_model, lambda m: soft_target_cross_entropy(m(x), targets), s)

    t = time_interleaved(steps, s.warmup, s.reps)
    ms = {name: timing.median * 1e3 for name, timing in t.items()}
    where = f"{s.model}, {describe(s)}, AdamW"
    rows = [
        Row(GROUP, "aux path: model(x, aux=True) + Objective (CE only) vs model(x) + CE", "model(x)", ms["model(x) + CE"],
            "aux + Objective", ms["plain"], "ms", band=ratio_band(t["model(x) + CE"], t["plain"], higher_is_better=False),
            note=f"{where}; the baseline of the rows below is the aux path with CE only"),
    ]
    for case in CASES:
        if case == "plain":
            continue
        goal = ("<=", 1.10) if case == GOAL_CASE else None
        rows.append(Row(GROUP, f"{case} vs plain + CE", "plain", ms["plain"], case.split(" (")[0], ms[case], "ms", goal=goal,
                        band=ratio_band(t["plain"], t[case], higher_is_better=False),
                        note=where if case == GOAL_CASE else ""))
    rows[-1].extra["step_ms"] = ms
    return rows


if __name__ == "__main__":
    standalone(run, "Remedy overhead: step time against the plain model with CE")
