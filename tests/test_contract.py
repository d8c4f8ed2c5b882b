"""timm's model contract, checked as timm's own model tests check it (tests/test_models.py of
pytorch-image-models): every zoo family built through `timm.create_model("vitdeep_…")`, forward and
backward at the default size and a smaller one, the default cfg, forward_features / forward_head,
forward_intermediates, features_only, TorchScript and FX. Narrow, shallow models on small images."""

import math

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import vitdeep.models  # noqa: F401  (registers vitdeep_* with timm)
from vitdeep.errors import UserError

TINY = dict(embed_dim=64, num_heads=4, depth=4, img_size=32, patch_size=8, num_classes=7)
SMALLER = 16
FAMILIES = {
    "deit": ("vitdeep_deit_tiny_12", {}),
    "deit distilled": ("vitdeep_deit_tiny_12", {"distilled": True}),
    "deit all remedies": ("vitdeep_deit_tiny_24", {"talking_heads": True, "attnscale": True, "featscale": True, "reattention": True,
                                                   "qk_norm": True, "contranorm": 0.1, "reg_tokens": 2}),
    "cait talking heads": ("vitdeep_cait_xxs24", {}),
}


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def _model(family, **overrides):
    name, options = family
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**TINY, **options, **overrides})


def _images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))


def _remedy_layers(model) -> set[str]:
    return {type(m).__name__ for m in model.modules()} & {"TalkingHeadsAttention", "AttnScale", "FeatScale", "ReAttention", "ContraNorm"}


def test_families_have_their_layers():
    assert _remedy_layers(_model(FAMILIES["deit"])) == set()
    assert _remedy_layers(_model(FAMILIES["deit all remedies"])) == {"TalkingHeadsAttention", "AttnScale", "FeatScale", "ReAttention", "ContraNorm"}
    assert _remedy_layers(_model(FAMILIES["cait talking heads"])) == {"TalkingHeadsAttention"}
    assert _model(FAMILIES["deit distilled"]).dist_token is not None


@pytest.mark.parametrize("size", [TINY["img_size"], SMALLER])
def test_forward_backward_at_default_and_smaller_size(family, size):
    model = _model(family).train()
    assert model.default_cfg["input_size"] == (3, TINY["img_size"], TINY["img_size"])
    out = model(_images(size))
    assert out.shape == (2, TINY["num_classes"]) and not out.isnan().any()
    out.mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


def test_grad_checkpointing_keeps_the_output(family):
    model = _model(family).eval()
    x = _images(TINY["img_size"])
    with torch.no_grad():
        expected = model(x)
        model.set_grad_checkpointing()
        assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)  # recomputed blocks in grad mode


def test_default_cfg_and_head_api(family):
    model = _model(family).eval()
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["fixed_input_size"] is False and cfg["num_classes"] == 7
    assert (cfg["crop_pct"], cfg["interpolation"]) == (0.875, "bicubic")
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in state
    assert model.num_classes == 7 and model.num_features == model.head_hidden_size == TINY["embed_dim"]

    x = _images(24)
    tokens = (24 // 8) ** 2 + model.num_prefix_tokens
    features = model.forward_features(x)
    assert features.shape == (2, tokens, model.num_features)
    assert model.forward_head(features).shape == (2, 7)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape == (2, model.head_hidden_size)

    classifier = model.get_classifier()
    assert classifier is model.head or classifier == (model.head, model.head_dist)
    model.reset_classifier(0)
    assert model.num_classes == 0 and torch.allclose(model(x), pre_logits)
    model.reset_classifier(3, "")
    assert model(x).shape == (2, tokens, 3)  # no pooling: every token classified
    headless = _model(family, num_classes=0).eval()
    assert headless(x).shape == (2, model.head_hidden_size)


def test_forward_intermediates(family):
    model = _model(family).eval()
    x = _images(24)
    grid = 24 // 8
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert len(intermediates) == len(model.feature_info) == TINY["depth"]
        for info, y in zip(model.feature_info, intermediates):
            assert y.shape == (2, info["num_chs"], math.ceil(24 / info["reduction"]), grid)

        last_two = model.forward_intermediates(x, indices=2, output_fmt="NLC", norm=True, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[-2, -1], output_fmt="NLC", norm=True, intermediates_only=True)
        assert len(last_two) == 2 and all(torch.equal(a, b) for a, b in zip(last_two, picked))
        assert last_two[0].shape == (2, grid * grid, TINY["embed_dim"])

        with_prefix = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True)
        prefix = model.num_prefix_tokens if "deit" in family[0] else 0  # CaiT's blocks see patches only
        if prefix:
            (patches, prefix_tokens), = with_prefix
            assert prefix_tokens.shape == (2, prefix, TINY["embed_dim"]) and patches.shape == (2, grid * grid, TINY["embed_dim"])
        else:
            assert with_prefix[0].shape == (2, grid * grid, TINY["embed_dim"])

        model.set_grad_checkpointing()
        again, _ = model.forward_intermediates(x)
        assert torch.allclose(again, final, rtol=1e-4, atol=1e-5)


