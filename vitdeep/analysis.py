"""Over-smoothing diagnostics (reference.md §1): per-layer patch cosine similarity, attention
standard deviation and high-frequency energy ratio, streamed over many images in bounded memory,
plus `vitdeep analyze` (model and image sources → metrics.json, a PNG and TensorBoard events).

Layer indices: token metrics (`cossim`, `hf_ratio`) have L + 1 values, index 0 = patch + position
embedding (block 1's input) and l = after block l (the last after the final norm); `attn_std` has
L values, index i = block i + 1.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from vitdeep.data.transforms import AugmentConfig
from vitdeep.errors import UserError
from vitdeep.losses import patch_cosine_similarity
from vitdeep.models import MODELS, AuxOutput, create_model
from vitdeep.monitor import image_progress
from vitdeep.paths import check_output_dir

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRIC_NAMES = ("cossim", "attn_std", "hf_ratio")
METRIC_DEFINITIONS = {
    "cossim": "mean signed cosine between patch tokens i != j; index 0 = embeddings, l = after block l",
    "attn_std": "population std of each post-softmax attention row, mean over heads and queries; index i = block i+1",
    "hf_ratio": "||h - mean_tokens(h)||^2 / ||h||^2 over patch tokens; index 0 = embeddings, l = after block l",
}
#: Layer index of each metric's first value (attention starts at block 1, tokens at the embeddings).
FIRST_LAYER = {"cossim": 0, "attn_std": 1, "hf_ratio": 0}
#: DeiT's evaluation centre crop (the augmentation config's default).
EVAL_CROP_RATIO = AugmentConfig().crop_ratio
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def high_frequency_ratio(tokens: torch.Tensor) -> torch.Tensor:
    """‖h − mean_tokens(h)‖² / ‖h‖² of each sequence `[..., n, D]` → `[...]` (Wang et al. 2022):
    the share of energy outside the DC component that a low-pass attention stack removes."""
    h = tokens.float()
    high = (h - h.mean(dim=-2, keepdim=True)).square().sum(dim=(-2, -1))
    return high / h.square().sum(dim=(-2, -1)).clamp_min(torch.finfo(h.dtype).tiny)


def layerwise_cosine_similarity(tokens: Sequence[torch.Tensor], num_prefix_tokens: int = 0) -> torch.Tensor:
    """CosSim of the patch tokens of each layer `[B, N, D]`, averaged over images → `[len(tokens)]`."""
    return torch.stack([patch_cosine_similarity(t[:, num_prefix_tokens:]).mean() for t in tokens])


def layerwise_attention_std(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Std over the keys of each attention row `[B, H, N, N]` (population std), averaged over
    heads, queries and images → `[L]`. Uniform rows give 0, one-hot rows sqrt(N − 1)/N."""
    return torch.stack([a.float().std(dim=-1, correction=0).mean() for a in attentions])


def layerwise_high_frequency_ratio(tokens: Sequence[torch.Tensor], num_prefix_tokens: int = 0) -> torch.Tensor:
    """`high_frequency_ratio` of the patch tokens of each layer, averaged over images."""
    return torch.stack([high_frequency_ratio(t[:, num_prefix_tokens:]).mean() for t in tokens])


def batch_metrics(out: AuxOutput) -> dict[str, torch.Tensor]:
    """The three per-layer curves of one batch (needs `model(x, aux=True, attention=True)`)."""
    if out.attentions is None:
        raise ValueError("over-smoothing metrics need the attention maps: call model(x, aux=True, attention=True)")
    return {
        "cossim": layerwise_cosine_similarity(out.tokens, out.num_prefix_tokens),
        "attn_std": layerwise_attention_std(out.attentions),
        "hf_ratio": layerwise_high_frequency_ratio(out.tokens, out.num_prefix_tokens),
    }


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

    def update(self, out: AuxOutput) -> None:
        batch = out.logits.shape[0]
        for name, values in batch_metrics(out).items():
            total = values.detach().double().cpu() * batch
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.num_images += batch

    def compute(self) -> OversmoothingMetrics:
        if not self.num_images:
            raise ValueError("no images were accumulated")
        means = {name: (self.sums[name] / self.num_images).tolist() for name in METRIC_NAMES}
        return OversmoothingMetrics(**means, num_images=self.num_images)


def forward_with_attention(model: nn.Module, images: torch.Tensor) -> AuxOutput:
    """`AuxOutput` with attention maps, through the module call (so DeepSpeed ZeRO-3's hooks
    gather parameters), with the images on the model's device and in its dtype."""
    param = next(model.parameters())
    return model(images.to(device=param.device, dtype=param.dtype), aux=True, attention=True)


