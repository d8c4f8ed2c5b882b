"""The model zoo: timm equivalence, the remedies' exact forms, shapes, and clear errors."""

import dataclasses
import inspect
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay

from vitdeep.architecture import REMEDIES, REMEDY_NAMES
from vitdeep.cli import main
from vitdeep.config import ModelConfig
from vitdeep.errors import UserError
from vitdeep.models import MODELS, create_model, get_spec, model_stats
from vitdeep.models.checkpoints import adapt_state_dict, options_in_state_dict
from vitdeep.models.layers import Attention, AttnScale, FeatScale, TalkingHeadsAttention, remedy_layers
from vitdeep.models.registry import model_options, resolved_options

IMG = 32


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its init (γ, ω, λ included) so equalities are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _images(batch: int = 2, size: int = IMG, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "ours, twin, options",
    [
        ("deit_tiny_12", "deit_tiny_patch16_224", {}),
        ("deit_small_12", "deit_small_patch16_224", {}),
        ("deit_tiny_12", "deit_tiny_distilled_patch16_224", {"distilled": True}),
        ("cait_xxs24", "cait_xxs24_224", {}),
        ("cait_s24", "cait_s24_224", {}),
    ],
)
def test_timm_equivalence(ours, twin, options):
    reference = timm.create_model(twin, img_size=IMG, num_classes=10).eval()
    _perturb(reference)
    model = create_model(ours, img_size=IMG, num_classes=10, **options).eval()
    assert set(model.state_dict()) == set(reference.state_dict())
    model.load_state_dict(reference.state_dict())
    x = _images()
    with torch.no_grad():
        expected = reference(x)
        diff = (model(x) - expected).abs().max().item()
    print(f"{ours} vs timm {twin}: max |Δlogits| = {diff:.2e}")
    assert diff < 1e-5


def test_timm_registration_builds_vitdeep_models():
    model = timm.create_model("vitdeep_deit_tiny_24", img_size=IMG, num_classes=7, attnscale=True)
    assert len(model.blocks) == 24
    assert model(_images()).shape == (2, 7)


def _pair(name: str, **options):
    """A model with `options` loaded from a plain twin's checkpoint, which lacks the options'
    parameters: the loader starts them at identity."""
    plain = create_model(name, img_size=IMG, num_classes=10).eval()
    _perturb(plain)
    model = create_model(name, img_size=IMG, num_classes=10, **options).eval()
    state, report = adapt_state_dict(plain.state_dict(), model)
    model.load_state_dict(state)
    return plain, model, report.identity


@pytest.mark.parametrize("name", ["deit_tiny_12", "cait_xxs24"])
def test_identity_options_equal_plain_model(name):
    """A checkpoint without AttnScale, FeatScale and (for DeiT) talking heads loads with ω = 0,
    λ = 0 and identity talking heads, which change nothing."""
    options = {"attnscale": True, "featscale": True}
    if name.startswith("deit"):
        options["talking_heads"] = True
    plain, model, identity = _pair(name, **options)
    expected = ("omega", "lambda1", "lambda2") + (("proj_l.weight", "proj_l.bias", "proj_w.weight", "proj_w.bias") if name.startswith("deit") else ())
    assert all(k.endswith(expected) for k in identity) and all(any(k.endswith(e) for k in identity) for e in expected)
    if name.startswith("deit"):
        heads = model.blocks[0].attn.num_heads
        assert torch.equal(model.blocks[3].attn.proj_l.weight, torch.eye(heads))
        assert torch.equal(model.blocks[3].attn.proj_w.bias, torch.zeros(heads))
    x = _images()
    with torch.no_grad():
        diff = (model(x) - plain(x)).abs().max().item()
        aux_diff = (model.forward_aux(x, attention=True).logits - plain(x)).abs().max().item()
    print(f"{name} identity options: max |Δ| = {diff:.2e} (explicit path {aux_diff:.2e})")
    assert diff < 1e-5 and aux_diff < 1e-5


def test_talking_heads_identity_equals_plain_attention():
    torch.manual_seed(0)
    plain = Attention(64, 4).eval()
    talking = TalkingHeadsAttention(64, 4).eval()
    talking.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for linear in (talking.proj_l, talking.proj_w):
            linear.weight.copy_(torch.eye(4))
            linear.bias.zero_()
    x = torch.randn(2, 17, 64)
    diff = (talking(x)[0] - plain(x)[0]).abs().max().item()
    assert diff < 1e-6


