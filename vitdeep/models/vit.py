"""DeiT-style Vision Transformer, one implementation for every depth and width.

Without extra options the module tree and state-dict keys are timm's `VisionTransformer`
(and `VisionTransformerDistilled` with `distilled=True`), so timm / DeiT checkpoints load as is.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import nn

from vitdeep.models.base import AuxOutput, DeepTransformer, check_image_input, check_patch_grid
from vitdeep.models.layers import Block, check_heads


class VisionTransformer(DeepTransformer):
    """ViT / DeiT with a class token (and optional distillation token), linear-in-depth
    drop-path, optional LayerScale, and the over-smoothing remedies as options:
    `talking_heads`, `attnscale`, `featscale` (per block) and `patch_head` (a linear classifier
    shared by all patch tokens, for the patch-mixing loss)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        distilled: bool = False,
        talking_heads: bool = False,
        attnscale: bool = False,
        featscale: bool = False,
        patch_head: bool = False,
    ) -> None:
        super().__init__()
        check_patch_grid(img_size, patch_size)
        check_heads(embed_dim, num_heads)
        self.img_size = img_size
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = self.pos_embed_prefix_tokens = 2 if distilled else 1
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
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
                talking_heads=talking_heads,
                attnscale=attnscale,
                featscale=featscale,
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

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding `[B, n, D]`, before the prefix tokens and the position embedding."""
        check_image_input(x, self.img_size)
        return self.patch_embed(x)

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """The sequence entering block 1: prefix tokens prepended, position embedding added."""
        prefix = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        x = torch.cat([p.expand(patches.shape[0], -1, -1) for p in prefix] + [patches], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.run_blocks(self.embed(self.embed_patches(x)))
        return self.norm(x)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.head(self.head_drop(x[:, 0]))
        dist_logits = self.head_dist(self.head_drop(x[:, 1])) if self.head_dist is not None else None
        return logits, dist_logits

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return x[:, 0]
        logits, dist_logits = self._heads(x)
        return logits if dist_logits is None else (logits + dist_logits) / 2

    def forward_aux(self, x: torch.Tensor, attention: bool = False) -> AuxOutput:
        """Logits plus per-layer tokens, the pre-position patch embeddings, attention maps (only
        when asked) and patch logits."""
        patches = self.embed_patches(x)
        x = self.embed(patches)
        tokens = [x]
        x, attentions = self.run_blocks(x, attention, tokens)
        tokens[-1] = x = self.norm(x)
        logits, dist_logits = self._heads(x)
        return AuxOutput(
            logits=logits,
            tokens=tokens,
            patch_embeddings=patches,
            attentions=attentions if attention else None,
            patch_logits=self.patch_logits(x[:, self.num_prefix_tokens :]),
            dist_logits=dist_logits,
            num_prefix_tokens=self.num_prefix_tokens,
        )