@torch.no_grad()
def oversmoothing_metrics(model: nn.Module, images: torch.Tensor, max_images: int = 16) -> dict[str, float]:
    """Per-layer metrics of a fixed small batch, for logging during training every k steps.

    Cost is one forward pass with attention maps over at most `max_images` images, in eval mode
    (the previous mode is restored). Under ZeRO-3 every rank must call it (parameters are
    gathered collectively).
    """
    was_training = model.training
    model.eval()
    try:
        accumulator = OversmoothingAccumulator()
        accumulator.update(forward_with_attention(model, images[:max_images]))
    finally:
        model.train(was_training)
    return accumulator.compute().flat()


# ---- sources: which models, which images -------------------------------------------------------


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
    """`["embed_dim=64", "attnscale=true"]` → `{"embed_dim": 64, "attnscale": True}`."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"model option '{pair}' is not KEY=VALUE")
        options[key.strip()] = parse_option_value(value)
    return options


def collect_model_options(
    img_size: int | None, patch_size: int | None, num_classes: int | None, switches: dict[str, bool | None], extra: Iterable[str] = ()
) -> dict:
    """Model keyword options from CLI flags: each one that was given (None = the model's or the
    checkpoint's own), then `KEY=VALUE` pairs, which win."""
    given = {"img_size": img_size, "patch_size": patch_size, "num_classes": num_classes} | switches
    return {name: value for name, value in given.items() if value is not None} | parse_model_options(extra)


@dataclass(frozen=True)
class ModelSource:
    """One model to analyse: `model` at a seeded random init, or `checkpoint`, anything
    `vitdeep.models.checkpoints.read_weights` reads (a vitdeep run / checkpoint / export knows its
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
    from vitdeep.engine.weights import build_model, read_weights

    torch.manual_seed(source.seed)
    if source.checkpoint is None:
        return create_model(source.model, **source.options).eval(), []
    model, report = build_model(read_weights(source.checkpoint, ema=source.ema), source.model, **source.options)
    return model.eval(), report.lines()


def resolve_model_sources(
    model: str | None, checkpoint: Path | None, compare: Sequence[str], options: dict, seed: int = 0, ema: bool = False
) -> list[ModelSource]:
    """The sources of one `analyze` run: `--checkpoint` (else `--model` at random init), then each
    `--compare [LABEL=]SOURCE`. Every source is checked before anything runs."""
    if checkpoint is not None:
        first = [ModelSource(str(checkpoint), model, options, Path(checkpoint), seed, ema)]
    elif model is not None:
        first = [ModelSource(f"{model} random init", model, options, None, seed)]
    elif compare:
        first = []
    else:
        raise UserError("give a --checkpoint, a --model NAME to analyse at random init, or --compare sources")
    sources = first + [compare_source(spec, model, options, seed, ema) for spec in compare]
    labels = [source.label for source in sources]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"two sources share the label '{duplicates[0]}': name them with --compare LABEL=SOURCE")
    return sources


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
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
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

    def batches(self, img_size: int) -> Iterator[torch.Tensor]:
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


# ---- vitdeep analyze ---------------------------------------------------------------------------


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


@torch.no_grad()
def measure_model(
    model: nn.Module, batches: Iterable[torch.Tensor], on_batch: Callable[[int], None] | None = None
) -> OversmoothingMetrics:
    """Stream batches through the model (with attention maps) into running per-layer means;
    `on_batch(n)` is called after each batch of n images (progress)."""
    accumulator = OversmoothingAccumulator()
    for images in batches:
        accumulator.update(forward_with_attention(model, images))
        if on_batch is not None:
            on_batch(images.shape[0])
    return accumulator.compute()


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


def write_analysis(
    out: Path, results: dict[str, OversmoothingMetrics], sources: Sequence[ModelSource], images: ImageSource
) -> dict[str, Path]:
    """`metrics.json`, `oversmoothing.png` and TensorBoard events `tb/` under `out`."""
    from vitdeep.plots import oversmoothing_figure

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "png": out / "oversmoothing.png", "tensorboard": out / "tb"}
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
    crop_ratio: float = EVAL_CROP_RATIO,
) -> dict[str, OversmoothingMetrics]:
    """`vitdeep analyze`: check every input, measure every source, then write the outputs
    (nothing is written when an input is bad or a model fails to load)."""
    from vitdeep.monitor import make_console

    out = Path(out)
    check_output_dir(out, "--out")
    sources = resolve_model_sources(model, checkpoint, compare, options or {}, seed, ema)
    image_source = resolve_image_source(images, num_images, batch_size, seed, data, crop_ratio)
    console = make_console()
    results = analyze_sources(sources, image_source, resolve_device(device), console)
    print_summary(console, results, write_analysis(out, results, sources, image_source))
    return results
