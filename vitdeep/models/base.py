"""What the DeiT and CaiT models share: the auxiliary output, the block loop, and optimizer hooks."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitdeep.errors import UserError
from vitdeep.outputs import AuxOutput


def check_patch_grid(img_size: int, patch_size: int) -> int:
    """Patches per side; the image must tile exactly into patches."""
    for name, value in (("img_size", img_size), ("patch_size", patch_size)):
        if value <= 0:
            raise UserError(f"{name}={value} must be positive")
    if img_size % patch_size:
        raise UserError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
    return img_size // patch_size


def check_image_input(x: torch.Tensor, img_size: int) -> None:
    if x.ndim != 4 or x.shape[-2:] != (img_size, img_size):
        raise UserError(f"expected images of shape [B, C, {img_size}, {img_size}], got {list(x.shape)}")


class DeepTransformer(nn.Module):
    """Base of `VisionTransformer` and `Cait`: block loop with activation checkpointing, heads,
    weight init, and the hooks optimizers use (`no_weight_decay`, `group_matcher`, `layer_id`)."""

    blocks: nn.ModuleList
    num_prefix_tokens: int
    #: prefix-token slots at the start of `pos_embed` (kept as they are when resampling).
    pos_embed_prefix_tokens: int

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (memory for the 48-block models)."""
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor, aux: bool = False, attention: bool = False) -> torch.Tensor | AuxOutput:
        """Class logits `[B, C]` (with a distillation token: the mean of both heads, as DeiT).

        `aux=True` returns `forward_aux(x, attention)` instead: going through the module call
        lets engines that hook it (DeepSpeed ZeRO-3 gathers parameters there) see every pass.
        """
        if aux:
            return self.forward_aux(x, attention)
        return self.forward_head(self.forward_features(x))

    def run_block(self, block: nn.Module, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, need_weights, use_reentrant=False)
        return block(x, need_weights)

    def run_blocks(
        self, x: torch.Tensor, attention: bool = False, tokens: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the self-attention blocks, appending each output to `tokens` when given."""
        attentions = []
        for block in self.blocks:
            x, attn = self.run_block(block, x, attention)
            if tokens is not None:
                tokens.append(x)
            if attention:
                attentions.append(attn)
        return x, attentions

    def init_weights(self) -> None:
        """timm's ViT init: truncated normal (0.02) linears, talking-heads maps included (as timm's
        CaiT and the authors' code), zero biases."""
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens and position embeddings. Biases, norms and the 1-D scales (γ, ω, λ) are left out
        of weight decay by their dimension (`param.ndim <= 1`), as timm's param groups do."""
        return {name for name in ("pos_embed", "cls_token", "dist_token") if getattr(self, name, None) is not None}

    @property
    def num_layer_ids(self) -> int:
        """Layer ids run 0 (embeddings) … num_layer_ids − 1 (final norm and heads)."""
        return len(self.blocks) + 2

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 for embeddings, i+1 for block i,
        the top id for everything after the blocks."""
        if name.startswith(("cls_token", "dist_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layer_ids - 1

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """timm's hook (used by `timm.optim.param_groups_layer_decay`), driven by `layer_id`."""
        return self.layer_id

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """New classifier (and patch / distillation heads) for `num_classes` classes."""
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)
        if getattr(self, "head_dist", None) is not None:
            self.head_dist = self._new_head(num_classes)
        if self.patch_head is not None:
            self.patch_head = self._new_head(num_classes)

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.embed_dim, num_classes)
        _init_linear(head)
        return head

    def patch_logits(self, patch_tokens: torch.Tensor) -> torch.Tensor | None:
        return self.patch_head(patch_tokens) if self.patch_head is not None else None


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
