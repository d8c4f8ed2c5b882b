"""How many images one CPU core decodes and augments per second, for `vitdeep plan`.

Only the CPU decodes and augments, so a ViT run at 224 px on fast GPUs is often bound by its
input pipeline: `plan` divides the images per second a node must deliver by this rate. Three
sources, best first:

- **measured here** (`plan --measure-data`): the run's own training transform (image size, the
  recipe's augmentation, reduced decoding or not) over the run's own shards (the first
  `MEASURE_IMAGES` of them; scikit-learn's two sample photos, cut at ImageNet-like sizes, without
  --data), one process on one core as a loader worker runs. Cached per machine and input
  (`cache_path`): the key holds the host, its CPU, Pillow's version, the image size, every
  augmentation option and the shards (their list, the first one's size and modification time),
  so changing any of them measures again.
- **given** (`plan --decode-rate N`): measured elsewhere, e.g. on a compute node when `plan` runs
  on a login node.
- **assumed**: the training row of `benchmarks/data_throughput.py` committed in
  benchmarks/results (another machine, other photos), which the plan names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdeep.data.info import DatasetInfo
from vitdeep.data.options import AugmentConfig
from vitdeep.errors import UserError

#: Images decoded and augmented per measurement (each timed pass goes over all of them), and the
#: least time measured (passes repeat until it is reached).
MEASURE_IMAGES, MEASURE_SECONDS = 96, 2.0
#: The environment variable naming the cache folder (else $XDG_CACHE_HOME/vitdeep, ~/.cache/vitdeep).
CACHE_VARIABLE = "VITDEEP_CACHE"
CACHE_NAME = "decode_rates.json"
#: Where the committed benchmark results live (the "assumed" rate).
BENCHMARK_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@dataclass(frozen=True)
class DecodeRate:
    """Images per second one CPU core decodes and augments, where the number came from
    (`measured here`, `cached`, `--decode-rate`, `assumed`) and what it was measured on."""

    per_core: float
    source: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def committed_decode_rate(results: Path = BENCHMARK_RESULTS) -> DecodeRate | None:
    """The training-pipeline row of `benchmarks/data_throughput.py` in benchmarks/results/*.json
    (images/s of the vitdeep loader divided by its worker processes); the fastest machine's."""
    rates = []
    for path in sorted(results.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for row in record.get("rows", []):
            extra = row.get("extra", {})
            if row.get("group", "").startswith("7") and row.get("name", "").startswith("train (DeiT") and extra.get("workers"):
                per_core = extra["vitdeep_img_s"] / extra["workers"]
                detail = f"{row.get('note', '')}; {record.get('machine', {}).get('name', path.stem)}, {record.get('date', '')}"
                rates.append(DecodeRate(per_core, "assumed", f"benchmarks/results/{path.name}: {detail}"))
    return max(rates, key=lambda r: r.per_core, default=None)


def cache_path() -> Path:
    root = os.environ.get(CACHE_VARIABLE) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitdeep"
    return Path(root) / CACHE_NAME


def measured_decode_rate(img_size: int, aug: AugmentConfig, data: DatasetInfo | None) -> DecodeRate:
    """The per-core rate of the run's training transform on its shards (`data`) or the sample
    photos, from the cache when this machine measured the same input before."""
    key = _cache_key(img_size, aug, _input_identity(data))
    cached = _read_cache().get(key)
    if isinstance(cached, dict) and isinstance(cached.get("per_core"), (int, float)) and 0 < cached["per_core"] < float("inf"):
        return DecodeRate(float(cached["per_core"]), "cached", str(cached.get("detail", "")))
    samples = _measure_samples(data)
    per_core = decode_and_augment_rate(samples, img_size, aug)
    what = f"{len(samples)} images of {data.urls[0] if data is not None else 'the sample photos'}"
    detail = f"{what}, {img_size} px, {platform.node()}, {time.strftime('%Y-%m-%d')}"
    _write_cache(key, {"per_core": per_core, "detail": detail})
    return DecodeRate(per_core, "measured here", detail)


def decode_and_augment_rate(samples: list[dict], img_size: int, aug: AugmentConfig, seconds: float | None = None) -> float:
    """Images per second one thread decodes and augments `samples` (raw shard samples) with the
    training transform, in passes until `seconds` (default `MEASURE_SECONDS`) have gone by (at
    least one)."""
    import torch

    from vitdeep.data.reduced_decode import takes_lazy_images
    from vitdeep.data.samples import BadSample, decode_sample
    from vitdeep.data.streams import preserved_rngs, reseed
    from vitdeep.data.transforms import train_transform

    seconds = MEASURE_SECONDS if seconds is None else seconds
    transform = train_transform(aug, img_size)
    lazy = takes_lazy_images(transform)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    images, start = 0, time.perf_counter()
    try:
        with preserved_rngs():
            while images == 0 or time.perf_counter() - start < seconds:
                for index, sample in enumerate(samples):
                    reseed(index)
                    try:
                        image, _ = decode_sample(sample, None, lazy=lazy)
                    except BadSample:
                        continue
                    transform(image)
                    images += 1
                if images == 0:
                    raise UserError("no image to measure the decoding rate on: every sample read is bad", params=("data",))
    finally:
        torch.set_num_threads(threads)
    return images / (time.perf_counter() - start)


def _measure_samples(data: DatasetInfo | None) -> list[dict]:
    """Up to `MEASURE_IMAGES` raw samples from the first shards, or the sample photos."""
    if data is None:
        return [{"jpg": jpeg, "cls": b"0"} for jpeg in sample_photo_jpegs(MEASURE_IMAGES)]
    from vitdeep.data.samples import BadDataLog, ReadStats, shard_samples

    samples = []
    for url in data.urls:
        for sample in shard_samples(url, BadDataLog(ReadStats(), log_limit=0)):
            samples.append(sample)
            if len(samples) == MEASURE_IMAGES:
                return samples
    if not samples:
        raise UserError(f"no sample could be read from {data.urls[0]} … to measure the decoding rate", params=("data",))
    return samples


def _input_identity(data: DatasetInfo | None) -> dict[str, Any]:
    """What the measurement reads: the sample photos, or the shard list (hashed) and the first
    shard's size and modification time when it is a local file."""
    if data is None:
        return {"photos": MEASURE_IMAGES}
    from vitdeep.data.samples import is_local

    first = data.urls[0]
    return {"urls": hashlib.sha256("\n".join(data.urls).encode()).hexdigest(), "images": MEASURE_IMAGES,
            **(_file_identity(first) if is_local(first) else {})}


def _file_identity(url: str) -> dict[str, int]:
    try:
        status = os.stat(url.removeprefix("file:"))
    except OSError:
        return {}
    return {"bytes": status.st_size, "mtime_ns": status.st_mtime_ns}


def sample_photo_jpegs(count: int, seed: int = 0, widths: tuple[int, int] = (320, 640)) -> list[bytes]:
    """JPEGs (quality 95) cut from scikit-learn's two sample photographs, each a random crop, half
    of them mirrored, resized to a width drawn from `widths` and 0.6-1.0 of it as high (by default
    ImageNet-like sizes, about 474 × 378 on average): the photos `benchmarks/data_throughput.py`
    measures on."""
    import numpy as np
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise UserError("measuring without `data` uses scikit-learn's sample photos: install scikit-learn "
                        "(pip install 'vitdeep[demo]'), or give the run's `data`", params=("data",)) from None
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    jpegs = []
    for index in range(count):
        photo = photos[index % len(photos)]
        h, w = rng.integers(180, photo.shape[0] + 1), rng.integers(240, photo.shape[1] + 1)
        y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        crop = photo[y : y + h, x : x + w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        width = int(rng.integers(*widths))
        height = int(width * rng.uniform(0.6, 1.0))
        out = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.BICUBIC).save(out, "JPEG", quality=95)
        jpegs.append(out.getvalue())
    return jpegs


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def _cache_key(img_size: int, aug: AugmentConfig, inputs: dict[str, Any]) -> str:
    import PIL

    identity = {"host": platform.node(), "cpu": _cpu_model(), "pillow": PIL.__version__, "img_size": img_size,
                "augment": dataclasses.asdict(aug), "inputs": inputs}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _read_cache() -> dict:
    """The cached rates ({} when the file is missing, unreadable or not ours)."""
    try:
        cache = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(key: str, record: dict) -> None:
    """Add `record` under `key`, replacing the file atomically; a cache that cannot be written is
    skipped (the rate is still used)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = {**_read_cache(), key: record}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{CACHE_NAME}.", delete=False) as scratch:
            scratch.write(json.dumps(cache, indent=1) + "\n")
        os.replace(scratch.name, path)
    except OSError:
        pass