@pytest.mark.parametrize("name, options", [("cait_xxs24", {}), ("deit_tiny_24", {"talking_heads": True})])
def test_talking_heads_from_scratch_start_like_timm_cait(name, options):
    """Built from scratch, proj_l / proj_w are truncated normal with std 0.02 and zero bias (timm's
    CaiT and the authors' code), not the identity."""
    torch.manual_seed(0)
    model = create_model(name, img_size=IMG, num_classes=10, **options)
    weights = torch.cat([getattr(b.attn, p).weight.flatten() for b in model.blocks for p in ("proj_l", "proj_w")])
    biases = torch.cat([getattr(b.attn, p).bias for b in model.blocks for p in ("proj_l", "proj_w")])
    diagonal = torch.cat([getattr(b.attn, p).weight.diagonal() for b in model.blocks for p in ("proj_l", "proj_w")])
    print(f"{name}: talking-heads weight std {weights.std():.4f} over {weights.numel()} values, diagonal mean {diagonal.mean():.4f}")
    assert 0.017 < weights.std().item() < 0.023
    assert abs(diagonal.mean().item()) < 0.01  # not the identity
    assert torch.equal(biases, torch.zeros_like(biases))


def test_featscale_comes_after_the_projection_dropout():
    """The official order: y = FeatScale(dropout(proj(·))). In training with proj_drop > 0 the
    dropout's zeros are refilled by λ₁·mean, so no output is exactly 0; the other order keeps them."""
    torch.manual_seed(2)
    attn = Attention(64, 4, proj_drop=0.5, feat_scale_layer=FeatScale).train()
    with torch.no_grad():
        attn.feat_scale.lambda1.uniform_(0.5, 1.5)
        attn.feat_scale.lambda2.uniform_(0.5, 1.5)
    x = torch.randn(2, 17, 64)
    torch.manual_seed(3)
    out, _ = attn(x)
    q, k, v = attn.qkv(x).reshape(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
    projected = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 17, 64))
    torch.manual_seed(3)
    official = attn.feat_scale(attn.proj_drop(projected))
    torch.manual_seed(3)
    swapped = attn.proj_drop(attn.feat_scale(projected))
    assert torch.allclose(out, official, atol=1e-6)
    assert (swapped == 0).float().mean() > 0.4 and (out == 0).sum() == 0
    assert (out - swapped).abs().max() > 0.1
    attn.eval()
    assert torch.allclose(attn(x)[0], attn.feat_scale(projected), atol=1e-6)  # no dropout: the orders agree


def _random_attnscale_attention(attn_drop: float = 0.0) -> Attention:
    torch.manual_seed(1)
    attn = Attention(64, 4, attn_scale_layer=AttnScale, attn_drop=attn_drop)
    with torch.no_grad():
        attn.attn_scale.omega.copy_(torch.tensor([-0.7, 0.3, 1.5, 4.0]))
    return attn


def test_fused_and_explicit_attnscale_agree():
    attn = _random_attnscale_attention().eval()
    x = torch.randn(3, 65, 64)
    fused, no_map = attn(x, need_weights=False)
    explicit, attention_map = attn(x, need_weights=True)
    assert no_map is None and attention_map.shape == (3, 4, 65, 65)
    diff = (fused - explicit).abs().max().item()
    print(f"fused vs explicit AttnScale: max |Δ| = {diff:.2e}")
    assert diff < 1e-5


def test_attnscale_rows_sum_to_one_and_formula():
    scale = AttnScale(4)
    with torch.no_grad():
        scale.omega.copy_(torch.tensor([-0.5, 0.0, 0.8, 3.0]))
    a = torch.randn(2, 4, 9, 9).softmax(-1)
    scaled = scale(a)
    assert torch.allclose(scaled.sum(-1), torch.ones(2, 4, 9), atol=1e-6)
    u = torch.full_like(a, 1 / 9)
    expected = u + (1 + scale.omega.view(1, 4, 1, 1)) * (a - u)
    assert torch.allclose(scaled, expected, atol=1e-7)


def test_attnscale_with_attention_dropout_uses_explicit_form():
    """Dropout must act on the rescaled matrix, so training with attn_drop > 0 takes the explicit path."""
    attn = _random_attnscale_attention(attn_drop=0.5).train()
    assert not attn._uses_fused_kernel(need_weights=False)
    assert attn.eval()._uses_fused_kernel(need_weights=False)


