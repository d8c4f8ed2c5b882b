"""Mixup / CutMix with label smoothing (timm's), and a patch-aligned CutMix for the patch-mixing loss.

With `patch_aligned`, the CutMix box is drawn on the patch grid (timm's box sampler, in grid units)
so every patch comes wholly from one image; the mixer then also returns, per patch, the batch index
of its source image and that image's label. λ is always the exact kept area, so the mean over
patches of "came from this image" equals the image-level λ (ℓ_token, docs/method.md §2).

Two ways to draw: given each sample's seed (training runs in the lane order, `vitdeep.data.lanes`),
the batch is mixed in *pairs* `(2p, 2p+1)`, each with its own λ, choice of Mixup or CutMix and box
drawn by timm's samplers from the pair's seed, as timm's `pair` mode draws per pair; so mixing does
not depend on the micro-batch a pair lands in. Without seeds (runs started before the lane order),
timm's `batch` mode: one λ for the batch, each image mixed with the flipped batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, one_hot

from vitdeep.data.options import MixConfig
from vitdeep.data.seeding import MIX, derive
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
    #: Pair mixing: bool [B], the samples Mixup blended (their patches take the image's target).
    patch_soft: torch.Tensor | None = None


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

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor | None = None) -> MixedBatch:
        """Mix `images` in place; with `seeds` (int64 [B], one per sample) in pairs `(2p, 2p+1)`,
        each drawn from the seed of its first sample, else as one batch."""
        if len(images) % 2:
            raise UserError(f"mixing needs an even micro-batch size (it pairs each image with the flipped batch), got {len(images)}")
        if seeds is not None:
            return self._mix_pairs(images, labels, seeds)
        images, targets = self._mixup(images, labels)
        patch_source = None
        if self.aligned and (self._mixup.box is not None or not self._mixup.mixed):
            patch_source = self._patch_source(len(images), labels.device)
        patch_labels = labels[patch_source] if patch_source is not None else None
        return MixedBatch(images, targets, patch_labels, patch_source, self._mixup.lam)

    def _pair_draws(self, seeds: torch.Tensor, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pair: λ (the kept area for CutMix), CutMix or not, and the box in `grid` cells, drawn
        by timm's samplers from numpy's generator seeded by the pair (the caller's state restored)."""
        pair_seeds = derive(seeds[0::2].cpu(), MIX)
        lams, cut, boxes = np.ones(len(pair_seeds)), np.zeros(len(pair_seeds), dtype=bool), np.zeros((len(pair_seeds), 4), dtype=np.int64)
        saved = np.random.get_state()
        try:
            for p, seed in enumerate(pair_seeds.tolist()):
                np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
                lam, use_cutmix = self._mixup._params_per_batch()
                if lam != 1.0 and use_cutmix:
                    boxes[p], lam = cutmix_bbox_and_lam(grid, lam, ratio_minmax=self._mixup.cutmix_minmax, correct_lam=True)
                    cut[p] = True
                lams[p] = lam
        finally:
            np.random.set_state(saved)
        return lams, cut, boxes

    def _mix_pairs(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> MixedBatch:
        """Mix each pair in place as timm's `pair` mode does: its CutMix box swapped between the two
        (cell-aligned), or both blended by its λ."""
        cell = self._mixup.cell
        grid = (images.shape[-2] // cell, images.shape[-1] // cell)
        lams, cut, boxes = self._pair_draws(seeds, grid)
        device, batch = images.device, len(images)
        for p in np.flatnonzero(cut).tolist():
            y0, y1, x0, x1 = (int(v) * cell for v in boxes[p])
            first = images[2 * p, :, y0:y1, x0:x1].clone()
            images[2 * p, :, y0:y1, x0:x1] = images[2 * p + 1, :, y0:y1, x0:x1]
            images[2 * p + 1, :, y0:y1, x0:x1] = first
        blended = np.flatnonzero((lams != 1.0) & ~cut)
        if len(blended):
            first, second = torch.from_numpy(2 * blended).to(device), torch.from_numpy(2 * blended + 1).to(device)
            lam = torch.from_numpy(lams[blended]).to(device=device, dtype=images.dtype).view(-1, 1, 1, 1)
            a, b = images[first], images[second]
            images[first] = a * lam + b * (1 - lam)
            images[second] = b * lam + a * (1 - lam)
        lam = torch.from_numpy(np.repeat(lams, 2)).to(device=device, dtype=torch.float32)
        smoothing = self._mixup.label_smoothing
        off = smoothing / self._mixup.num_classes
        own = one_hot(labels, self._mixup.num_classes, on_value=1.0 - smoothing + off, off_value=off)
        other = own.view(batch // 2, 2, -1).flip(1).reshape(own.shape)
        targets = own * lam[:, None] + other * (1 - lam[:, None])
        patch_source = patch_labels = patch_soft = None
        if self.aligned:
            in_box = self._box_mask(np.repeat(cut, 2), np.repeat(boxes, 2, axis=0), grid, device)
            own_index = torch.arange(batch, device=device)
            partner_index = own_index.view(-1, 2).flip(1).reshape(-1)
            patch_source = torch.where(in_box, partner_index.view(-1, 1, 1), own_index.view(-1, 1, 1)).flatten(1)
            patch_labels = labels[patch_source]
            patch_soft = torch.from_numpy(np.repeat((lams != 1.0) & ~cut, 2)).to(device)
        return MixedBatch(images, targets, patch_labels, patch_source, float(lams.mean()), patch_soft)

    @staticmethod
    def _box_mask(cut: np.ndarray, boxes: np.ndarray, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """bool [B, grid_h, grid_w]: the cells inside each sample's CutMix box (none without CutMix)."""
        rows = torch.arange(grid[0], device=device).view(1, -1, 1)
        cols = torch.arange(grid[1], device=device).view(1, 1, -1)
        y0, y1, x0, x1 = (torch.from_numpy(boxes[:, i]).to(device).view(-1, 1, 1) for i in range(4))
        inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        return inside & torch.from_numpy(cut).to(device).view(-1, 1, 1)

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
