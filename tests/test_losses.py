"""The losses at their known values (docs/method.md §1-§3), their gradients, and the Objective."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from vitdeep.errors import UserError
from vitdeep.losses import (
    Objective,
    ObjectiveConfig,
    cosine_similarity_loss,
    patch_contrastive_loss,
    patch_cosine_similarity,
    patch_mixing_loss,
    teacher_loss,
)
from vitdeep.models import AuxOutput, create_model


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pairwise_cossim(tokens: torch.Tensor) -> torch.Tensor:
    """The definition: 1/(n(n-1)) Σ_{i≠j} cos(h_i, h_j), per sequence, O(n²·d)."""
    n = tokens.shape[-2]
    cos = F.cosine_similarity(tokens[..., :, None, :], tokens[..., None, :, :], dim=-1)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    return cos[..., off_diagonal].sum(-1) / (n * (n - 1))


# ---- ℓ_cos / CosSim -----------------------------------------------------------------------------


def test_cossim_known_values():
    h = torch.randn(1, 1, 16, generator=_gen())
    identical = h.expand(2, 10, 16)
    orthonormal = torch.eye(12)[None, :8] * 3.0  # 8 orthogonal tokens (scale must not matter)
    opposite = torch.cat([h, -h], dim=1)
    assert patch_cosine_similarity(identical).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert patch_cosine_similarity(orthonormal).item() == pytest.approx(0.0, abs=1e-7)
    assert patch_cosine_similarity(opposite).item() == pytest.approx(-1.0, abs=1e-6)
    assert cosine_similarity_loss(identical).item() == pytest.approx(1.0, abs=1e-6)


def test_cossim_linear_form_equals_pairwise_definition():
    tokens = torch.randn(4, 50, 32, generator=_gen(1)) + 0.3  # shifted: values away from 0
    fast, slow = patch_cosine_similarity(tokens), _pairwise_cossim(tokens)
    print(f"CosSim O(n·d) {fast.tolist()} vs pairwise {slow.tolist()}")
    assert torch.allclose(fast, slow, atol=1e-6)
    assert fast.abs().min() > 0.01  # a non-trivial comparison


def test_cossim_is_float32_from_bf16_and_needs_two_patches():
    tokens = torch.randn(2, 16, 8, generator=_gen(2)).bfloat16()
    value = patch_cosine_similarity(tokens)
    assert value.dtype == torch.float32
    assert torch.allclose(value, _pairwise_cossim(tokens.float()), atol=1e-6)
    with pytest.raises(UserError, match="at least 2 patch tokens"):
        patch_cosine_similarity(torch.randn(2, 1, 8))


def test_cos_loss_gradient_lowers_cossim():
    tokens = torch.randn(2, 9, 8, generator=_gen(3)).add(1.0).requires_grad_()
    loss = cosine_similarity_loss(tokens)
    loss.backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    with torch.no_grad():
        assert cosine_similarity_loss(tokens - 0.1 * tokens.grad) < loss


# ---- ℓ_cons ------------------------------------------------------------------------------------


def test_contrastive_known_values():
    identical = torch.randn(1, 1, 6, generator=_gen(4)).expand(3, 8, 6)
    first = torch.randn(3, 8, 6, generator=_gen(5))
    assert patch_contrastive_loss(first, identical).item() == pytest.approx(math.log(2), abs=1e-6)
    n, s = 8, 1.5
    one_hot = s * torch.eye(n)[None]
    expected = math.log1p(math.exp(-s * s * (n - 1) / n))
    assert expected == pytest.approx(0.13071, abs=1e-5)
    assert patch_contrastive_loss(one_hot, one_hot).item() == pytest.approx(expected, abs=1e-6)


def test_contrastive_detaches_first_layer_and_trains_last():
    first = torch.randn(2, 8, 16, generator=_gen(6)).requires_grad_()
    last = torch.randn(2, 8, 16, generator=_gen(7)).requires_grad_()
    patch_contrastive_loss(first, last).backward()
    assert first.grad is None
    assert last.grad is not None and last.grad.abs().sum() > 0


def test_contrastive_gradient_only_through_last_layer_path():
    """With e = h the same tensor, the gradient is the one through h alone, unlike an undetached e."""
    x = (0.3 * torch.randn(2, 8, 16, generator=_gen(8))).requires_grad_()  # unsaturated softplus
    patch_contrastive_loss(x, x).backward()
    detached_grad, x.grad = x.grad.clone(), None
    patch_contrastive_loss(x.detach().clone(), x).backward()
    assert torch.allclose(detached_grad, x.grad)
    x.grad = None
    undetached = F.softplus((x * x.mean(1, keepdim=True)).sum(-1) - (x * x).sum(-1)).mean()
    undetached.backward()
    assert undetached.item() == pytest.approx(patch_contrastive_loss(x, x).item(), abs=1e-6)
    assert not torch.allclose(detached_grad, x.grad, atol=1e-4)


def test_contrastive_is_exact_in_fp32_for_bf16_inputs():
    """Large dot products (|eᵀh| ~ 10²) lose the loss in bf16 arithmetic; it is computed in fp32."""
    first = (8 * torch.randn(2, 16, 64, generator=_gen(9))).bfloat16()
    last = (8 * torch.randn(2, 16, 64, generator=_gen(10))).bfloat16()
    value = patch_contrastive_loss(first, last)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(patch_contrastive_loss(first.float(), last.float()).item(), rel=1e-6)


@pytest.mark.parametrize("name, prefix", [("deit_tiny_12", 1), ("cait_xxs24", 0)])
def test_objective_contrastive_takes_the_patch_embedding_before_position(name, prefix):
    """ℓ_cons by hand from `patch_embed(x)` (detached, no position) and the last layer's normed
    patch tokens equals the Objective's term; with a large random position embedding, the block-1
    input (patch + position) would give a very different value."""
    torch.manual_seed(0)
    model = create_model(name, img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=3, num_classes=5).eval()
    with torch.no_grad():
        model.pos_embed.normal_(0.0, 3.0)
    x = torch.randn(4, 3, 16, 16, generator=_gen(24))
    objective = Objective(ObjectiveConfig(contrastive_weight=1.0, patch_mix_weight=0.0))
    _, terms = objective(model(x, aux=True), torch.tensor([0, 1, 2, 3]))

    e = model.patch_embed(x).detach().double().flatten(1, -2)  # [B, n, D], before the position embedding
    h = model.forward_features(x)[:, 1:].detach().double()  # last layer, after the final norm, patches only
    positive = (e * h).sum(-1)
    negative = (e * h.mean(1, keepdim=True)).sum(-1)
    by_hand = -(positive - torch.logaddexp(positive, negative)).mean()
    print(f"{name}: ℓ_cons by hand {by_hand.item():.6f}, Objective {terms['contrastive'].item():.6f}")
    assert terms["contrastive"].item() == pytest.approx(by_hand.item(), abs=1e-6)

    with_position = model(x, aux=True).patch_tokens(0).detach().double()
    assert not torch.allclose(with_position, e, atol=1.0)
    old = -((with_position * h).sum(-1) - torch.logaddexp((with_position * h).sum(-1), (with_position * h.mean(1, keepdim=True)).sum(-1))).mean()
    assert abs(old.item() - by_hand.item()) > 0.05


# ---- ℓ_token -----------------------------------------------------------------------------------


def test_patch_mixing_is_mean_per_patch_cross_entropy():
    logits = torch.randn(3, 5, 7, generator=_gen(11))
    labels = torch.randint(0, 7, (3, 5), generator=_gen(12))
    per_patch = [F.cross_entropy(logits[b, i : i + 1], labels[b, i : i + 1]) for b in range(3) for i in range(5)]
    assert patch_mixing_loss(logits, labels).item() == pytest.approx(torch.stack(per_patch).mean().item(), abs=1e-6)
    smoothed = [F.cross_entropy(logits[b, i : i + 1], labels[b, i : i + 1], label_smoothing=0.1) for b in range(3) for i in range(5)]
    assert patch_mixing_loss(logits, labels, 0.1).item() == pytest.approx(torch.stack(smoothed).mean().item(), abs=1e-6)


def test_patch_mixing_soft_targets_go_to_every_patch():
    logits = torch.randn(2, 4, 6, generator=_gen(13))
    targets = torch.rand(2, 6, generator=_gen(14)).softmax(-1)
    expected = torch.stack([-(targets[b] * logits[b, i].log_softmax(-1)).sum() for b in range(2) for i in range(4)]).mean()
    assert patch_mixing_loss(logits, targets).item() == pytest.approx(expected.item(), abs=1e-6)
    with pytest.raises(ValueError, match="patch labels"):
        patch_mixing_loss(logits, torch.zeros(2, 3, dtype=torch.long))


# ---- distillation ------------------------------------------------------------------------------


def _distilling_objective(kind: str, alpha: float, tau: float) -> Objective:
    """The training objective with only CE and the teacher term (no smoothing, no extra losses)."""
    cfg = ObjectiveConfig(cos_weight=0.0, contrastive_weight=0.0, patch_mix_weight=0.0, label_smoothing=0.0,
                          distill=kind, distill_alpha=alpha, distill_tau=tau)
    return Objective(cfg)


def _logits_only(logits: torch.Tensor, dist_logits: torch.Tensor | None = None) -> AuxOutput:
    return AuxOutput(logits=logits, tokens=[], patch_embeddings=None, attentions=None, patch_logits=None,
                     dist_logits=dist_logits, num_prefix_tokens=1 if dist_logits is None else 2)


def test_hard_distillation_is_deit_formula():
    cls, dist, teacher = (torch.randn(4, 5, generator=_gen(s)) for s in (15, 16, 17))
    labels = torch.tensor([0, 1, 2, 3])
    expected = 0.5 * F.cross_entropy(cls, labels) + 0.5 * F.cross_entropy(dist, teacher.argmax(-1))
    value = _distilling_objective("hard", 0.5, 1.0)(_logits_only(cls, dist), labels, teacher_logits=teacher)[0]
    assert value.item() == pytest.approx(expected.item(), abs=1e-6)


def _deit_soft_distillation(outputs_kd: torch.Tensor, teacher_outputs: torch.Tensor, T: float) -> torch.Tensor:
    """DeiT's `DistillationLoss` soft term, as its losses.py writes it."""
    return F.kl_div(
        F.log_softmax(outputs_kd / T, dim=1),
        F.log_softmax(teacher_outputs / T, dim=1),
        reduction="sum",
        log_target=True,
    ) * (T * T) / outputs_kd.numel()


