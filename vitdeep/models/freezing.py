"""Freezing the bottom of a model for finetuning (`--freeze-blocks N`), shared by the training loop
and the planner, which must price the same trainable parameters the run will have."""

from __future__ import annotations

from torch import nn

#: Parameters outside the blocks that belong to the frozen bottom: the tokens and position embedding.
EMBEDDING_PARAMETERS = ("cls_token", "dist_token", "reg_token", "pos_embed")


def freeze_blocks(model: nn.Module, count: int) -> None:
    """Freeze the embeddings and the first `count` blocks (no gradients, not in the optimizer)."""
    if count <= 0:
        return
    for module in (model.patch_embed, *model.blocks[:count]):
        module.requires_grad_(False)
    for name in EMBEDDING_PARAMETERS:
        if getattr(model, name, None) is not None:
            getattr(model, name).requires_grad_(False)
