"""Mixup / CutMix with label smoothing (timm's), and a patch-aligned CutMix for the patch-mixing loss.

With `patch_aligned`, the CutMix box is drawn on the patch grid (timm's box sampler, in grid units)
so every patch comes wholly from one image; the mixer then also returns, per patch, the batch index
of its source image and that image's label. λ is always the exact kept area, so the mean over
patches of "came from this image" equals the image-level λ (reference.md §2, ℓ_token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam

from vitdeep.data.options import MixConfig
from vitdeep.errors import UserError


@dataclass
class MixedBatch:
    """A mixed batch. `patch_source`/`patch_labels` are set when every patch has one source image:
    the batch was cut with the patch-aligned box, or (patch-aligned mixer) left unmixed."""

    images: torch.Tensor
    targets: torch.Tensor
    patch_labels: torch.Tensor | None
    patch_source: torch.Tensor | None
    lam: float


class _GridMixup(Mixup):
    """timm's batch-mode Mixup whose CutMix box lives on a `grid` of `cell`-pixel squares.

    A cell of 1 pixel is plain CutMix. Remembers the last λ and box (grid units) for the caller.
    """

    def __init__(self, cell: int, **kwargs):
        super().__init__(mode="batch", correct_lam=True, **kwargs)
        self.cell = cell
        self.lam = 1.0
        self.box: tuple[int, int, int, int] | None = None
        self.mixed = False

    def _mix_batch(self, x: torch.Tensor) -> float:
        lam, use_cutmix = self._params_per_batch()
        self.box, self.mixed = None, lam != 1.0
        if self.mixed and use_cutmix:
            grid = (x.shape[-2] // self.cell, x.shape[-1] // self.cell)
            self.box, lam = cutmix_bbox_and_lam(grid, lam, ratio_minmax=self.cutmix_minmax, correct_lam=True)
            y0, y1, x0, x1 = (int(v) * self.cell for v in self.box)
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        elif self.mixed:
            flipped = x.flip(0).mul_(1.0 - lam)  # copy before x is scaled in place
            x.mul_(lam).add_(flipped)
        self.lam = float(lam)
        return self.lam


class Mixer:
    """Callable `(images float [B,3,H,W], labels int64 [B]) -> MixedBatch`; mixes in place."""

    def __init__(self, cfg: MixConfig, num_classes: int, img_size: int, patch_size: int, label_smoothing: float = 0.0):
        if cfg.patch_aligned and img_size % patch_size:
            raise UserError(f"patch-aligned CutMix needs the image size ({img_size}) to be a multiple of the patch size ({patch_size})")
        self.aligned = cfg.patch_aligned
        self.grid = (img_size // patch_size, img_size // patch_size)
        self._mixup = _GridMixup(
            cell=patch_size if cfg.patch_aligned else 1,
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mix_prob,
            switch_prob=cfg.switch_prob,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> MixedBatch:
        if len(images) % 2:
            raise UserError(f"mixing needs an even micro-batch size (it pairs each image with the flipped batch), got {len(images)}")
        images, targets = self._mixup(images, labels)
        patch_source = None
        if self.aligned and (self._mixup.box is not None or not self._mixup.mixed):
            patch_source = self._patch_source(len(images), labels.device)
        patch_labels = labels[patch_source] if patch_source is not None else None
        return MixedBatch(images, targets, patch_labels, patch_source, self._mixup.lam)

    def _patch_source(self, batch: int, device: torch.device) -> torch.Tensor:
        """Batch index of each patch's source, patches in row-major order (as ViT flattens them)."""
        own = torch.arange(batch, device=device)
        source = own.view(batch, 1, 1).expand(batch, *self.grid).clone()
        if self._mixup.box is not None:
            y0, y1, x0, x1 = (int(v) for v in self._mixup.box)
            source[:, y0:y1, x0:x1] = own.flip(0).view(batch, 1, 1)
        return source.flatten(1)


def build_mixer(cfg: MixConfig, num_classes: int, img_size: int, patch_size: int, label_smoothing: float = 0.0) -> Mixer | None:
    """The batch mixer for a run, or None when mixing is off (targets are then plain labels).

    `label_smoothing` is the objective's (one value for image and patch targets).
    """
    return Mixer(cfg, num_classes, img_size, patch_size, label_smoothing) if cfg.enabled else None
