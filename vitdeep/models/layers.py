"""Attention, its over-smoothing remedies as layers, and the transformer block.

The remedies are layer choices, as timm's `attn_layer` / `norm_layer`: `TalkingHeadsAttention` is an
`Attention` that mixes heads around the softmax, `ReAttention` (DeepViT) fills `Attention`'s slot
for the post-softmax maps, `AttnScale` its slot for the attention matrix, `FeatScale` its slot for
the branch output, QK-norm (timm's `qk_norm`) normalises queries and keys, and `ContraNorm` is the
norm layer. `remedy_layers(**values)` turns the values of `vitdeep.architecture.REMEDIES` into the
model class's layer arguments; a new remedy is a layer here, one keyword of `remedy_layers`, and
its entry in that list.

Where several act on one attention map the order is fixed: logits → talking heads' `proj_l` →
softmax → talking heads' `proj_w` → Re-attention → AttnScale → `·V`. Attention dropout acts on the
map Re-attention receives (as DeepViT's code), otherwise on the map `V` is multiplied by.

Parameter names follow timm (`qkv`, `proj`, `proj_l`, `proj_w`, `ls1.gamma`) so that a model
built without the remedies has exactly timm's state-dict keys. A remedy layer that adds parameters
says at which values it changes nothing (`identity_state`), for loading checkpoints without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn

from vitdeep.errors import UserError


class AttnScale(nn.Module):
    """AttnScale (Wang et al. 2022): amplify the high-pass part of each head's attention.

    `Â = U + (1 + ω_h)(A − U)` with `U = 1/N`; rows of `Â` still sum to 1 and ω = 0 is vanilla
    attention. Because `U·V` is the token mean of `V`, `Â·V = (1 + ω)·A·V − ω·mean_tokens(V)`,
    which keeps the fused attention kernel usable (`fused`).
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.omega = nn.Parameter(torch.zeros(num_heads))

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        """Explicit form on an attention matrix `[B, H, N, N]`."""
        uniform = 1.0 / attn.shape[-1]
        omega = self.omega.to(attn.dtype).view(1, -1, 1, 1)
        return uniform + (1.0 + omega) * (attn - uniform)

    def fused(self, attn_v: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Exact fused form from `A·V` and `V`, both `[B, H, N, d]`."""
        omega = self.omega.to(attn_v.dtype).view(1, -1, 1, 1)
        return (1.0 + omega) * attn_v - omega * v.mean(dim=-2, keepdim=True)

    @torch.jit.ignore
    def identity_state(self) -> dict[str, torch.Tensor]:
        return {"omega": torch.zeros_like(self.omega)}


class FeatScale(nn.Module):
    """FeatScale (Wang et al. 2022): re-weight the DC and high-frequency parts of a branch output.

    `y = x + λ₁·x_d + λ₂·x_h` with `x_d = mean_tokens(x)`, `x_h = x − x_d`; λ = 0 is the identity.
    It acts on the attention branch after the projection and its dropout, as the official code
    does. The terms are added once (the official ViT code adds them twice; convert with
    λ = 2·λ_official).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.zeros(dim))
        self.lambda2 = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_d = x.mean(dim=1, keepdim=True)
        return x + self.lambda1 * x_d + self.lambda2 * (x - x_d)

    @torch.jit.ignore
    def identity_state(self) -> dict[str, torch.Tensor]:
        return {"lambda1": torch.zeros_like(self.lambda1), "lambda2": torch.zeros_like(self.lambda2)}


class ReAttention(nn.Module):
    """Re-attention (Zhou et al. 2021, DeepViT): a learned `H×H` mixing of the post-softmax maps
    (a 1×1 convolution over heads, with bias), then a BatchNorm over heads, as the authors'
    `ReAttention` (`models/layers.py`, `transform_scale=False`). Its maps are no longer
    row-stochastic. Parameter names are the authors' (`reatten_matrix`, `var_norm`); the
    convolution keeps PyTorch's default init, as theirs (their `_init_weights` touches only
    linears and norms). No identity values exist: BatchNorm in training normalises with the
    batch's statistics, so a checkpoint without Re-attention does not load into a model with it."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.reatten_matrix = nn.Conv2d(num_heads, num_heads, 1, 1)
        self.var_norm = nn.BatchNorm2d(num_heads)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        return self.var_norm(self.reatten_matrix(attn))


#: ContraNorm's temperature τ: the authors' default (`--temp 1.0`), which their examples keep.
CONTRANORM_TEMPERATURE = 1.0


class ContraNorm(nn.LayerNorm):
    """ContraNorm (Guo et al. 2023) before a LayerNorm: `LN(x − s·softmax(x̂x̂ᵀ/τ)·x)` with `x̂` the
    tokens normalised to unit length, the softmax over keys, over every token of the sequence
    (the authors' `ContraNorm` of `ViT_imagenet/models.py` with a fixed scale: no `dual_norm`,
    `pre_norm`, `learnable` or `identity`). It replaces every LayerNorm of the model, as the
    authors' drop-in `norm_layer`. A LayerNorm itself, with its parameter names: a plain
    checkpoint loads as is, and the authors' `….layernorm.weight` load as `….weight`."""

    def __init__(self, dim: int, scale: float, temperature: float = CONTRANORM_TEMPERATURE, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)
        self.scale = scale
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = F.normalize(x, dim=-1)
        sim = torch.softmax((xn @ xn.transpose(-2, -1)) / self.temperature, dim=-1)
        return F.layer_norm(x - self.scale * (sim @ x), self.normalized_shape, self.weight, self.bias, self.eps)


