"""`vitdeep analyze`: which models (a checkpoint, `--compare` sources, random inits) over which
images (shards or a folder), measured with `vitdeep.analysis`, written as metrics.json, a PNG and
TensorBoard events, and summarised in a table. Nothing is written when an input is bad.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from vitdeep.analysis import METRIC_DEFINITIONS, METRIC_NAMES, OversmoothingMetrics, measure_model
from vitdeep.architecture import EVAL_CROP_RATIO
from vitdeep.data.options import IMAGE_EXTENSIONS, ReadPolicy
from vitdeep.engine.weights import build_model, read_weights, source_architecture, source_crop_ratio
from vitdeep.errors import UserError
from vitdeep.fields import clip, shown
from vitdeep.models import MODELS, create_model, get_spec
from vitdeep.monitor import image_progress
from vitdeep.paths import check_output_dir, checkpoint_inputs, claim_outputs, data_folders

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def parse_option_value(text: str) -> bool | int | float | str | None:
    """`true`/`false`/`none`, then int, then float, else the string itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_model_options(pairs: Iterable[str]) -> dict:
    """`-O KEY=VALUE` pairs, for the model options no flag sets (`distilled`, `patch_head`,
    `mlp_ratio` …): `["distilled=true", "mlp_ratio=2"]` → `{"distilled": True, "mlp_ratio": 2}`."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"model option {shown(pair)} is not KEY=VALUE")
        parsed = parse_option_value(value)
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise UserError(f"model option {clip(pair)} is not a finite number")
        options[key.strip()] = parsed
    return options


@dataclass(frozen=True)
class ModelSource:
    """One model to analyse: `model` at a seeded random init, or `checkpoint`, anything
    `vitdeep.engine.weights.read_weights` reads (a vitdeep run / checkpoint / export knows its
    model; a plain state dict needs `model`). `options` override the architecture (e.g. img_size)."""

    label: str
    model: str | None
    options: dict = field(default_factory=dict)
    checkpoint: Path | None = None
    seed: int = 0
    ema: bool = False

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            with torch.device("meta"):  # checks the name and options at no cost
                create_model(self.model, **self.options)
        elif not Path(self.checkpoint).exists():
            raise UserError(f"checkpoint not found: {self.checkpoint}")

    def describe(self) -> dict:
        return {"model": self.model, "options": self.options, "checkpoint": str(self.checkpoint) if self.checkpoint else None}


def load_model_for_analysis(source: ModelSource) -> tuple[nn.Module, list[str]]:
    """The source's model in eval mode (seeded random init, or its checkpoint's weights) and the
    lines that say what loading changed (resampled position embeddings, new heads …)."""
    torch.manual_seed(source.seed)
    if source.checkpoint is None:
        return create_model(source.model, **source.options).eval(), []
    model, report = build_model(read_weights(source.checkpoint, ema=source.ema), source.model, **source.options)
    return model.eval(), report.lines()


def resolve_model_sources(
    model: str | None, checkpoint: Path | None, compare: Sequence[str], options: dict, seed: int = 0, ema: bool = False
) -> list[ModelSource]:
    """The sources of one `analyze` run: `--checkpoint` (else `--model` at random init), then each
    `--compare [LABEL=]SOURCE`. A model named at random init follows the architecture of the
    first vitdeep run or export among them (`random_init_options`). Every source is checked before
    anything runs."""
    if checkpoint is not None:
        first = [ModelSource(str(checkpoint), model, options, Path(checkpoint), seed, ema)]
    elif model is not None:
        first = [ModelSource(f"{model} random init", model, options, None, seed)]
    elif compare:
        first = []
    else:
        raise UserError("give a --checkpoint, a --model NAME to analyse at random init, or --compare sources")
    sources = first + [compare_source(spec, model, options, seed, ema) for spec in compare]
    analysed = next((found for source in sources
                     if source.checkpoint is not None and (found := source_architecture(source.checkpoint)) is not None), None)
    if analysed is not None:
        sources = [source if source.checkpoint is not None else
                   replace(source, options={**random_init_options(source.model, *analysed), **source.options}) for source in sources]
    labels = [source.label for source in sources]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"two sources share the label '{duplicates[0]}': name them with --compare LABEL=SOURCE")
    return sources


#: What a model at random init takes from the run it is compared with whatever its name: the
#: images it sees and the classes it predicts (its name fixes depth, width, heads and switches).
INPUT_OPTIONS = ("img_size", "patch_size", "num_classes")


def random_init_options(name: str, analysed_name: str, analysed_options: dict) -> dict:
    """The options a random init named `name` takes from the analysed run (the first vitdeep run
    or export among the sources), under the flags given: all of them when it names the run's own
    model (`--compare random=deit_tiny_24` next to a deit_tiny_24 run of width 64 at 16 px is that
    model at random init, not the 224 px width-192 default), else `INPUT_OPTIONS`."""
    if get_spec(name).name == get_spec(analysed_name).name:
        return dict(analysed_options)
    return {key: analysed_options[key] for key in INPUT_OPTIONS if key in analysed_options}


def run_crop_ratio(sources: Sequence[ModelSource]) -> float:
    """The centre crop of the first source that was validated with one (a vitdeep run or export
    records its `crop_ratio`), else DeiT's: every source sees the same images."""
    known = (source_crop_ratio(source.checkpoint) for source in sources if source.checkpoint is not None)
    return next((ratio for ratio in known if ratio is not None), EVAL_CROP_RATIO)


