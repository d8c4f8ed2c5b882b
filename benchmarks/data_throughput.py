"""Data pipeline throughput: vitdeep's WebDataset loaders against torchvision ImageFolder + DataLoader.

Both sides read the same real photos (random crops of scikit-learn's two sample photographs,
rescaled to ImageNet-like sizes and saved as JPEG), apply the same timm transforms (DeiT's
training recipe, or resize + centre crop for evaluation) with the same workers and batch size,
and deliver normalised float batches: torchvision normalises and randomly erases each image in
its workers (timm's standard transform); vitdeep ships uint8 batches and runs its
BatchPreprocessor (normalise + random erasing) on them, counted here on the CPU. Each number is
the best of a few full passes, worker start-up included. Training reads the lane order (any
number of ranks); the per-rank order that runs started before it keep is measured beside it.

`--feeding` (`run_feeding`, group 10 of `make bench`) measures what feeding the GPUs costs per
core: full-size shards, shards capped by `vitdeep shards --max-size`, and reduced JPEG decoding
on photos of 1,000 px or more, each against ImageFolder on the same photos.

    .venv/bin/python benchmarks/data_throughput.py [--images 1280] [--workers 2] [--batch 64] [--feeding]

`run()` and `run_feeding()` return the rows, for `benchmarks/run_all.py`.
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
from timm.data import create_transform
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from vitdeep.data.decode_rate import sample_photo_jpegs
from vitdeep.data.lane_layout import LaneLayout, choose_lanes
from vitdeep.data.pipeline import BatchPreprocessor, eval_loader, lane_loader, train_loader
from vitdeep.data.shards import write_shards
from vitdeep.data.transforms import AugmentConfig, with_zero_bit_posterize
from vitdeep.monitor import make_console

CLASSES = 10


def make_photos(root: Path, count: int, seed: int = 0, widths: tuple[int, int] = (320, 640)) -> dict:
    """`root/train/<class>/*.jpg`: crops of real photos at ImageNet-like sizes (JPEG quality 95;
    `widths` for larger ones), as `vitdeep plan --measure-data` measures without --data."""
    sizes = []
    for index, jpeg in enumerate(sample_photo_jpegs(count, seed, widths)):
        folder = root / "train" / f"class_{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:06d}.jpg"
        path.write_bytes(jpeg)
        sizes.append((*Image.open(path).size, len(jpeg)))
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


#: The configurations of the input-cost row: (name, photos, shards, reduced decoding).
FEEDING = (
    ("full-size shards, full decoding", "photos", "full", False),
    ("shards capped at {cap} px, full decoding", "photos", "capped", False),
    ("{large} px photos, full decoding", "large", "large", False),
    ("{large} px photos, reduced decoding", "large", "large", True),
)


def run_feeding(images: int = 512, workers: int = 1, batch: int = 64, img_size: int = 224, passes: int = 2, cap: int = 256,
                large: tuple[int, int] = (1000, 1600), workdir: str | None = None) -> list[dict]:
    """Per-core decode + augment rate (uint8 batches of DeiT's training transform, no
    normalisation or erasing on either side) of vitdeep's lane loader on full-size shards, shards
    capped at `cap` and, on photos `large` px wide, with and without reduced decoding, each against
    torchvision's ImageFolder + DataLoader reading the original photos with the same timm transform,
    workers and batch. Passes are interleaved over the configurations (best of `passes` each)."""
    torch.set_num_threads(1)
    full_decoding = AugmentConfig(reduced_decode=False)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        photos = {"photos": make_photos(tmp / "photos", images), "large": make_photos(tmp / "large", images, seed=1, widths=large)}
        shards = {"full": tmp / "full", "capped": tmp / "capped", "large": tmp / "large-shards"}
        write_shards(tmp / "photos", shards["full"], shard_size="64")
        write_shards(tmp / "photos", shards["capped"], shard_size="64", max_size=cap)
        write_shards(tmp / "large", shards["large"], shard_size="64")
        transform = with_zero_bit_posterize(create_transform(
            img_size, is_training=True, scale=(full_decoding.scale_min, full_decoding.scale_max), hflip=full_decoding.hflip,
            color_jitter=full_decoding.color_jitter, auto_augment=full_decoding.rand_augment,
            interpolation=full_decoding.interpolation, use_prefetcher=True))
        layout = LaneLayout(choose_lanes(batch, 1, workers, paired=True), batch, paired=True)

        def torchvision(kind: str) -> float:
            folder = ImageFolder(tmp / kind / "train", transform=transform)
            return _rate(DataLoader(folder, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers)) / workers

        def vitdeep(kind: str, reduced: bool) -> float:
            loader = lane_loader(shards[kind], layout=layout, micro_batch=batch, img_size=img_size, rank=0, world_size=1, seed=0,
                                 epoch=0, num_workers=workers, aug=AugmentConfig(reduced_decode=reduced))
            return _rate(loader, lambda b: b.images) / workers

        best: dict[int, list[float]] = {index: [0.0, 0.0] for index in range(len(FEEDING))}
        for _ in range(passes):
            for index, (_, source, kind, reduced) in enumerate(FEEDING):
                best[index][0] = max(best[index][0], torchvision(source))
                best[index][1] = max(best[index][1], vitdeep(kind, reduced))
    widths = f"{large[0]:,}–{large[1]:,}"
    return [{"pipeline": name.format(cap=cap, large=widths), "torchvision_img_s_per_core": best[i][0],
             "vitdeep_img_s_per_core": best[i][1], "ratio": best[i][1] / best[i][0], "images": photos[source],
             "workers": workers, "batch": batch, "img_size": img_size, "cap": cap}
            for i, (name, source, _, _) in enumerate(FEEDING)]


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


def print_feeding_table(rows: list[dict]) -> None:
    table = Table(title=f"Per-core decode + augment rate, DeiT's training transform, {rows[0]['img_size']} px, uint8 batches of "
                        f"{rows[0]['batch']}, {rows[0]['workers']} worker(s)")
    for column in ("configuration", "photos", "torchvision ImageFolder (img/s per core)", "vitdeep (img/s per core)", "ratio"):
        table.add_column(column, justify="left" if column in ("configuration", "photos") else "right")
    for row in rows:
        p = row["images"]
        table.add_row(row["pipeline"], f"{p['count']}, mean {p['width']}×{p['height']}", f"{row['torchvision_img_s_per_core']:,.0f}",
                      f"{row['vitdeep_img_s_per_core']:,.0f}", f"{row['ratio']:.2f}×")
    make_console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1280)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--feeding", action="store_true", help="the per-core rows: full-size / capped shards, reduced decoding")
    args = parser.parse_args()
    if args.feeding:
        print_feeding_table(run_feeding(args.images, 1, args.batch, args.img_size, args.passes))
        return
    print_table(run(args.images, args.workers, args.batch, args.img_size, args.passes))


if __name__ == "__main__":
    main()