def test_soft_distillation_is_normalised_as_deits_code():
    """On fixed logits: the teacher term equals DeiT's formula (KL summed, × τ², ÷ B·C) and the
    written-out value; the per-image KL would be C = 3 times larger."""
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.5, 2.5]])
    tau = 2.0
    value = teacher_loss(student, teacher, "soft", tau)
    deit = _deit_soft_distillation(student, teacher, tau)
    p_t, p_s = (teacher / tau).softmax(-1), (student / tau).softmax(-1)
    written_out = tau**2 * (p_t * (p_t.log() - p_s.log())).sum() / 6
    assert value.item() == pytest.approx(deit.item(), abs=1e-7)
    assert value.item() == pytest.approx(written_out.item(), abs=1e-7)
    assert value.item() == pytest.approx(0.0757427, abs=1e-6)
    per_image = tau**2 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    assert per_image.item() == pytest.approx(3 * value.item(), rel=1e-6)


def test_soft_distillation_blends_with_ce_and_spares_the_teacher():
    student = torch.randn(4, 5, generator=_gen(18)).requires_grad_()
    teacher = torch.randn(4, 5, generator=_gen(19)).requires_grad_()
    labels = torch.tensor([4, 3, 2, 1])
    alpha, tau = 0.3, 2.0
    expected = (1 - alpha) * F.cross_entropy(student.detach(), labels) + alpha * _deit_soft_distillation(student.detach(), teacher.detach(), tau)
    value = _distilling_objective("soft", alpha, tau)(_logits_only(student), labels, teacher_logits=teacher)[0]
    assert value.item() == pytest.approx(expected.item(), abs=1e-6)
    value.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