def compare_source(spec: str, model: str | None, options: dict, seed: int = 0, ema: bool = False) -> ModelSource:
    """`[LABEL=]SOURCE`: SOURCE is a checkpoint (of `model` when it is a plain state dict), or a
    model name (random init)."""
    label, sep, target = spec.partition("=")
    if not sep or Path(spec).exists():
        label, target = "", spec
    if Path(target).exists():
        return ModelSource(label or target, model, options, Path(target), seed, ema)
    if target.removeprefix("vitdeep_") in MODELS:
        return ModelSource(label or f"{target} random init", target, options, None, seed)
    raise UserError(f"--compare '{target}' is neither a checkpoint nor a model name (see `vitdeep models`)")


class ImageSource(Protocol):
    """Where `analyze` reads images: `num_images` images as float batches at a model's resolution.
    `batches` can be called once per model (each model sees the same images)."""

    num_images: int
    crop_ratio: float

    def batches(self, img_size: int) -> Iterator[torch.Tensor]: ...

    def describe(self) -> str: ...


def list_images(folder: Path, num_images: int, seed: int = 0) -> list[Path]:
    """Image files under `folder` (flat or ImageFolder tree); a seeded sample of `num_images`
    when there are more, so every class of a sorted tree is represented."""
    if num_images <= 0:
        raise UserError(f"--num-images must be positive, got {num_images}")
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    paths = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower().removeprefix(".") in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if not paths:
        raise UserError(f"no images ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}) under {folder}")
    if len(paths) > num_images:
        paths = sorted(random.Random(seed).sample(paths, num_images))
    return paths


def iter_image_batches(
    paths: Sequence[Path], img_size: int, batch_size: int, crop_ratio: float = EVAL_CROP_RATIO
) -> Iterator[torch.Tensor]:
    """Float batches `[B, 3, S, S]` through the evaluation pipeline's transform and normalisation
    (resize, centre crop, ImageNet mean / std), as the shards' eval loader gives them."""
    from PIL import Image

    from vitdeep.data.pipeline import BatchPreprocessor
    from vitdeep.data.transforms import eval_transform

    transform = eval_transform(img_size, crop_ratio)
    normalise = BatchPreprocessor(None, "cpu")
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            try:
                with Image.open(path) as image:
                    images.append(transform(image.convert("RGB")))
            except OSError as error:
                raise UserError(f"cannot read image {path}: {error}") from error
        yield normalise(torch.stack(images))


