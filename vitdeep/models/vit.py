"""DeiT-style Vision Transformer, one implementation for every depth and width.

Without the remedies the module tree and state-dict keys are timm's `VisionTransformer`
(and `VisionTransformerDistilled` with `distilled=True`), so timm / DeiT checkpoints load as is.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import nn

from vitdeep.errors import UserError
from vitdeep.models.base import GLOBAL_POOLS, DeepTransformer, check_patch_grid
from vitdeep.models.layers import Attention, Block, check_heads


class VisionTransformer(DeepTransformer):
    """ViT / DeiT with a class token (and optional distillation token), linear-in-depth
    drop-path, optional LayerScale, the attention and norm layers as choices (`attn_layer`,
    `norm_layer`: the over-smoothing remedies, `vitdeep.models.layers.remedy_layers`), optional
    register tokens (`reg_tokens`: prefix tokens after the class / distillation tokens, left out
    of every patch-token loss and diagnostic, as timm's `reg_tokens`) and an optional
    `patch_head` (a linear classifier shared by all patch tokens, for the patch-mixing loss)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: Optional[float] = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        distilled: bool = False,
        patch_head: bool = False,
        dynamic_img_size: bool = True,
        attn_layer: Callable[..., nn.Module] = Attention,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        reg_tokens: int = 0,
    ) -> None:
        # the distillation head reads the class and distillation tokens: token pooling or none
        super().__init__(embed_dim, depth, patch_size, global_pool, dynamic_img_size, ("token", "") if distilled else GLOBAL_POOLS)
        check_patch_grid(img_size, patch_size)
        check_heads(embed_dim, num_heads)
        self.img_size = img_size
        self.num_classes = num_classes
        if reg_tokens < 0:
            raise UserError(f"reg_tokens={reg_tokens} must be 0 or more")
        self.num_reg_tokens = reg_tokens
        prefix = (2 if distilled else 1) + reg_tokens
        self.num_prefix_tokens = self.pos_embed_prefix_tokens = self.block_prefix_tokens = self.final_prefix_tokens = prefix
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      strict_img_size=not dynamic_img_size, output_fmt="NHWC")
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        drop_path = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear in depth
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                init_values=init_values,
                drop_path=drop_path[i],
                attn_drop=attn_drop_rate,
                proj_drop=proj_drop_rate,
                attn_layer=attn_layer,
                norm_layer=norm_layer,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        self.head_dist = self._new_head(num_classes) if distilled else None
        self.patch_head = self._new_head(num_classes) if patch_head else None

        self.init_weights()
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)  # timm's

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """The sequence entering block 1 from the patch grid: prefix tokens (class, distillation,
        registers, in that order) prepended, position embedding added (over the prefix tokens too,
        as timm's ViT without `no_embed_class`)."""
        batch, grid_h, grid_w, dim = patches.shape
        pos_embed = self.position_embedding([grid_h, grid_w])
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(batch, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(batch, -1, -1))
        x = torch.cat(prefix + [patches.view(batch, -1, dim)], dim=1)
        return self.pos_drop(x + pos_embed)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The class head (with a distillation token and token pooling: the mean of both heads, and
        of both tokens for `pre_logits`, as timm's DeiT)."""
        if self.head_dist is not None and self.global_pool == "token":
            x_cls, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
            if pre_logits:
                return (x_cls + x_dist) / 2
            return (self.head(x_cls) + self.head_dist(x_dist)) / 2
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def heads(self, final: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.head_dist is None:
            return super().heads(final)
        return self.head(self.head_drop(final[:, 0])), self.head_dist(self.head_drop(final[:, 1]))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head if self.head_dist is None else (self.head, self.head_dist)