# ---- Objective ---------------------------------------------------------------------------------


def test_objective_defaults_are_the_papers_best_and_documented():
    cfg = ObjectiveConfig()
    assert (cfg.cos_weight, cfg.contrastive_weight, cfg.patch_mix_weight) == (0.0, 1.0, 1.0)
    assert (cfg.distill, cfg.distill_alpha, cfg.distill_tau, cfg.label_smoothing) == ("none", 0.5, 1.0, 0.1)
    assert all(f.metadata.get("help") for f in dataclasses.fields(ObjectiveConfig))
    objective = Objective(cfg)
    assert objective.needs_patch_head and not objective.needs_teacher
    assert objective.weights == {"ce": 1.0, "contrastive": 1.0, "patch_mix": 1.0}


@pytest.mark.parametrize(
    "changes, needle",
    [({"cos_weight": -1}, "cos_weight"), ({"distill": "medium"}, "distill"), ({"distill_alpha": 2}, "distill_alpha"),
     ({"label_smoothing": 1.0}, "label_smoothing"), ({"distill_tau": 0}, "distill_tau")],
)
def test_objective_config_rejects_bad_values(changes, needle):
    with pytest.raises(UserError, match=needle):
        ObjectiveConfig(**changes)


def _model_output(**options):
    torch.manual_seed(0)
    model = create_model("deit_tiny_12", img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=3, num_classes=5, **options)
    x = torch.randn(4, 3, 16, 16, generator=_gen(20))
    return model, model(x, aux=True)


