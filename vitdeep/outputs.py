"""What a model's auxiliary forward pass hands to the training objective and the diagnostics.

Neutral ground between the models, which build it, and the losses and metrics, which read it, so
that neither imports the other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AuxOutput(NamedTuple):
    """Everything the over-smoothing losses and diagnostics need from one forward pass.

    `tokens[0]` is the sequence entering block 1 and `tokens[l]` the output of block `l`; the
    last one is taken after the final norm. Each holds `num_prefix_tokens` prefix tokens (class /
    distillation) before the patches; CaiT's self-attention blocks see patches only, so its
    sequences have none. Use `patch_tokens(l)` rather than slicing by hand. A forward pass asked to
    reduce each layer as it goes (`reduce_tokens` / `reduce_attention`) holds the reductions in
    `tokens` / `attentions` instead, so that the L maps of a deep model never coexist.

    `patch_embeddings` `[B, n, D]` is the patch embedding's output before the position embedding
    is added (patches only): the first-layer features of ℓ_cons, as in the authors' code. With the
    position embedding in them, each patch's own position alone could meet the loss's positive term.

    A named tuple (not a dataclass) so that engines which hook module outputs (DeepSpeed ZeRO-3
    re-gathers parameters for the backward pass through them) see every tensor inside.
    """

    logits: torch.Tensor
    tokens: list[torch.Tensor]
    patch_embeddings: torch.Tensor
    attentions: list[torch.Tensor] | None
    patch_logits: torch.Tensor | None
    dist_logits: torch.Tensor | None
    num_prefix_tokens: int

    def patch_tokens(self, layer: int) -> torch.Tensor:
        """Patch tokens `[B, n, D]` of layer `layer` (0 = embeddings, -1 = last, after the norm)."""
        return self.tokens[layer][:, self.num_prefix_tokens :]