def check_heads(dim: int, num_heads: int) -> None:
    if num_heads <= 0 or dim % num_heads:
        raise UserError(f"num_heads={num_heads} does not divide the width embed_dim={dim}")


class Attention(nn.Module):
    """Multi-head self-attention (timm's, with its `qk_norm`), with three slots for remedies:
    `re_attention_layer(num_heads)` and then `attn_scale_layer(num_heads)` act on the post-softmax
    matrix (Re-attention, AttnScale), `feat_scale_layer(dim)` on the branch output after the
    projection and its dropout (FeatScale). Subclasses may mix heads around the softmax
    (`mix_logits` / `mix_weights`). Head mixing and Re-attention need the explicit matrix
    (`needs_matrix`).

    The fused kernel (`F.scaled_dot_product_attention`) runs whenever it is exact: no head mixing,
    no attention map requested, and no attention dropout under AttnScale (dropout must act on the
    rescaled matrix). Otherwise the explicit N×N form runs; both give the same result.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        qk_norm: bool = False,
        re_attention_layer: Optional[Callable[[int], nn.Module]] = None,
        attn_scale_layer: Optional[Callable[[int], nn.Module]] = None,
        feat_scale_layer: Optional[Callable[[int], nn.Module]] = None,
    ) -> None:
        super().__init__()
        check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # timm's qk_norm: the model's LayerNorm (eps 1e-6) over each head's queries and keys
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.needs_matrix = re_attention_layer is not None
        self.add_head_mixing(num_heads)
        self.reattention = re_attention_layer(num_heads) if re_attention_layer is not None else None
        self.attn_scale = attn_scale_layer(num_heads) if attn_scale_layer is not None else None
        self.feat_scale = feat_scale_layer(dim) if feat_scale_layer is not None else None

    def add_head_mixing(self, num_heads: int) -> None:
        """Where a subclass registers layers that mix heads (before the remedy slots, so that
        parameters keep timm's order)."""

    def mix_logits(self, attn: torch.Tensor) -> torch.Tensor:
        return attn

    def mix_weights(self, attn: torch.Tensor) -> torch.Tensor:
        return attn

    def _uses_fused_kernel(self, need_weights: bool) -> bool:
        if self.needs_matrix or need_weights:
            return False
        return self.attn_scale is None or not (self.training and self.attn_drop.p > 0)

    def attention_matrix(self, q: torch.Tensor, k: torch.Tensor, in_place: bool = False, dropout: bool = False) -> torch.Tensor:
        """The post-softmax matrix the block applies: after head mixing, Re-attention and AttnScale
        (the module docstring's order), with the attention dropout where `dropout`. `in_place`
        (only without autograd) takes the softmax in the logits' storage: the same values, one
        N×N matrix less at a time, for the diagnostics of deep models at high resolution."""
        attn = self.mix_logits((q * self.scale) @ k.transpose(-2, -1))
        attn = self.mix_weights(torch.softmax(attn, dim=-1, out=attn) if in_place else attn.softmax(dim=-1))
        if self.reattention is not None:
            attn = self.reattention(self.attn_drop(attn) if dropout else attn)
            dropout = False
        if self.attn_scale is not None:
            attn = self.attn_scale(attn)
        return self.attn_drop(attn) if dropout else attn

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn: Optional[torch.Tensor] = None
        if self._uses_fused_kernel(need_weights):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
            if self.attn_scale is not None:
                out = self.attn_scale.fused(out, v)
        else:
            attn = self.attention_matrix(q, k, in_place=need_weights and not torch.is_grad_enabled(), dropout=True)
            out = attn @ v
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        if self.feat_scale is not None:
            out = self.feat_scale(out)
        return out, attn


class TalkingHeadsAttention(Attention):
    """Talking-heads attention (Shazeer et al. 2020, CaiT): learned `H×H` maps mix the logits across
    heads before the softmax (`proj_l`) and the weights after it (`proj_w`). Initialised with every
    other linear layer (truncated normal, std 0.02, zero bias), as timm's CaiT and the authors'
    code; the identity only when a checkpoint lacks them (`identity_state`)."""

    def add_head_mixing(self, num_heads: int) -> None:
        self.needs_matrix = True
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)

    def mix_logits(self, attn: torch.Tensor) -> torch.Tensor:
        return self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def mix_weights(self, attn: torch.Tensor) -> torch.Tensor:
        return self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    @torch.jit.ignore
    def identity_state(self) -> dict[str, torch.Tensor]:
        eye = torch.eye(self.num_heads, dtype=self.proj_l.weight.dtype, device=self.proj_l.weight.device)
        return {f"{name}.{p}": eye if p == "weight" else torch.zeros_like(eye[0]) for name in ("proj_l", "proj_w") for p in ("weight", "bias")}


