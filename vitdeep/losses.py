"""The training objective: cross-entropy plus the anti-over-smoothing losses (Gong et al. 2021)
and DeiT distillation.

Every function takes tensors, not models, and computes in float32 whatever the model's dtype
(the contrastive dot products overflow bf16's precision). Formulas: docs/method.md §2 and §3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitdeep.errors import UserError
from vitdeep.loss_options import ObjectiveConfig
from vitdeep.outputs import AuxOutput

def patch_cosine_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """CosSim of each token sequence `[..., n, D]` → `[...]`: the mean signed cosine over pairs i≠j.

    O(n·d): with unit vectors ĥ_i, Σ_{i≠j} ĥ_iᵀĥ_j = ‖Σ_i ĥ_i‖² − Σ_i ‖ĥ_i‖² (the last sum is n
    unless a token is exactly zero, which then counts as orthogonal to all). The one
    implementation of the formula, shared by ℓ_cos and the diagnostics.
    """
    n = tokens.shape[-2]
    if n < 2:
        raise UserError(f"patch cosine similarity needs at least 2 patch tokens, got {n}")
    unit = F.normalize(tokens.float(), dim=-1)
    pair_sum = unit.sum(dim=-2).square().sum(dim=-1) - unit.square().sum(dim=(-2, -1))
    return pair_sum / (n * (n - 1))


def cosine_similarity_loss(tokens: torch.Tensor) -> torch.Tensor:
    """ℓ_cos = CosSim of the last layer's patch tokens `[B, n, D]`, averaged over images."""
    return patch_cosine_similarity(tokens).mean()


