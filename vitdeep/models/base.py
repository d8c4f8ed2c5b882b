"""What the DeiT and CaiT models share: timm's model contract, the block loops and optimizer hooks.

The contract is timm's `VisionTransformer` / `Cait`: `forward_features` / `forward_head`,
`forward_intermediates` and `prune_intermediate_layers` (so `timm.create_model(...,
features_only=True)` works), `feature_info`, `num_features` / `head_hidden_size`,
`reset_classifier(num_classes, global_pool)`, `get_classifier`, `set_grad_checkpointing`, any input
size that tiles into patches (`dynamic_img_size`, the position embedding resampled on the fly as
timm does), and a plain forward path that `torch.jit.script` and `torch.fx` can trace. On top of
it, `forward_aux` (reached as `forward(x, aux=True)`) gives the objective and the diagnostics
every layer's tokens.

A family provides `embed_patches` / `embed` (the sequence entering block 1), `finish` (final
sequence after the blocks), `block_prefix_tokens` (prefix tokens in the blocks' sequences) and
`_prune_head`.
"""


from typing import Any, Callable, Optional, Union

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitdeep.errors import UserError
from vitdeep.outputs import AuxOutput

#: Pooling of the final sequence for the classifier: the class token, the mean of the patch
#: tokens, or none (`forward` then returns every token).
GLOBAL_POOLS = ("token", "avg", "")


def check_patch_grid(img_size: int, patch_size: int) -> int:
    """Patches per side; the image must tile exactly into patches."""
    for name, value in (("img_size", img_size), ("patch_size", patch_size)):
        if value <= 0:
            raise UserError(f"{name}={value} must be positive")
    if img_size % patch_size:
        raise UserError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
    return img_size // patch_size


def check_image_input(x: torch.Tensor, img_size: int, patch_size: int, dynamic: bool) -> None:
    """Images `[B, C, H, W]` of the model's size, or (dynamic size) of any size that tiles into patches."""
    if x.ndim != 4:
        raise UserError(f"expected images of shape [B, C, H, W], got {list(x.shape)}")
    height, width = x.shape[-2:]
    if dynamic and (height % patch_size or width % patch_size):
        raise UserError(f"image size {height}×{width} does not tile into {patch_size}-pixel patches")
    if not dynamic and (height, width) != (img_size, img_size):
        raise UserError(f"expected images of shape [B, C, {img_size}, {img_size}], got {list(x.shape)}")


# leaves for torch.fx: a traced model keeps the input check, and resamples (timm wraps the resampling
# in its own module only)
torch.fx.wrap("check_image_input")
torch.fx.wrap("resample_abs_pos_embed")


def check_global_pool(global_pool: str, allowed: tuple[str, ...] = GLOBAL_POOLS) -> str:
    if global_pool not in allowed:
        raise UserError(f"global_pool={global_pool!r} must be one of {', '.join(map(repr, allowed))}")
    return global_pool