def attention_layer(*, talking_heads: bool = False, reattention: bool = False, attnscale: bool = False,
                    featscale: bool = False, qk_norm: bool = False) -> Callable[..., nn.Module]:
    """The attention layer (timm's `attn_layer`) for these remedy switches."""
    return partial(
        TalkingHeadsAttention if talking_heads else Attention,
        qk_norm=qk_norm,
        re_attention_layer=ReAttention if reattention else None,
        attn_scale_layer=AttnScale if attnscale else None,
        feat_scale_layer=FeatScale if featscale else None,
    )


def norm_layer(contranorm: float = 0.0) -> Callable[[int], nn.Module]:
    """The models' norm layer: LayerNorm (eps 1e-6), or ContraNorm with scale `contranorm` > 0
    (0 = off, as the authors' `--scale`)."""
    if contranorm > 0:
        return partial(ContraNorm, scale=contranorm)
    return partial(nn.LayerNorm, eps=1e-6)


def remedy_layers(*, talking_heads: bool = False, reattention: bool = False, attnscale: bool = False,
                  featscale: bool = False, qk_norm: bool = False, contranorm: float = 0.0, reg_tokens: int = 0) -> dict:
    """The model class's layer arguments for the values of `vitdeep.architecture.REMEDIES`: its
    attention layer, its norm layer and (when set) its register tokens."""
    layers = dict(
        attn_layer=attention_layer(talking_heads=talking_heads, reattention=reattention, attnscale=attnscale,
                                   featscale=featscale, qk_norm=qk_norm),
        norm_layer=norm_layer(contranorm),
    )
    if reg_tokens:
        layers["reg_tokens"] = reg_tokens
    return layers


class SampleDropPath(DropPath):
    """timm's DropPath whose per-sample keep decisions can come from given draws.

    timm draws each sample's mask from the global generator, so a sample's masks depend on the
    rank and the batch it lands in. With `draws` set (`sample_drop_paths`: one U[0, 1) number per
    sample, drawn from the sample's own seed), sample i is kept when `draws[i] < 1 - drop_prob`:
    the same distribution, the same decision wherever the sample is, and the same in a
    recomputation under activation checkpointing.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__(drop_prob, scale_by_keep)
        self.draws: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.draws is None or not self.training or self.drop_prob == 0.0:
            return super().forward(x)
        keep = 1.0 - self.drop_prob
        mask = (self.draws < keep).to(x.dtype).view(-1, *(1,) * (x.ndim - 1))
        return x * (mask / keep if self.scale_by_keep else mask)


def drop_path_layers(model: nn.Module) -> list[SampleDropPath]:
    """The model's drop-path layers, in a fixed order (the order of `model.modules()`)."""
    return [module for module in model.modules() if isinstance(module, SampleDropPath)]


@contextmanager
def sample_drop_paths(model: nn.Module, draws: torch.Tensor) -> Iterator[None]:
    """Inside the block, drop-path layer k keeps sample i when `draws[i, k] < keep` (draws
    `[batch, len(drop_path_layers(model))]` on the model's device); timm's random draws after."""
    layers = drop_path_layers(model)
    if draws.shape[1] != len(layers):
        raise ValueError(f"draws for {draws.shape[1]} drop-path layers, the model has {len(layers)}")
    for k, layer in enumerate(layers):
        layer.draws = draws[:, k]
    try:
        yield
    finally:
        for layer in layers:
            layer.draws = None


class Block(nn.Module):
    """Pre-norm transformer block (timm's ViT block) around `attn_layer`.

    Residual branches are scaled by `scale_attn_branch` / `scale_mlp_branch` (LayerScale when
    `init_values` is set) so that CaiT can keep timm's `gamma_1`/`gamma_2` parameter names.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_layer: Callable[..., nn.Module] = Attention,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = SampleDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = SampleDropPath(drop_path) if drop_path > 0 else nn.Identity()

    def scale_attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(x)

    def scale_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(x)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        y, attn = self.attn(self.norm1(x), need_weights)
        x = x + self.drop_path1(self.scale_attn_branch(y))
        x = x + self.drop_path2(self.scale_mlp_branch(self.mlp(self.norm2(x))))
        return x, attn