def test_prune_intermediate_layers(family):
    model = _model(family).eval()
    assert model.prune_intermediate_layers(indices=[1]) == [1]
    assert len(model.blocks) == 2 and model.num_classes == 0
    (y,) = model.forward_intermediates(_images(32), indices=[1], intermediates_only=True)
    assert y.shape == (2, TINY["embed_dim"], 4, 4)


def test_features_only(family):
    name, options = family
    model = timm.create_model(name, pretrained=False, features_only=True, **{**TINY, **options}).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert channels == [TINY["embed_dim"]] * 3 and reductions == [8] * 3  # the last 3 blocks, timm's default
    for size in (TINY["img_size"], SMALLER):
        outputs = model(_images(size))
        assert len(outputs) == 3
        for out in outputs:
            assert out.shape == (2, TINY["embed_dim"], size // 8, size // 8) and not out.isnan().any()


@pytest.mark.parametrize("size", [TINY["img_size"], SMALLER])
def test_torchscript(family, size):
    with timm.set_scriptable(True):
        model = _model(family).eval()
    scripted = torch.jit.script(model)
    x = _images(size)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-6)


def _fx_model(model, train: bool = False):
    """The model traced by torch.fx as timm's tests do: torchvision's feature extractor with timm's
    leaf modules and functions, returning the graph's last node (the logits)."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs).train(train)


def test_fx_forward_and_backward(family):
    model = _model(family).eval()
    for size in (TINY["img_size"], SMALLER):
        x = _images(size)
        with torch.no_grad():
            (traced,) = _fx_model(model)(x).values()
            assert torch.equal(traced, model(x))
    model = _model(family).train()
    fx_model = _fx_model(model, train=True)
    (out,) = fx_model(_images(TINY["img_size"])).values()
    out.mean().backward()
    assert out.shape == (2, TINY["num_classes"])
    assert all(p.grad is not None for p in fx_model.parameters())


def test_fx_traced_model_scripts_and_runs(family):
    """timm's `test_model_forward_fx_torchscript`: FX-trace, then TorchScript, then run. The traced
    forward's signature carries base.py's annotations, so they must be real types, not the strings
    of postponed annotations (which TorchScript cannot resolve)."""
    with timm.set_scriptable(True):
        model = _model(family).eval()
    scripted = torch.jit.script(_fx_model(model))
    x = _images(TINY["img_size"])
    with torch.no_grad():
        (out,) = scripted(x).values()
        assert torch.allclose(out, model(x), atol=1e-6)


def test_traced_model_keeps_the_input_check(family):
    traced = torch.fx.symbolic_trace(_model(family).eval())
    with pytest.raises(UserError, match="does not tile into 8-pixel patches"):
        traced(_images(20))
