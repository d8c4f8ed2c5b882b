"""The weights of the training objective, and their defaults.

Free of torch (`vitdeep.losses` imports this module, not the other way round), so that the run
config and the command line's `--help` read the defaults without importing the losses.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitdeep.errors import UserError
from vitdeep.fields import BELOW_1, MAX_WEIGHT, PROBABILITY, Checked, above, at_least, option, shown

DISTILL_KINDS = ("none", "soft", "hard")
WEIGHT = at_least(0, MAX_WEIGHT)


@dataclass
class ObjectiveConfig(Checked):
    """Weights of the training objective. Defaults are the paper's best combination,
    ℓ_ce + ℓ_cutmix (patch mixing) + ℓ_cons with weights 1, ℓ_cos off, no distillation."""

    cos_weight: float = option(0.0, "Weight of ℓ_cos, the last layer's patch cosine similarity.", WEIGHT)
    contrastive_weight: float = option(1.0, "Weight of ℓ_cons, the contrast of last-layer patch tokens against the patch embeddings.", WEIGHT)
    patch_mix_weight: float = option(1.0, "Weight of ℓ_token, the per-patch CE of a patch head after patch-aligned CutMix.", WEIGHT)
    label_smoothing: float = option(0.1, "Label smoothing of integer labels (class and patch heads).", BELOW_1)
    distill: str = option("none", "DeiT distillation from a teacher's logits: none, soft or hard.")
    distill_alpha: float = option(0.5, "Distillation share α: (1 − α)·CE + α·teacher term.", PROBABILITY)
    distill_tau: float = option(1.0, "Temperature τ of soft distillation.", above(0, MAX_WEIGHT))

    def check(self) -> None:
        if self.distill not in DISTILL_KINDS:
            raise UserError(f"`distill`={shown(self.distill)} must be one of {', '.join(DISTILL_KINDS)}", params=("distill",))