@dataclass
class ImageFolderSource:
    """Images from a folder (`--images DIR`)."""

    folder: Path
    requested: int
    batch_size: int = 32
    seed: int = 0
    crop_ratio: float = EVAL_CROP_RATIO

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        self.paths = list_images(Path(self.folder), self.requested, self.seed)
        self.num_images = len(self.paths)

    def batches(self, img_size: int) -> Iterator[torch.Tensor]:
        return iter_image_batches(self.paths, img_size, self.batch_size, self.crop_ratio)

    def describe(self) -> str:
        return str(self.folder)


@dataclass
class ShardSource:
    """The first `requested` samples of a sharded set (`--data SHARDS`), through the exact-once
    evaluation pipeline (resize, centre crop, ImageNet normalisation)."""

    data: str
    requested: int
    batch_size: int = 32
    split: str = "val"
    workers: int = 2
    crop_ratio: float = EVAL_CROP_RATIO

    def __post_init__(self) -> None:
        from vitdeep.data.pipeline import read_dataset_info

        if self.requested <= 0:
            raise UserError(f"--num-images must be positive, got {self.requested}")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        self.info = read_dataset_info(self.data, split=self.split)
        self.num_images = min(self.requested, self.info.require_num_samples())
        if not self.num_images:
            raise UserError(f"no readable image in {self.data}: its shards hold no sample")

    def batches(self, img_size: int) -> Iterator[torch.Tensor]:
        """The images as batches; `UserError` when not one of them can be read (a foreign tar
        whose members are all bad, say), rather than metrics over nothing."""
        from vitdeep.data.pipeline import BatchPreprocessor, eval_loader

        loader = eval_loader(self.info, micro_batch=self.batch_size, img_size=img_size, crop_ratio=self.crop_ratio, rank=0,
                             world_size=1, num_workers=self.workers)
        preprocess = BatchPreprocessor(None, "cpu")
        left = self.num_images
        for images, _ in loader:
            yield preprocess(images[:left])
            left -= len(images)
            if left <= 0:
                break
        if left == self.num_images:
            causes = ", ".join(f"{count} {cause}" for cause, count in loader.stats.bad.items()) or "none"
            raise UserError(f"no readable image in {self.data} (bad samples: {causes})")

    def describe(self) -> str:
        return str(self.data)


def resolve_image_source(
    images: Path | None,
    num_images: int,
    batch_size: int = 32,
    seed: int = 0,
    data: str | None = None,
    crop_ratio: float = EVAL_CROP_RATIO,
) -> ImageSource:
    """The images of one `analyze` run: `--images DIR` or `--data SHARDS`, centre-cropped by
    `crop_ratio` as the models were evaluated."""
    if (images is None) == (data is None):
        raise UserError("give the images to analyse with either --images DIR or --data SHARDS")
    if data is not None:
        return ShardSource(data, num_images, batch_size, crop_ratio=crop_ratio)
    return ImageFolderSource(Path(images), num_images, batch_size, seed, crop_ratio)


def resolve_device(device: str | None) -> torch.device:
    """`None` = the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UserError(f"unknown device '{device}'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but no GPU is available")
    return resolved


def analyze_sources(
    sources: Sequence[ModelSource], images: ImageSource, device: torch.device, console: Console | None = None
) -> dict[str, OversmoothingMetrics]:
    """Metrics of every source over the same images, one at a time (one model in memory)."""
    results = {}
    with image_progress(console) as progress:
        for source in sources:
            model, load_report = load_model_for_analysis(source)
            for line in load_report:
                progress.console.print(f"{source.label}: {line}")
            task = progress.add_task(source.label, total=images.num_images)
            model = model.to(device)
            batches = images.batches(model.img_size)
            results[source.label] = measure_model(model, batches, lambda n, task=task: progress.advance(task, n))
            del model
    return results


def _tag(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._- " else "_" for c in label)


def write_tensorboard(log_dir: Path, results: dict[str, OversmoothingMetrics], figure: Figure) -> None:
    """Each curve as scalars with the layer index as step (`cossim/<label>` …), plus the figure."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for label, metrics in results.items():
            for name in METRIC_NAMES:
                for layer, value in zip(metrics.layers(name), getattr(metrics, name)):
                    writer.add_scalar(f"{name}/{_tag(label)}", value, global_step=layer)
        writer.add_figure("oversmoothing", figure, close=False)


