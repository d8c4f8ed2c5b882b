"""The weights of the training objective, and their defaults.

Free of torch (`vitdeep.losses` imports this module, not the other way round), so that the run
config and the command line's `--help` read the defaults without importing the losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vitdeep.errors import UserError

DISTILL_KINDS = ("none", "soft", "hard")


@dataclass
class ObjectiveConfig:
    """Weights of the training objective. Defaults are the paper's best combination,
    ℓ_ce + ℓ_cutmix (patch mixing) + ℓ_cons with weights 1, ℓ_cos off, no distillation."""

    cos_weight: float = field(default=0.0, metadata={"help": "Weight of ℓ_cos, the last layer's patch cosine similarity."})
    contrastive_weight: float = field(
        default=1.0, metadata={"help": "Weight of ℓ_cons, the contrast of last-layer patch tokens against the patch embeddings."}
    )
    patch_mix_weight: float = field(
        default=1.0, metadata={"help": "Weight of ℓ_token, the per-patch CE of a patch head after patch-aligned CutMix."}
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of integer labels (class and patch heads)."})
    distill: str = field(
        default="none", metadata={"help": "DeiT distillation from a teacher's logits: none, soft or hard.", "choices": DISTILL_KINDS}
    )
    distill_alpha: float = field(default=0.5, metadata={"help": "Distillation share α: (1 − α)·CE + α·teacher term."})
    distill_tau: float = field(default=1.0, metadata={"help": "Temperature τ of soft distillation."})

    def __post_init__(self) -> None:
        for name in ("cos_weight", "contrastive_weight", "patch_mix_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"`{name}`={getattr(self, name)} must be >= 0", params=(name,))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"`label_smoothing`={self.label_smoothing} must be in [0, 1)", params=("label_smoothing",))
        if self.distill not in DISTILL_KINDS:
            raise UserError(f"`distill`='{self.distill}' must be one of {', '.join(DISTILL_KINDS)}", params=("distill",))
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise UserError(f"`distill_alpha`={self.distill_alpha} must be in [0, 1]", params=("distill_alpha",))
        if self.distill_tau <= 0:
            raise UserError(f"`distill_tau`={self.distill_tau} must be > 0", params=("distill_tau",))