def patch_contrastive_loss(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """ℓ_cons = −1/n Σ_i log(exp(e_iᵀh_i) / (exp(e_iᵀh_i) + exp(e_iᵀh̄))), averaged over images.

    `first` = e `[B, n, D]`, the patch embedding before the position embedding is added, as in the
    authors' code (`AuxOutput.patch_embeddings`; detached here: the loss pulls the last layer
    towards the first, never the reverse); `last` = h, the last layer's patch tokens; h̄ is the
    mean of all n of them, as in the paper's formula (the released code takes the mean over the
    other n − 1 patches, 0.1 % apart at n = 196). Raw dot products, no temperature;
    −log(eᵖ/(eᵖ+e^q)) = softplus(q − p).
    """
    if first.shape != last.shape:
        raise ValueError(f"first- and last-layer patch tokens differ in shape: {list(first.shape)} vs {list(last.shape)}")
    e = first.detach().float()
    h = last.float()
    positive = (e * h).sum(dim=-1)
    negative = (e * h.mean(dim=-2, keepdim=True)).sum(dim=-1)
    return F.softplus(negative - positive).mean()


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a distribution per row (timm's `SoftTargetCrossEntropy`)."""
    return -(targets.float() * logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """CE of `logits [B, C]` against int labels `[B]` (smoothed) or soft targets `[B, C]`.

    Soft targets come from Mixup / CutMix, which already smoothed them, so they are used as given.
    """
    if targets.is_floating_point():
        return soft_target_cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def patch_mixing_loss(patch_logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """ℓ_token = 1/n Σ_i CE(g(h_i), y_i): mean per-patch cross-entropy of the patch head `[B, n, C]`.

    `targets` are the per-patch labels of a patch-aligned CutMix (int64 `[B, n]`, smoothed here),
    or one soft target per image (float `[B, C]`, e.g. after Mixup) given to each of its patches.
    """
    batch, n, classes = patch_logits.shape
    if targets.is_floating_point():
        if targets.shape != (batch, classes):
            raise ValueError(f"soft targets must be [B, C] = {[batch, classes]}, got {list(targets.shape)}")
        return soft_target_cross_entropy(patch_logits, targets[:, None, :].expand(batch, n, classes))
    if targets.shape != (batch, n):
        raise ValueError(f"patch labels must be [B, n] = {[batch, n]}, got {list(targets.shape)}")
    return F.cross_entropy(patch_logits.reshape(-1, classes).float(), targets.reshape(-1), label_smoothing=label_smoothing)


def pair_mixed_patch_loss(patch_logits: torch.Tensor, patch_labels: torch.Tensor, targets: torch.Tensor,
                          soft: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """ℓ_token of a batch mixed in pairs: the patches of a sample that Mixup blended (`soft` [B])
    take its soft image target (`targets` [B, C]), every other patch its source's label
    (`patch_labels` [B, n], smoothed); the mean over all patches, as `patch_mixing_loss`."""
    logp = F.log_softmax(patch_logits.float(), dim=-1)
    off = label_smoothing / patch_logits.shape[-1]
    hard = -(1.0 - label_smoothing) * logp.gather(-1, patch_labels.unsqueeze(-1)).squeeze(-1) - off * logp.sum(-1)
    blended = -(logp * targets[:, None, :].float()).sum(-1)
    return torch.where(soft[:, None], blended, hard).mean()


def teacher_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "soft", tau: float = 1.0) -> torch.Tensor:
    """The distillation term alone (DeiT): `soft` = τ²·KL(σ(t/τ) ‖ σ(z/τ)) summed over the batch
    and divided by the number of logits B·C, exactly as DeiT's code normalises it, so DeiT's α and τ
    carry over (the per-image KL is C times larger); `hard` = CE(z, argmax t). The teacher gets no
    gradient.
    """
    teacher = teacher_logits.detach().float()
    if kind == "hard":
        return F.cross_entropy(student_logits.float(), teacher.argmax(dim=-1))
    if kind == "soft":
        student_log = (student_logits.float() / tau).log_softmax(dim=-1)
        teacher_log = (teacher / tau).log_softmax(dim=-1)
        kl_sum = F.kl_div(student_log, teacher_log, reduction="sum", log_target=True)
        return kl_sum * tau**2 / student_logits.numel()
    raise UserError(f"unknown distillation kind '{kind}' (choose from soft, hard)")


def distillation_weights(alpha: float) -> dict[str, float]:
    """DeiT's loss blends the label and teacher terms: (1 − α)·CE(z_cls, y) + α·teacher term on
    z_dist (the distillation-token head, or the class head when there is none); hard with α = 0.5
    is DeiT's best."""
    return {"ce": 1.0 - alpha, "distill": alpha}


class Objective:
    """The total loss of one step and each of its terms by name, for logging.

    `objective(out, targets, patch_labels, teacher_logits)` → `(total, terms)`; `terms` holds the
    active terms ("ce", "cos", "contrastive", "patch_mix", "distill") unweighted and detached.
    `needs_patch_head` / `needs_teacher` tell the trainer what the model and data must provide.
    """

    def __init__(self, cfg: ObjectiveConfig | None = None) -> None:
        self.cfg = cfg or ObjectiveConfig()

    @property
    def needs_patch_head(self) -> bool:
        """Build the model with `patch_head=True` and mix batches with patch-aligned CutMix."""
        return self.cfg.patch_mix_weight > 0

    @property
    def needs_teacher(self) -> bool:
        return self.cfg.distill != "none"

    @property
    def weights(self) -> dict[str, float]:
        """Weight of each active term in the total."""
        cfg = self.cfg
        weights = distillation_weights(cfg.distill_alpha) if self.needs_teacher else {"ce": 1.0}
        extra = {"cos": cfg.cos_weight, "contrastive": cfg.contrastive_weight, "patch_mix": cfg.patch_mix_weight}
        return weights | {name: weight for name, weight in extra.items() if weight > 0}

    def __call__(
        self,
        out: AuxOutput,
        targets: torch.Tensor,
        patch_labels: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        patch_soft: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weights = self.weights
        terms = {
            "ce": lambda: classification_loss(out.logits, targets, self.cfg.label_smoothing),
            "cos": lambda: cosine_similarity_loss(out.patch_tokens(-1)),
            "contrastive": lambda: patch_contrastive_loss(out.patch_embeddings, out.patch_tokens(-1)),
            "patch_mix": lambda: self._patch_mix(out, targets, patch_labels, patch_soft),
            "distill": lambda: self._distill(out, teacher_logits),
        }
        values = {name: terms[name]() for name in weights}
        total = sum(weights[name] * value for name, value in values.items())
        return total, {name: value.detach() for name, value in values.items()}

    def _patch_mix(self, out: AuxOutput, targets: torch.Tensor, patch_labels: torch.Tensor | None,
                   patch_soft: torch.Tensor | None) -> torch.Tensor:
        """Per-patch labels when the batch was patch-aligned-CutMix-ed, else the image's target;
        per sample when it was mixed in pairs (`patch_soft`: the samples Mixup blended)."""
        if out.patch_logits is None:
            raise UserError("patch_mix_weight > 0 needs a model built with patch_head=True")
        if patch_soft is not None:
            return pair_mixed_patch_loss(out.patch_logits, patch_labels, targets, patch_soft, self.cfg.label_smoothing)
        if patch_labels is None:
            patch_labels = targets if targets.is_floating_point() else targets[:, None].expand(out.patch_logits.shape[:2])
        return patch_mixing_loss(out.patch_logits, patch_labels, self.cfg.label_smoothing)

    def _distill(self, out: AuxOutput, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        """Teacher term on the distillation-token head (the class head when there is none)."""
        if teacher_logits is None:
            raise UserError(f"distill='{self.cfg.distill}' needs a teacher's logits")
        student = out.logits if out.dist_logits is None else out.dist_logits
        return teacher_loss(student, teacher_logits, self.cfg.distill, self.cfg.distill_tau)