def test_objective_total_is_weighted_sum_of_named_terms():
    model, out = _model_output(patch_head=True, distilled=True)
    cfg = ObjectiveConfig(cos_weight=0.5, contrastive_weight=2.0, patch_mix_weight=1.0, distill="hard", distill_alpha=0.25)
    labels = torch.tensor([0, 1, 2, 3])
    patch_labels = torch.randint(0, 5, (4, 16), generator=_gen(21))
    teacher = torch.randn(4, 5, generator=_gen(22))
    total, terms = Objective(cfg)(out, labels, patch_labels=patch_labels, teacher_logits=teacher)
    assert set(terms) == {"ce", "cos", "contrastive", "patch_mix", "distill"}
    assert all(not t.requires_grad for t in terms.values()) and total.requires_grad
    expected = {
        "ce": F.cross_entropy(out.logits, labels, label_smoothing=0.1),
        "cos": patch_cosine_similarity(out.patch_tokens(-1)).mean(),
        "contrastive": patch_contrastive_loss(out.patch_embeddings, out.patch_tokens(-1)),
        "patch_mix": patch_mixing_loss(out.patch_logits, patch_labels, 0.1),
        "distill": F.cross_entropy(out.dist_logits, teacher.argmax(-1)),
    }
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), abs=1e-6), name
    weights = {"ce": 0.75, "cos": 0.5, "contrastive": 2.0, "patch_mix": 1.0, "distill": 0.25}
    assert total.item() == pytest.approx(sum(weights[n] * expected[n].item() for n in weights), abs=1e-5)
    total.backward()
    assert all(p.grad is not None for p in model.blocks[-1].parameters())


def test_objective_with_soft_targets_and_no_patch_labels():
    _, out = _model_output(patch_head=True)
    targets = torch.rand(4, 5, generator=_gen(23)).softmax(-1)
    total, terms = Objective()(out, targets)
    assert set(terms) == {"ce", "contrastive", "patch_mix"}
    assert terms["patch_mix"].item() == pytest.approx(patch_mixing_loss(out.patch_logits, targets).item(), abs=1e-6)
    # soft targets (Mixup/CutMix) carry their own smoothing: the CE is not label-smoothed a second time
    log_p = out.logits.float().log_softmax(-1)
    assert terms["ce"].item() == pytest.approx(-(targets * log_p).sum(-1).mean().item(), abs=1e-6)
    sharp = F.one_hot(torch.tensor([4, 0, 2, 1]), 5).float() * 0.9 + 0.02  # Mixup's own smoothing
    _, sharp_terms = Objective()(out, sharp)
    soft_ce = -(sharp * log_p).sum(-1).mean()
    smoothed_again = -((0.9 * sharp + 0.1 / 5) * log_p).sum(-1).mean()
    assert abs(soft_ce.item() - smoothed_again.item()) > 1e-3  # the check below tells the two apart
    assert sharp_terms["ce"].item() == pytest.approx(soft_ce.item(), abs=1e-6)
    labels = torch.tensor([0, 1, 2, 3])
    _, terms = Objective()(out, labels)
    assert terms["patch_mix"].item() == pytest.approx(patch_mixing_loss(out.patch_logits, labels[:, None].expand(4, 16), 0.1).item(), abs=1e-6)


def test_objective_says_what_the_model_lacks():
    _, out = _model_output()
    with pytest.raises(UserError, match="patch_head=True"):
        Objective()(out, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(UserError, match="teacher"):
        Objective(ObjectiveConfig(patch_mix_weight=0, distill="soft"))(out, torch.tensor([0, 1, 2, 3]))