def test_featscale_identity_and_formula():
    scale = FeatScale(8)
    x = torch.randn(2, 5, 8)
    assert torch.equal(scale(x), x)
    with torch.no_grad():
        scale.lambda1.normal_()
        scale.lambda2.normal_()
    x_d = x.mean(1, keepdim=True)
    expected = x + scale.lambda1 * x_d + scale.lambda2 * (x - x_d)
    assert torch.allclose(scale(x), expected, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_and_trains_one_step(name):
    """Every zoo entry, at its full depth and width, builds (its init included), runs forward and
    backpropagates to every block. On the meta device: shapes and the autograd graph are real, no
    memory is filled (deit_large_48 takes 9 s to initialise for real and 0.7 s here); the numbers
    of the same code at small sizes are checked against timm and the authors' code elsewhere."""
    with torch.device("meta"):
        model = create_model(name, img_size=IMG, num_classes=10)
    logits = model(_images().to("meta"))
    assert logits.shape == (2, 10)
    logits.logsumexp(-1).mean().backward()
    assert model.patch_embed.proj.weight.grad is not None
    assert all(p.grad is not None for p in model.blocks[-1].parameters())


@pytest.mark.parametrize("name, prefix", [("deit_tiny_24", 1), ("cait_xxs24", 0)])
def test_forward_aux_shapes(name, prefix):
    model = create_model(name, img_size=IMG, patch_size=8, num_classes=10, patch_head=True, attnscale=True)
    n = (IMG // 8) ** 2
    out = model.forward_aux(_images(), attention=True)
    depth = len(model.blocks)
    assert out.logits.shape == (2, 10)
    assert len(out.tokens) == depth + 1 and all(t.shape == (2, n + prefix, model.embed_dim) for t in out.tokens)
    assert len(out.attentions) == depth and all(a.shape == (2, model.blocks[0].attn.num_heads, n + prefix, n + prefix) for a in out.attentions)
    assert out.patch_logits.shape == (2, n, 10)
    assert out.patch_tokens(-1).shape == (2, n, model.embed_dim)
    assert torch.equal(out.patch_embeddings, model.patch_embed(_images()).flatten(1, 2))  # before the position embedding
    assert torch.allclose(out.logits, model(_images()), atol=1e-5)
    assert model.forward_aux(_images()).attentions is None


def test_forward_aux_last_tokens_are_normed_and_distilled_logits():
    model = create_model("deit_tiny_12", img_size=IMG, num_classes=10, distilled=True).eval()
    out = model.forward_aux(_images())
    assert out.num_prefix_tokens == 2 and out.dist_logits.shape == (2, 10)
    assert torch.allclose((out.logits + out.dist_logits) / 2, model(_images()), atol=1e-6)
    assert torch.allclose(out.tokens[-1], model.forward_features(_images()), atol=1e-6)


@pytest.mark.parametrize("name", ["deit_tiny_48", "cait_xxs24"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    x = _images()
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = create_model(name, img_size=IMG, num_classes=10, drop_path_rate=0.0)
        model.set_grad_checkpointing(enable)
        out = model.forward_aux(x)
        (out.logits.sum() + out.tokens[3].pow(2).mean() + out.patch_embeddings.pow(2).mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_drop_path_schedules():
    deit = create_model("deit_tiny_24", img_size=IMG, drop_path_rate=0.5)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in deit.blocks]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.5) and rates == sorted(rates)
    cait = create_model("cait_xxs24", img_size=IMG, drop_path_rate=0.1)
    assert {b.drop_path1.drop_prob for b in cait.blocks} == {0.1}


def test_cait_layer_scale_init_by_depth():
    assert create_model("cait_xxs24", img_size=IMG).blocks[0].gamma_1[0].item() == pytest.approx(1e-5)
    assert create_model("cait_xxs36", img_size=IMG).blocks[0].gamma_1[0].item() == pytest.approx(1e-5)
    assert create_model("cait_s36", img_size=IMG).blocks[0].gamma_1[0].item() == pytest.approx(1e-6)


def test_weight_decay_exclusions_and_layer_decay_groups():
    model = create_model("deit_tiny_12", img_size=IMG, num_classes=10, attnscale=True, featscale=True, init_values=1e-5)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.5)
    by_name = {}
    for group in groups:
        for p in group["params"]:
            by_name[id(p)] = group
    params = dict(model.named_parameters())
    assert by_name[id(params["blocks.3.attn.attn_scale.omega"])]["weight_decay"] == 0.0
    assert by_name[id(params["blocks.3.ls1.gamma"])]["weight_decay"] == 0.0
    assert by_name[id(params["blocks.3.attn.qkv.weight"])]["weight_decay"] == 0.05
    scales = [by_name[id(params[n])]["lr_scale"] for n in ("pos_embed", "blocks.0.mlp.fc1.weight", "blocks.11.mlp.fc1.weight", "head.weight")]
    assert scales == sorted(scales) and scales[-1] == 1.0 and scales[0] == pytest.approx(0.5**13)


def test_model_stats_match_real_counts():
    params, flops = model_stats("deit_small_12")
    assert params == sum(p.numel() for p in timm.create_model("deit_small_patch16_224").parameters())
    assert flops / 2e9 == pytest.approx(4.6, abs=0.05)  # DeiT-S: 4.6 GMACs


@pytest.mark.parametrize(
    "name, options, needle",
    [
        ("deit_tiny_13", {}, "deit_tiny_13"),
        ("deit_tiny_12", {"img_size": 30}, "img_size=30"),
        ("deit_tiny_12", {"num_heads": 5}, "num_heads=5"),
        ("deit_tiny_12", {"attn_scale": True}, "attn_scale"),
    ],
)
def test_bad_model_requests_raise_one_clear_error(name, options, needle):
    with pytest.raises(UserError, match=needle):
        create_model(name, **options)


@pytest.mark.parametrize("args, needle", [(["models", "vit_tiny_99"], "vit_tiny_99"), (["models", "deit_tiny_12", "--img-size", "100"], "img_size=100")])
def test_cli_maps_model_errors_to_exit_2(args, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_models_table(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "deit_small_24", "cait_xxs36"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "deit_small_24" in out and "43.3" in out and "cait_xxs36" in out


def test_module_call_with_aux_returns_forward_aux():
    """Engines that hook the module call (DeepSpeed ZeRO-3) reach forward_aux through forward."""
    model = create_model("deit_tiny_12", img_size=IMG, num_classes=10).eval()
    x = _images()
    direct, through_call = model.forward_aux(x, attention=True), model(x, aux=True, attention=True)
    assert torch.equal(direct.logits, through_call.logits) and len(through_call.attentions) == 12
    assert isinstance(through_call, tuple)  # a named tuple: hooks see every tensor inside


def test_depth_override_in_model_stats():
    params_24, flops_24 = model_stats("deit_tiny_12", 224, depth=24)
    assert (params_24, flops_24) == model_stats("deit_tiny_24", 224)


def test_each_remedy_is_one_entry_of_the_remedy_list():
    """A remedy of `REMEDIES` is a `remedy_layers` keyword, a model option (the family's default
    unless set), a config field (so a flag), and recognised in a plain state dict by its parameters
    (ContraNorm has none: it changes the function only)."""
    assert list(inspect.signature(remedy_layers).parameters) == list(REMEDY_NAMES)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for remedy in REMEDIES:
        for name in ("deit_tiny_12", "cait_xxs24"):
            assert remedy.name in fields and remedy.name in model_options(name)
            assert resolved_options(name)[remedy.name] == remedy.default(get_spec(name).family)
            if get_spec(name).family not in remedy.families:
                with pytest.raises(UserError, match=remedy.name):
                    create_model(name, depth=2, **{remedy.name: remedy.value(1)})
                continue
            torch.manual_seed(0)
            on_model = create_model(name, depth=2, img_size=IMG, **{remedy.name: remedy.value(1)}).eval()
            torch.manual_seed(0)
            off_model = create_model(name, depth=2, img_size=IMG, **{remedy.name: remedy.value(0)}).eval()
            on, off = on_model.state_dict(), off_model.state_dict()
            if remedy.name == "contranorm":
                assert set(on) == set(off)
                with torch.no_grad():
                    assert not torch.allclose(on_model(_images()), off_model(_images()))
                continue
            assert set(on) > set(off)
            assert options_in_state_dict(on, name).get(remedy.name) == remedy.value(1)
            assert not options_in_state_dict(off, name).get(remedy.name)
