"""Data pipeline throughput: vitdeep's WebDataset loaders against torchvision ImageFolder + DataLoader.

Both sides read the same real photos (random crops of scikit-learn's two sample photographs,
rescaled to ImageNet-like sizes and saved as JPEG), apply the same timm transforms (DeiT's
training recipe, or resize + centre crop for evaluation) with the same workers and batch size,
and deliver normalised float batches: torchvision normalises and randomly erases each image in
its workers (timm's standard transform); vitdeep ships uint8 batches and runs its
BatchPreprocessor (normalise + random erasing) on them, counted here on the CPU. Each number is
the best of a few full passes, worker start-up included. Training reads the lane order (any
number of ranks); the per-rank order that runs started before it keep is measured beside it.

    .venv/bin/python benchmarks/data_throughput.py [--images 1280] [--workers 2] [--batch 64]

`run()` returns the rows, for `benchmarks/run_all.py`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.table import Table
from sklearn.datasets import load_sample_images
from timm.data import create_transform
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from vitdeep.data.lane_layout import LaneLayout, choose_lanes
from vitdeep.data.pipeline import BatchPreprocessor, eval_loader, lane_loader, train_loader
from vitdeep.data.shards import write_shards
from vitdeep.data.transforms import AugmentConfig, with_zero_bit_posterize
from vitdeep.monitor import make_console

CLASSES = 10


def make_photos(root: Path, count: int, seed: int = 0) -> dict:
    """`root/train/<class>/*.jpg`: crops of real photos at ImageNet-like sizes (JPEG quality 95)."""
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    sizes = []
    for index in range(count):
        photo = photos[index % len(photos)]
        h, w = rng.integers(180, photo.shape[0] + 1), rng.integers(240, photo.shape[1] + 1)
        y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        crop = photo[y : y + h, x : x + w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        width = int(rng.integers(320, 640))
        height = int(width * rng.uniform(0.6, 1.0))
        folder = root / "train" / f"class_{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:06d}.jpg"
        Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.BICUBIC).save(path, quality=95)
        sizes.append((width, height, path.stat().st_size))
    width, height, nbytes = np.mean(sizes, axis=0)
    return {"count": count, "width": round(width), "height": round(height), "kbytes": round(nbytes / 1e3)}


def _rate(batches: Iterable, prepare: Callable[[object], torch.Tensor] = lambda batch: batch[0]) -> float:
    """Images per second over one full pass (worker start-up included). Each float batch is read
    once, as a model's first layer would read it."""
    start, images = time.perf_counter(), 0
    for batch in batches:
        x = prepare(batch)
        x.sum()
        images += len(x)
    return images / (time.perf_counter() - start)


def _best(passes: int, make: Callable[[], float]) -> float:
    return max(make() for _ in range(passes))


def run(images: int = 1280, workers: int = 2, batch: int = 64, img_size: int = 224, passes: int = 3,
        workdir: str | None = None) -> list[dict]:
    """Measure both pipelines; one row per pipeline with images/s of each side and their ratio."""
    torch.set_num_threads(1)
    aug = AugmentConfig()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root, shards = Path(tmp) / "photos", Path(tmp) / "shards"
        photos = make_photos(root, images)
        write_shards(root, shards, shard_size="128")
        folder_train = ImageFolder(root / "train", transform=with_zero_bit_posterize(create_transform(
            img_size, is_training=True, scale=(aug.scale_min, aug.scale_max), hflip=aug.hflip, color_jitter=aug.color_jitter,
            auto_augment=aug.rand_augment, interpolation=aug.interpolation, re_prob=aug.reprob, re_mode=aug.remode,
            re_count=aug.recount)))
        folder_eval = ImageFolder(root / "train", transform=create_transform(
            img_size, is_training=False, crop_pct=aug.crop_ratio, interpolation=aug.interpolation))

        def torchvision(dataset, train: bool) -> float:
            return _rate(DataLoader(dataset, batch_size=batch, shuffle=train, drop_last=train, num_workers=workers))

        def vitdeep(kind: str) -> float:
            if kind == "train":
                layout = LaneLayout(choose_lanes(batch, 1, workers, paired=True), batch, paired=True)
                loader = lane_loader(shards, layout=layout, micro_batch=batch, img_size=img_size, rank=0, world_size=1, seed=0,
                                     epoch=0, num_workers=workers, aug=aug)
                preprocess = BatchPreprocessor(aug, "cpu")
                return _rate(loader, lambda b: preprocess(b.images, train=True, seeds=b.seeds))
            if kind == "per-rank":
                loader = train_loader(shards, micro_batch=batch, img_size=img_size, rank=0, world_size=1, seed=0,
                                      epoch=0, num_workers=workers, aug=aug)
                return _rate(loader, lambda b: BatchPreprocessor(aug, "cpu")(b[0], train=True))
            loader = eval_loader(shards, micro_batch=batch, img_size=img_size, crop_ratio=aug.crop_ratio, rank=0,
                                 world_size=1, num_workers=workers, split="train")
            preprocess = BatchPreprocessor(None, "cpu")
            return _rate(loader, lambda b: preprocess(b[0]))

        rows = []
        for name, dataset, kind in (("train (DeiT augmentation)", folder_train, "train"),
                                    ("train, the per-rank order of runs before the lanes", folder_train, "per-rank"),
                                    ("eval (resize + centre crop)", folder_eval, "eval")):
            baseline = _best(passes, lambda: torchvision(dataset, kind != "eval"))
            ours = _best(passes, lambda: vitdeep(kind))
            rows.append({"pipeline": name, "torchvision_img_s": baseline, "vitdeep_img_s": ours, "ratio": ours / baseline,
                         "images": photos, "workers": workers, "batch": batch, "img_size": img_size})
    return rows


def print_table(rows: list[dict]) -> None:
    p = rows[0]["images"]
    table = Table(title=(
        f"Data throughput: {p['count']:,} real photos (JPEG, mean {p['width']}×{p['height']}, {p['kbytes']} KB), "
        f"{rows[0]['img_size']} px, batch {rows[0]['batch']}, {rows[0]['workers']} workers, CPU"
    ))
    for column in ("pipeline", "torchvision ImageFolder (img/s)", "vitdeep WebDataset (img/s)", "ratio"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    for row in rows:
        table.add_row(row["pipeline"], f"{row['torchvision_img_s']:,.0f}", f"{row['vitdeep_img_s']:,.0f}", f"{row['ratio']:.2f}×")
    make_console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1280)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    print_table(run(args.images, args.workers, args.batch, args.img_size, args.passes))


if __name__ == "__main__":
    main()
