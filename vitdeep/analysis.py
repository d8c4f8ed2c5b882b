"""Over-smoothing diagnostics (docs/method.md §1): per-layer patch cosine similarity, attention
standard deviation and high-frequency energy ratio, streamed over many images in bounded memory.

The formulas and the streaming the engine logs during training and `vitdeep analyze`
(`vitdeep.commands.analyze`) reports. Each layer is reduced to its statistics as soon as its block
has run (`layer_curves`), so however deep the model and large the image, one attention map exists
at a time.

Layer indices: token metrics (`cossim`, `hf_ratio`) have L + 1 values, index 0 = patch + position
embedding (block 1's input) and l = after block l (the last after the final norm); `attn_std` has
L values, index i = block i + 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vitdeep.losses import patch_cosine_similarity

METRIC_NAMES = ("cossim", "attn_std", "hf_ratio")
METRIC_DEFINITIONS = {
    "cossim": "mean signed cosine between patch tokens i != j; index 0 = embeddings, l = after block l",
    "attn_std": "population std of each post-softmax attention row, mean over heads and queries; index i = block i+1",
    "hf_ratio": "||h - mean_tokens(h)||^2 / ||h||^2 over patch tokens; index 0 = embeddings, l = after block l",
}
#: Layer index of each metric's first value (attention starts at block 1, tokens at the embeddings).
FIRST_LAYER = {"cossim": 0, "attn_std": 1, "hf_ratio": 0}


def high_frequency_ratio(tokens: torch.Tensor) -> torch.Tensor:
    """‖h − mean_tokens(h)‖² / ‖h‖² of each sequence `[..., n, D]` → `[...]` (Wang et al. 2022):
    the share of energy outside the DC component that a low-pass attention stack removes."""
    h = tokens.float()
    high = (h - h.mean(dim=-2, keepdim=True)).square().sum(dim=(-2, -1))
    return high / h.square().sum(dim=(-2, -1)).clamp_min(torch.finfo(h.dtype).tiny)


def attention_std(attn: torch.Tensor) -> torch.Tensor:
    """Std over the keys of each attention row `[B, H, N, N]` (population std), averaged over
    heads, queries and images. Uniform rows give 0, one-hot rows sqrt(N − 1)/N."""
    return attn.float().std(dim=-1, correction=0).mean()


def token_statistics(patch_tokens: torch.Tensor) -> torch.Tensor:
    """`[CosSim, high-frequency ratio]` of one layer's patch tokens `[B, n, D]`, averaged over images."""
    return torch.stack([patch_cosine_similarity(patch_tokens).mean(), high_frequency_ratio(patch_tokens).mean()])


def layerwise_cosine_similarity(tokens: Sequence[torch.Tensor], num_prefix_tokens: int = 0) -> torch.Tensor:
    """CosSim of the patch tokens of each layer `[B, N, D]`, averaged over images → `[len(tokens)]`."""
    return torch.stack([patch_cosine_similarity(t[:, num_prefix_tokens:]).mean() for t in tokens])


def layerwise_attention_std(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """`attention_std` of each layer's attention maps `[B, H, N, N]` → `[L]`."""
    return torch.stack([attention_std(a) for a in attentions])


def layerwise_high_frequency_ratio(tokens: Sequence[torch.Tensor], num_prefix_tokens: int = 0) -> torch.Tensor:
    """`high_frequency_ratio` of the patch tokens of each layer, averaged over images."""
    return torch.stack([high_frequency_ratio(t[:, num_prefix_tokens:]).mean() for t in tokens])


def layer_curves(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three per-layer curves of one batch, each layer reduced inside the model's block loop.

    Goes through the module call (so DeepSpeed ZeRO-3's hooks gather parameters), with the images
    on the model's device and in its dtype.
    """
    param = next(model.parameters())
    out = model(images.to(device=param.device, dtype=param.dtype), aux=True, attention=True,
                reduce_tokens=token_statistics, reduce_attention=attention_std)
    tokens = torch.stack(out.tokens)
    return {"cossim": tokens[:, 0], "attn_std": torch.stack(out.attentions), "hf_ratio": tokens[:, 1]}


@dataclass
class OversmoothingMetrics:
    """Per-layer curves averaged over `num_images` images (layer indices: module docstring)."""

    cossim: list[float]
    attn_std: list[float]
    hf_ratio: list[float]
    num_images: int

    @property
    def depth(self) -> int:
        return len(self.attn_std)

    def layers(self, name: str) -> range:
        """The layer index of each value of metric `name`."""
        return range(FIRST_LAYER[name], FIRST_LAYER[name] + len(getattr(self, name)))

    def flat(self) -> dict[str, float]:
        """Scalars for TensorBoard: `cossim/layer_00` …, plus `cossim/last` and so on."""
        width = max(2, len(str(self.depth)))
        scalars = {}
        for name in METRIC_NAMES:
            values = getattr(self, name)
            scalars |= {f"{name}/layer_{layer:0{width}d}": v for layer, v in zip(self.layers(name), values)}
            scalars[f"{name}/last"] = values[-1]
        return scalars


class OversmoothingAccumulator:
    """Running per-layer sums over batches: memory is O(layers) however many images stream by."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.num_images = 0

    def update(self, curves: dict[str, torch.Tensor], num_images: int) -> None:
        """Add one batch's curves (`layer_curves`), each a mean over its `num_images` images."""
        for name, values in curves.items():
            total = values.detach().double().cpu() * num_images
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.num_images += num_images

    def compute(self) -> OversmoothingMetrics:
        if not self.num_images:
            raise ValueError("no images were accumulated")
        means = {name: (self.sums[name] / self.num_images).tolist() for name in METRIC_NAMES}
        return OversmoothingMetrics(**means, num_images=self.num_images)


@torch.no_grad()
def oversmoothing_metrics(model: nn.Module, images: torch.Tensor, max_images: int = 16) -> dict[str, float]:
    """Per-layer metrics of a fixed small batch, for logging during training every k steps.

    Cost is one forward pass with attention maps over at most `max_images` images, in eval mode
    (the previous mode is restored). Under ZeRO-3 every rank must call it (parameters are
    gathered collectively).
    """
    images = images[:max_images]
    was_training = model.training
    model.eval()
    try:
        accumulator = OversmoothingAccumulator()
        accumulator.update(layer_curves(model, images), len(images))
    finally:
        model.train(was_training)
    return accumulator.compute().flat()


@torch.no_grad()
def measure_model(
    model: nn.Module, batches: Iterable[torch.Tensor], on_batch: Callable[[int], None] | None = None
) -> OversmoothingMetrics:
    """Stream batches through the model (with attention maps) into running per-layer means;
    `on_batch(n)` is called after each batch of n images (progress)."""
    accumulator = OversmoothingAccumulator()
    for images in batches:
        accumulator.update(layer_curves(model, images), images.shape[0])
        if on_batch is not None:
            on_batch(images.shape[0])
    return accumulator.compute()
