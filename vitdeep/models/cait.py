"""CaiT (Touvron et al. 2021): LayerScale self-attention blocks with talking heads over the
patches, then class-attention blocks where the class token joins.

State-dict keys are timm's `Cait` (`gamma_1`/`gamma_2`, `blocks_token_only`), so timm / official
CaiT checkpoints load as is. The attention remedies (AttnScale, FeatScale, Re-attention, QK-norm)
apply to the self-attention blocks only; ContraNorm replaces every norm. No register tokens (a
DeiT option).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed, trunc_normal_
from torch import nn

from vitdeep.architecture import cait_layer_scale_init
from vitdeep.models.base import DeepTransformer, check_patch_grid
from vitdeep.models.layers import Block, TalkingHeadsAttention, check_heads


class LayerScaleBlock(Block):
    """A self-attention `Block` whose LayerScale is stored as timm's CaiT `gamma_1`/`gamma_2`."""

    def __init__(self, dim: int, num_heads: int, *, init_values: float, **kwargs) -> None:
        super().__init__(dim, num_heads, init_values=None, **kwargs)
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

    def scale_attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma_1 * x

    def scale_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma_2 * x


class ClassAttention(nn.Module):
    """Attention from the class token (query) to [class; patches] (keys and values)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        head_dim = C // self.num_heads
        q = self.q(x[:, :1]).reshape(B, 1, self.num_heads, head_dim).transpose(1, 2)
        k = self.k(x).reshape(B, N, self.num_heads, head_dim).transpose(1, 2)
        v = self.v(x).reshape(B, N, self.num_heads, head_dim).transpose(1, 2)
        x_cls = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x_cls.transpose(1, 2).reshape(B, 1, C)))


class ClassAttentionBlock(nn.Module):
    """CaiT's class-attention block: only the class token is updated."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, init_values: float, norm_layer) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor, x_cls: torch.Tensor) -> torch.Tensor:
        u = torch.cat((x_cls, x), dim=1)
        x_cls = x_cls + self.gamma_1 * self.attn(self.norm1(u))
        return x_cls + self.gamma_2 * self.mlp(self.norm2(x_cls))


class Cait(DeepTransformer):
    """CaiT with uniform drop-path over the self-attention blocks (none in class attention), talking
    heads unless another attention layer is chosen (`attn_layer`, `norm_layer`: the over-smoothing
    remedies, `vitdeep.models.layers.remedy_layers`; the norm layer everywhere, class attention
    included, as timm's `norm_layer`), and an optional `patch_head`."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 24,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: Optional[float] = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        depth_token_only: int = 2,
        patch_head: bool = False,
        dynamic_img_size: bool = True,
        attn_layer: Callable[..., nn.Module] = TalkingHeadsAttention,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
    ) -> None:
        super().__init__(embed_dim, depth, patch_size, global_pool, dynamic_img_size)
        check_patch_grid(img_size, patch_size)
        check_heads(embed_dim, num_heads)
        init_values = cait_layer_scale_init(depth) if init_values is None else init_values
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_prefix_tokens = self.final_prefix_tokens = 1
        self.pos_embed_prefix_tokens = self.block_prefix_tokens = 0
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      strict_img_size=not dynamic_img_size, output_fmt="NHWC")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.blocks = nn.ModuleList(
            LayerScaleBlock(
                embed_dim,
                num_heads,
                init_values=init_values,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_path_rate,
                attn_drop=attn_drop_rate,
                proj_drop=proj_drop_rate,
                attn_layer=attn_layer,
                norm_layer=norm_layer,
            )
            for _ in range(depth)
        )
        self.blocks_token_only = nn.ModuleList(
            ClassAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, norm_layer)
            for _ in range(depth_token_only)
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        self.patch_head = self._new_head(num_classes) if patch_head else None

        self.init_weights()
        trunc_normal_(self.cls_token, std=0.02)

    def layer_id(self, name: str) -> int:
        """Class-attention blocks share the ids of the last self-attention blocks (as timm)."""
        if name.startswith("blocks_token_only."):
            offset = len(self.blocks) - len(self.blocks_token_only) + 1
            return int(name.split(".")[1]) + offset
        return super().layer_id(name)

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """The sequence entering block 1 from the patch grid: patches plus position embedding (no
        class token yet)."""
        batch, grid_h, grid_w, dim = patches.shape
        return self.pos_drop(patches.view(batch, -1, dim) + self.position_embedding([grid_h, grid_w]))

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Class-attention blocks, then the final norm over [class; patches]."""
        if self.blocks_token_only is not None:
            x_cls = self.cls_token.expand(x.shape[0], -1, -1)
            for block in self.blocks_token_only:
                x_cls = block(x, x_cls)
            x = torch.cat((x_cls, x), dim=1)
        return self.norm(x)

    def last_tokens(self, final: torch.Tensor) -> torch.Tensor:
        """Patches only, as the self-attention blocks' sequences."""
        return final[:, self.final_prefix_tokens :]

    def _prune_head(self) -> None:
        """Without a head the class token and class attention go too (timm's CaiT)."""
        self.blocks_token_only = None
        self.cls_token = None
        self.num_prefix_tokens = self.final_prefix_tokens = 0
        super()._prune_head()