class DeepTransformer(nn.Module):
    """Base of `VisionTransformer` and `Cait` (see the module docstring)."""

    def __init__(self, embed_dim: int, depth: int, patch_size: int, global_pool: str, dynamic_img_size: bool,
                 global_pools: tuple[str, ...] = GLOBAL_POOLS) -> None:
        super().__init__()
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.global_pools = global_pools
        self.global_pool = check_global_pool(global_pool, global_pools)
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.num_reg_tokens = 0
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (memory for the 48-block models)."""
        self.grad_checkpointing = enable

    # -- the plain path (scriptable, traceable) ------------------------------------------------

    def forward(self, x: torch.Tensor, aux: bool = False, attention: bool = False, reduce_tokens: Any = None, reduce_attention: Any = None):
        """Class logits `[B, C]` (with a distillation token: the mean of both heads, as DeiT).

        `aux=True` returns `forward_aux(x, attention, reduce_tokens, reduce_attention)` instead:
        going through the module call lets engines that hook it (DeepSpeed ZeRO-3 gathers
        parameters there) see every pass. TorchScript compiles, and torch.fx traces (where `aux`
        is a proxy, not a bool), the plain path only.
        """
        if not torch.jit.is_scripting():
            if isinstance(aux, bool) and aux:
                return self.forward_aux(x, attention, reduce_tokens, reduce_attention)
        return self.forward_head(self.forward_features(x))

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding `[B, H, W, D]` (a grid of patches), before any prefix or position."""
        if not torch.jit.is_scripting():
            check_image_input(x, self.img_size, self.patch_embed.patch_size[0], self.dynamic_img_size)
        return self.patch_embed(x)

    def position_embedding(self, grid: list[int]) -> torch.Tensor:
        """`pos_embed` for a patch grid: resampled (bicubic, prefix slots kept) when the grid is not
        the model's, as timm does with `dynamic_img_size`."""
        if not self.dynamic_img_size:
            return self.pos_embed
        return resample_abs_pos_embed(
            self.pos_embed, new_size=grid, old_size=self.patch_embed.grid_size, num_prefix_tokens=self.pos_embed_prefix_tokens
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.embed_patches(x))
        for block in self.blocks:
            if not torch.jit.is_scripting():
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, False, use_reentrant=False)[0]
                    continue
            x = block(x)[0]
        return self.finish(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The final sequence `[B, N, D]` pooled for the classifier (`global_pool`)."""
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.final_prefix_tokens :].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    # -- intermediate layers (timm's feature extraction) ---------------------------------------

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Block outputs, as timm's `VisionTransformer.forward_intermediates`.

        `indices`: the last n blocks (int), the listed blocks (negative from the end), or all
        (None); `norm` applies the final norm to each; `output_fmt` 'NCHW' gives patch grids
        `[B, D, H, W]`, 'NLC' token sequences `[B, n, D]`; `return_prefix_tokens` pairs each with its
        prefix tokens (class / distillation; CaiT's blocks have none). Returns the intermediates, or
        `(forward_features(x), intermediates)` unless `intermediates_only`.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise UserError(f"output_fmt={output_fmt!r} must be 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x = self.embed(self.embed_patches(x))
        intermediates = []
        for i, block in enumerate(self.blocks[: max_index + 1] if stop_early else self.blocks):
            x = self.run_block(block, x)[0]
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = self.block_prefix_tokens
        prefix_tokens = [y[:, :prefix] for y in intermediates]
        intermediates = [y[:, prefix:] for y in intermediates]
        if output_fmt == "NCHW":
            grid_h, grid_w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens and prefix:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.finish(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of `indices` (and the final norm / the head), as timm."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self._prune_head()
        return take_indices

    # -- the auxiliary path: every layer, for the objective and the diagnostics ------------------

    def forward_aux(
        self,
        x: torch.Tensor,
        attention: bool = False,
        reduce_tokens: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        reduce_attention: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> AuxOutput:
        """Logits plus per-layer tokens, the pre-position patch embeddings, attention maps (only
        when asked) and patch logits.

        `reduce_tokens(patch_tokens [B, n, D])` / `reduce_attention(attn [B, H, N, N])`, when given,
        reduce each layer as it is made (a map as its attention layer returns it, before the block's
        MLP runs), and only the results are kept: the diagnostics of a deep model at high resolution
        then hold one attention map at a time. Register tokens are left out of the tokens (as the
        prefix tokens) and of the attention maps (`without_registers`).
        """
        patches = self.embed_patches(x)
        x = self.embed(patches)
        prefix = self.block_prefix_tokens
        keep = (lambda t, start: t) if reduce_tokens is None else (lambda t, start: reduce_tokens(t[:, start:]))
        tokens = [keep(x, prefix)]
        attentions = []
        hooks = []
        if attention and (reduce_attention is not None or self.num_reg_tokens):
            hooks = [block.attn.register_forward_hook(_reducing_hook(self.without_registers, reduce_attention)) for block in self.blocks]
        try:
            for i, block in enumerate(self.blocks):
                x, attn = self.run_block(block, x, attention)
                if i < len(self.blocks) - 1:
                    tokens.append(keep(x, prefix))
                if attention:
                    attentions.append(attn)
        finally:
            for hook in hooks:
                hook.remove()
        final = self.finish(x)
        last = self.last_tokens(final)
        tokens.append(keep(last, prefix))
        logits, dist_logits = self.heads(final)
        return AuxOutput(
            logits=logits,
            tokens=tokens,
            patch_embeddings=patches.flatten(1, 2),
            attentions=attentions if attention else None,
            patch_logits=self.patch_head(final[:, self.final_prefix_tokens :]) if self.patch_head is not None else None,
            dist_logits=dist_logits,
            num_prefix_tokens=prefix,
        )

    def without_registers(self, attn: torch.Tensor) -> torch.Tensor:
        """An attention map `[B, H, N, N]` without the register tokens' rows and columns (the
        diagnostics leave registers out; the class / distillation tokens stay)."""
        if not self.num_reg_tokens:
            return attn
        end = self.block_prefix_tokens
        keep = torch.cat([torch.arange(end - self.num_reg_tokens), torch.arange(end, attn.shape[-1])]).to(attn.device)
        return attn.index_select(-1, keep).index_select(-2, keep)

    def run_block(self, block: nn.Module, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One block, recomputed in the backward pass under `set_grad_checkpointing` (eager paths)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, need_weights, use_reentrant=False)
        return block(x, need_weights)

    def last_tokens(self, final: torch.Tensor) -> torch.Tensor:
        """The last entry of `AuxOutput.tokens`: the final sequence, with the blocks' prefix layout."""
        return final

    def heads(self, final: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(class logits, distillation-head logits or None) of the final sequence."""
        return self.forward_head(final), None

    # -- weights, heads, optimizer hooks ---------------------------------------------------------

    def init_weights(self) -> None:
        """timm's ViT init: truncated normal (0.02) linears, talking-heads maps included (as timm's
        CaiT and the authors' code), zero biases. A model on the meta device (the planner's traces,
        the zoo's counts) has no values to draw: skipping them halves the build of a deep model."""
        if self.pos_embed.is_meta:
            return
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens and position embeddings. Biases, norms and the 1-D scales (γ, ω, λ) are left out
        of weight decay by their dimension (`param.ndim <= 1`), as timm's param groups do."""
        return {name for name in ("pos_embed", "cls_token", "dist_token", "reg_token") if getattr(self, name, None) is not None}

    @property
    def num_layer_ids(self) -> int:
        """Layer ids run 0 (embeddings) … num_layer_ids − 1 (final norm and heads)."""
        return len(self.blocks) + 2

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 for embeddings, i+1 for block i,
        the top id for everything after the blocks."""
        if name.startswith(("cls_token", "dist_token", "reg_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layer_ids - 1

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """timm's hook (used by `timm.optim.param_groups_layer_decay`), driven by `layer_id`."""
        return self.layer_id

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifier (and patch / distillation heads) for `num_classes` classes (0: none, so
        `forward` returns pooled features); `global_pool` changes the pooling too."""
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool, self.global_pools)
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

    def _prune_head(self) -> None:
        self.reset_classifier(0, "")


def _reducing_hook(select: Callable[[torch.Tensor], torch.Tensor], reduce: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> Callable:
    """A forward hook that replaces an attention layer's map `(out, attn)` by `reduce(select(attn))`
    (`select(attn)` without `reduce`)."""

    def hook(module: nn.Module, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out, attn = output
        attn = select(attn)
        return out, attn if reduce is None else reduce(attn)

    return hook


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
