"""Re-attention, ContraNorm, QK-norm and register tokens against their authors' code (or timm's,
where timm is the reference), on random weights, through the authors' checkpoint format; and every
pair of remedies together. Transcriptions below copy the authors' forward passes line by line."""

import itertools
import math
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from vitdeep.analysis import layer_curves
from vitdeep.architecture import REMEDIES
from vitdeep.models import create_model
from vitdeep.models.checkpoints import adapt_state_dict, options_in_state_dict

IMG, PATCH, WIDTH, HEADS, DEPTH = 32, 8, 64, 4, 3
TINY = dict(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, num_heads=HEADS, depth=DEPTH, num_classes=10)
TOLERANCE = 1e-5


def _images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Every parameter and BatchNorm statistic off its init, so that no agreement is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=gen))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=gen))


def _timm_vit(**options) -> nn.Module:
    """timm's ViT of the tiny size with these options, random weights, in eval mode."""
    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=10, qkv_bias=True,
        **options,
    ).eval()
    _randomise(reference)
    return reference


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _assert_same_logits(model, reference, label: str) -> None:
    """`model` and its reference transcription give the same logits on the same images."""
    x = _images()
    with torch.no_grad():
        diff = _max_diff(model(x), reference(x))
    print(f"{label} max |Δlogits| = {diff:.2e}")
    assert diff <= TOLERANCE


# -- DeepViT (zhoudaquan/dvit_repo, models/layers.py and models/deep_vision_transformer.py) -------


class DeepViTReAttention(nn.Module):
    """The authors' `ReAttention` (apply_transform=True, transform_scale=False, expansion_ratio=3)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.reatten_matrix = nn.Conv2d(self.num_heads, self.num_heads, 1, 1)
        self.var_norm = nn.BatchNorm2d(self.num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.reatten_scale = 1.0
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, atten=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        attn = self.var_norm(self.reatten_matrix(attn)) * self.reatten_scale
        attn_next = attn
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x, attn_next


class DeepViTBlock(nn.Module):
    """The authors' `Block` with re_atten=True, scale_adjustment=1."""

    def __init__(self, dim, num_heads, mlp_ratio, norm_layer):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = DeepViTReAttention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, atten=None):
        x_new, atten = self.attn(self.norm1(x), atten)
        x = x + x_new
        x = x + self.mlp(self.norm2(x))
        return x, atten