def analysis_paths(out: Path) -> dict[str, Path]:
    """What `write_analysis` writes under `out`."""
    return {"json": out / "metrics.json", "png": out / "oversmoothing.png", "tensorboard": out / "tb"}


def write_analysis(
    out: Path, results: dict[str, OversmoothingMetrics], sources: Sequence[ModelSource], images: ImageSource
) -> dict[str, Path]:
    """`metrics.json`, `oversmoothing.png` and TensorBoard events `tb/` under `out` (an earlier
    `tb/` is replaced, not added to: its curves would show twice)."""
    from vitdeep.plots import oversmoothing_figure

    out.mkdir(parents=True, exist_ok=True)
    paths = analysis_paths(out)
    shutil.rmtree(paths["tensorboard"], ignore_errors=True)
    described = {source.label: source.describe() for source in sources}
    report = {
        "images": images.describe(),
        "crop_ratio": images.crop_ratio,
        "definitions": METRIC_DEFINITIONS,
        "sources": {label: described[label] | asdict(metrics) for label, metrics in results.items()},
    }
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    figure = oversmoothing_figure(results)
    figure.savefig(paths["png"], dpi=120)
    write_tensorboard(paths["tensorboard"], results, figure)
    return paths


def print_summary(console: Console, results: dict[str, OversmoothingMetrics], paths: dict[str, Path]) -> None:
    table = Table(title="Over-smoothing per source (first → last layer)")
    for column in ("source", "images", "blocks", "patch CosSim", "attention std", "HF energy ratio"):
        table.add_column(column, justify="left" if column == "source" else "right", overflow="fold")
    for label, m in results.items():
        curves = [f"{values[0]:.3g} → {values[-1]:.3g}" for values in (m.cossim, m.attn_std, m.hf_ratio)]
        table.add_row(label, str(m.num_images), str(m.depth), *curves)
    console.print(table)
    console.print("wrote " + ", ".join(str(path) for path in paths.values()))


def run_analyze(
    *,
    model: str | None,
    checkpoint: Path | None,
    images: Path | None,
    out: Path,
    data: str | None = None,
    ema: bool = False,
    compare: Sequence[str] = (),
    num_images: int = 1000,
    batch_size: int = 32,
    options: dict | None = None,
    seed: int = 0,
    device: str | None = None,
    crop_ratio: float | None = None,
    overwrite: bool = False,
    reads: ReadPolicy | None = None,
) -> dict[str, OversmoothingMetrics]:
    """`vitdeep analyze`: check every input and the outputs (never an input, nor existing files
    without `overwrite`), measure every source, then write the outputs (nothing is written when
    an input is bad or a model fails to load). `reads` sets the timeouts and retries of remote
    shard reads (default: the process's)."""
    from vitdeep.data.storage import use_read_policy
    from vitdeep.monitor import make_console

    if reads is not None:
        use_read_policy(reads)
    out = Path(out)
    check_output_dir(out, "--out")
    sources = resolve_model_sources(model, checkpoint, compare, options or {}, seed, ema)
    read = [*data_folders(data), *([images] if images is not None else []),
            *(path for source in sources for path in checkpoint_inputs(source.checkpoint))]
    claim_outputs(list(analysis_paths(out).values()), read, flag="--out", overwrite=overwrite)
    if crop_ratio is None:
        crop_ratio = run_crop_ratio(sources)
    image_source = resolve_image_source(images, num_images, batch_size, seed, data, crop_ratio)
    console = make_console()
    results = analyze_sources(sources, image_source, resolve_device(device), console)
    print_summary(console, results, write_analysis(out, results, sources, image_source))
    return results