class DeepVisionTransformer(nn.Module):
    """The authors' `DeepVisionTransformer.forward` (patch embedding as timm's, token head)."""

    def __init__(self, img_size, patch_size, num_classes, embed_dim, depth, num_heads, mlp_ratio=4.0):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([DeepViTBlock(embed_dim, num_heads, mlp_ratio, norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        B = x.shape[0]
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.pos_embed
        attn = None
        for blk in self.blocks:
            x, attn = blk(x, attn)
        return self.head(self.norm(x)[:, 0])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_reattention_matches_deepvit_through_its_checkpoint_format(mode):
    """A DeepViT state dict (random weights and BatchNorm statistics) loads under vitdeep's names,
    and the model gives DeepViT's logits, with BatchNorm's running statistics (eval) and the
    batch's (train)."""
    torch.manual_seed(0)
    reference = DeepVisionTransformer(IMG, PATCH, 10, WIDTH, DEPTH, HEADS)
    _randomise(reference)
    state = reference.state_dict()
    assert "blocks.0.attn.reatten_matrix.weight" in state and "blocks.0.attn.var_norm.running_var" in state
    model = create_model("deit_tiny_12", reattention=True, **TINY)
    fitted, report = adapt_state_dict(state, model, "deepvit.pth", "DeepViT state dict")
    model.load_state_dict(fitted)
    assert any("reatten_matrix" in line for line in report.converted)
    assert options_in_state_dict(state, "deit_tiny_12") == {"reattention": True}
    getattr(model, mode)(), getattr(reference, mode)()
    _assert_same_logits(model, reference, f"Re-attention vs DeepViT ({mode}):")


def test_reattention_attention_dropout_acts_before_the_mixing():
    """As DeepViT's code: dropout on the softmax, then the 1×1 convolution and BatchNorm."""
    torch.manual_seed(0)
    ours = create_model("deit_tiny_12", reattention=True, attn_drop_rate=0.5, **TINY).blocks[0].attn
    theirs = DeepViTReAttention(WIDTH, HEADS, qkv_bias=True, attn_drop=0.5)
    theirs.load_state_dict({k.removeprefix("reattention."): v for k, v in ours.state_dict().items()})
    x = torch.randn(2, 17, WIDTH)
    torch.manual_seed(1)
    expected = theirs(x)[0]
    torch.manual_seed(1)
    diff = _max_diff(ours(x)[0], expected)
    assert diff <= TOLERANCE


# -- ContraNorm (PKU-ML/ContraNorm, ViT_imagenet/models.py and main.py) ---------------------------


class AuthorsContraNorm(nn.Module):
    """The authors' `ContraNorm` (scale > 0; dual_norm, pre_norm, learnable, identity off). `device`
    / `dtype`: what today's timm passes a norm layer (their timm 0.6.7 did not)."""

    def __init__(self, dim, scale=0.0, temp=1.0, device=None, dtype=None):
        super().__init__()
        self.scale = scale
        self.temp = temp
        self.layernorm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        if self.scale > 0.0:
            xn = nn.functional.normalize(x, dim=2)
            sim = torch.bmm(xn, xn.transpose(1, 2)) / self.temp
            sim = nn.functional.softmax(sim, dim=2)
            x_neg = torch.bmm(sim, x)
            x = x - self.scale * x_neg
        return self.layernorm(x)


def test_contranorm_matches_the_authors_drop_in_norm_layer():
    """The authors replace timm's ViT `norm_layer` by their ContraNorm (`main.py`): a timm ViT built
    that way, its state dict in their format, loads into vitdeep and gives the same logits."""
    reference = _timm_vit(norm_layer=partial(AuthorsContraNorm, scale=0.3))
    state = reference.state_dict()
    assert "blocks.0.norm1.layernorm.weight" in state and "norm.layernorm.bias" in state
    model = create_model("deit_tiny_12", contranorm=0.3, **TINY).eval()
    fitted, report = adapt_state_dict(state, model, "contranorm.pth", "ContraNorm state dict")
    model.load_state_dict(fitted)
    _assert_same_logits(model, reference, "ContraNorm vs the authors' code:")


# -- QK-norm and register tokens (timm's VisionTransformer is the reference) ----------------------


@pytest.mark.parametrize("options", [{"qk_norm": True}, {"reg_tokens": 4}, {"qk_norm": True, "reg_tokens": 1}])
def test_qk_norm_and_register_tokens_match_timm(options):
    """timm's ViT with `qk_norm` / `reg_tokens` (class token, position embedding over the prefix
    tokens): the same state-dict keys, and the same logits."""
    reference = _timm_vit(**options)
    model = create_model("deit_tiny_12", **options, **TINY).eval()
    assert set(model.state_dict()) == set(reference.state_dict())
    model.load_state_dict(reference.state_dict())
    assert options_in_state_dict(reference.state_dict(), "deit_tiny_12") == options
    _assert_same_logits(model, reference, f"{options} vs timm:")


def test_register_tokens_are_left_out_of_patch_tokens_and_attention_diagnostics():
    """Registers are prefix tokens: `patch_tokens` and the patch head skip them, and the attention
    maps the diagnostics see lose their rows and columns (the class token's stay)."""
    torch.manual_seed(0)
    model = create_model("deit_tiny_12", reg_tokens=3, patch_head=True, **TINY).eval()
    _randomise(model)
    num_patches = (IMG // PATCH) ** 2
    with torch.no_grad():
        out = model(_images(), aux=True, attention=True)
    assert out.num_prefix_tokens == 4 and out.patch_tokens(-1).shape[1] == num_patches
    assert out.patch_logits.shape[1] == num_patches
    assert out.attentions[0].shape[-2:] == (num_patches + 1, num_patches + 1)
    # the same map with the registers cut out by hand
    block = model.blocks[0]
    with torch.no_grad():
        full = block.attn(block.norm1(model.embed(model.embed_patches(_images()))), True)[1]
    keep = [0, *range(4, 4 + num_patches)]
    assert torch.equal(out.attentions[0], full[:, :, keep][:, :, :, keep])
    curves = layer_curves(model, _images())
    assert curves["attn_std"].shape == (DEPTH,) and torch.isfinite(curves["cossim"]).all()


# -- combinations ---------------------------------------------------------------------------------

ON = {remedy.name: remedy.value(2 if remedy.kind is int else 0.2 if remedy.kind is float else 1) for remedy in REMEDIES}
PAIRS = [dict([a, b]) for a, b in itertools.combinations(ON.items(), 2)]


@pytest.mark.parametrize("options", [*PAIRS, ON], ids=[*("+".join(p) for p in PAIRS), "all"])
def test_every_pair_of_remedies_and_all_at_once_train(options):
    """Forward, backward (every parameter gets a gradient) and the diagnostics, on a DeiT; and
    every remedy CaiT has, together, on a CaiT."""
    for name in ("deit_tiny_12", "cait_xxs24") if options is ON else ("deit_tiny_12",):
        family_options = {k: v for k, v in options.items() if not (k == "reg_tokens" and name.startswith("cait"))}
        torch.manual_seed(0)
        model = create_model(name, init_values=0.1, **family_options, **{**TINY, "depth": 2}).train()
        loss = model(_images(), aux=True).logits.logsumexp(-1).mean()
        loss.backward()
        assert math.isfinite(loss.item())
        assert [n for n, p in model.named_parameters() if p.grad is None] == []
        curves = layer_curves(model.eval(), _images())
        assert all(torch.isfinite(v).all() for v in curves.values())


def test_order_of_talking_heads_and_reattention_on_one_map():
    """Talking heads' `proj_w` mixes the softmax first, then Re-attention (README, docs/method.md)."""
    torch.manual_seed(0)
    attn = create_model("deit_tiny_12", talking_heads=True, reattention=True, **TINY).blocks[0].attn.eval()
    _randomise(attn)
    q, k = torch.randn(2, HEADS, 5, WIDTH // HEADS), torch.randn(2, HEADS, 5, WIDTH // HEADS)
    logits = attn.proj_l(((q * attn.scale) @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    mixed = attn.proj_w(logits.softmax(-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    expected = attn.reattention.var_norm(F.conv2d(mixed, attn.reattention.reatten_matrix.weight, attn.reattention.reatten_matrix.bias))
    with torch.no_grad():
        assert _max_diff(attn.attention_matrix(q, k), expected) <= TOLERANCE


# -- LayerScale per depth (CaiT's rule) from a run's options, so that a grid over depths can set it --


@pytest.mark.parametrize("depth, expected", [(12, 0.1), (18, 0.1), (24, 1e-5), (36, 1e-6)])
def test_layer_scale_by_depth_follows_cait(depth, expected):
    from vitdeep.config import resolve_config
    from vitdeep.engine.run_plan import model_kwargs_for
    from vitdeep.losses import Objective

    cfg = resolve_config({"model": "deit_small_12", "depth": depth, "layer_scale_by_depth": True})
    assert model_kwargs_for(cfg, 10, Objective(cfg.loss))["init_values"] == expected
    cfg = resolve_config({"model": "deit_small_12", "depth": depth, "layer_scale_by_depth": True, "init_values": 0.5})
    assert model_kwargs_for(cfg, 10, Objective(cfg.loss))["init_values"] == 0.5
    cfg = resolve_config({"model": "deit_small_12", "depth": depth})
    assert "init_values" not in model_kwargs_for(cfg, 10, Objective(cfg.loss))


def test_every_remedy_is_listed_by_vitdeep_models_and_a_flag_of_analyze(capsys, monkeypatch):
    from vitdeep.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    for command in (["models", "deit_tiny_12"], ["analyze", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        for remedy in REMEDIES:
            assert "--" + remedy.name.replace("_", "-") in out, (command, remedy.name)


@pytest.mark.slow
def test_all_remedies_train_under_zero3_on_two_ranks(digit_shards, tmp_path):
    """Every remedy at once (registers, Re-attention's BatchNorm buffers, ContraNorm, QK-norm …)
    through DeepSpeed ZeRO-3 on 2 ranks: the run finishes, logs finite losses and saves a
    checkpoint with every remedy's parameters."""
    import json

    from tests.launch import SMALL, metrics, ranks_cmd, run
    from vitdeep.engine.checkpoint import complete_checkpoints, read_marker

    ds_config = tmp_path / "zero3_fp32.json"
    ds_config.write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100},
    }))
    out = tmp_path / "run"
    flags = ["--talking-heads", "--reattention", "--attnscale", "--featscale", "--qk-norm", "--contranorm", "0.2",
             "--reg-tokens", "2", "--layer-scale-by-depth"]
    run(ranks_cmd(["train", "--data", str(digit_shards), "--out", str(out), *SMALL, "--depth", "2", "--steps", "3",
                   "--ds-config", str(ds_config), "--oversmoothing-every", "1", "--mixup", "0", "--cutmix", "0", *flags]))
    rows = metrics(out)
    assert sorted(rows) == [1, 2, 3] and all(math.isfinite(row["loss"]) for row in rows.values())
    marker = read_marker(complete_checkpoints(out)[-1])
    assert {k: marker["model_kwargs"][k] for k in ("reattention", "qk_norm", "contranorm", "reg_tokens", "init_values")} == {
        "reattention": True, "qk_norm": True, "contranorm": 0.2, "reg_tokens": 2, "init_values": 0.1}
