"""One typed run configuration, the single source of truth for every default.

A run is resolved in layers: dataclass defaults ← recipe defaults (e.g. finetuning) ← a YAML /
JSON file or a bundled recipe's name (`--config run.yaml`, `--config deit_base_24_losses`) ←
command-line flags. Every option has one flat name (the
field name; `--kebab-case` on the command line), so a config file is a flat mapping such as
`{model: deit_base_24, cos_weight: 0.0}`; the file may also group names under the section
names (`model:`, `optim:` …) as `config.json` does. The CLI flags are generated from the fields
below, with their help text, so nothing is written twice.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from vitdeep.architecture import DEFAULT_IMG_SIZE, DEFAULT_PATCH_SIZE, REMEDIES
from vitdeep.data.options import MAX_BAD_FRACTION, AugmentConfig, MixConfig
from vitdeep.errors import UserError
from vitdeep.loss_options import ObjectiveConfig
from vitdeep.recipebook import METADATA_KEY, bundled_recipe, check_metadata, recipe_names


def option(default: Any, help: str) -> Any:
    """A config field with its help text (shown by `--help` and the README)."""
    return field(default=default, metadata={"help": help})


def check_range(section: Any, limits: dict[str, tuple[float | None, float | None, bool]]) -> None:
    """Check fields against `name: (low, high, high_inclusive)` limits (None = unbounded; the low
    end is inclusive); an unset optional field is not checked. Raises a `UserError` naming the field."""
    for name, (low, high, high_inclusive) in limits.items():
        value = getattr(section, name)
        if value is None:
            continue
        above = high is not None and (value > high if high_inclusive else value >= high)
        if (low is not None and value < low) or above:
            if high is None:
                raise UserError(f"`{name}` must be >= {low:g}, got {value:g}", params=(name,))
            bracket = "]" if high_inclusive else ")"
            raise UserError(f"`{name}` must be in [{low:g}, {high:g}{bracket}, got {value:g}", params=(name,))


#: `check_range` limits: at least one, at least zero, a probability, a fraction below one.
AT_LEAST_1, AT_LEAST_0, PROBABILITY, BELOW_1 = (1, None, True), (0, None, True), (0, 1, True), (0, 1, False)


@dataclass
class ModelFields:
    """The model section's own fields; `ModelConfig` adds one switch per over-smoothing remedy."""

    model: str = option("deit_small_24", "Model name (see `vitdeep models`).")
    depth: Optional[int] = option(None, "Override the named model's depth (blocks).")
    embed_dim: Optional[int] = option(None, "Override the named model's width.")
    num_heads: Optional[int] = option(None, "Override the named model's attention heads.")
    img_size: int = option(DEFAULT_IMG_SIZE, "Input resolution.")
    patch_size: int = option(DEFAULT_PATCH_SIZE, "Patch size.")
    num_classes: Optional[int] = option(None, "Classes (default: from the shards' _info.json).")
    drop_path: float = option(0.1, "Drop-path rate (linear in depth for DeiT, uniform for CaiT).")
    drop: float = option(0.0, "Dropout before the classifier.")
    attn_drop: float = option(0.0, "Attention dropout.")
    proj_drop: float = option(0.0, "Dropout after attention / MLP projections.")
    pos_drop: float = option(0.0, "Dropout on the embeddings once the position embedding is added.")
    init_values: Optional[float] = option(None, "LayerScale init (DeiT: off unless set; CaiT: by depth).")
    grad_checkpointing: bool = option(False, "Activation checkpointing (recompute blocks in backward).")
    compile: bool = option(False, "torch.compile the model through DeepSpeed's engine.compile() (off by default: not yet measured on a GPU).")

    def __post_init__(self) -> None:
        check_range(self, {"depth": AT_LEAST_1, "embed_dim": AT_LEAST_1, "num_heads": AT_LEAST_1, "img_size": AT_LEAST_1,
                           "patch_size": AT_LEAST_1, "num_classes": AT_LEAST_1, "drop_path": PROBABILITY,
                           "drop": BELOW_1, "attn_drop": BELOW_1, "proj_drop": BELOW_1})
        if self.init_values is not None and self.init_values <= 0:
            raise UserError(f"`init_values` must be > 0, got {self.init_values:g}", params=("init_values",))


def _remedy_field(remedy: Any) -> tuple[str, Any, Any]:
    """A remedy's switch: off unless set, or (on in some families) the family's default unless set."""
    if remedy.on_by_default:
        return remedy.name, Optional[bool], option(None, remedy.help)
    return remedy.name, bool, option(False, remedy.help)


#: The model section: `ModelFields` and a switch per remedy of `vitdeep.architecture.REMEDIES`, so
#: that a new remedy is a config field and a flag without being written here.
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig", [_remedy_field(r) for r in REMEDIES], bases=(ModelFields,), namespace={"__module__": __name__}
)


@dataclass
class DataConfig:
    data: str = option("", "Training shards: a directory, a brace pattern such as 'train-{000000..000127}.tar', or pipe:CMD.")
    val: Optional[str] = option(None, "Validation shards (evaluated each epoch, exactly once per sample).")
    num_samples: Optional[int] = option(None, "Training samples per epoch when the shards carry no _info.json.")
    val_num_samples: Optional[int] = option(None, "Validation samples when the shards carry no _info.json.")
    workers: int = option(4, "Data-loader worker processes per rank.")
    max_bad_fraction: float = option(MAX_BAD_FRACTION, "Stop when more than this fraction of samples is unreadable.")

    def __post_init__(self) -> None:
        check_range(self, {"num_samples": AT_LEAST_1, "val_num_samples": AT_LEAST_1, "workers": AT_LEAST_0,
                           "max_bad_fraction": PROBABILITY})


@dataclass
class OptimConfig:
    epochs: int = option(300, "Training epochs (ignored when --steps is set).")
    steps: Optional[int] = option(None, "Optimizer steps in total (overrides --epochs).")
    global_batch: int = option(1024, "Images per optimizer step over all ranks.")
    micro_batch: int = option(64, "Images per forward pass on one rank; accumulation fills the rest.")
    lr: Optional[float] = option(None, "Peak learning rate (default: base_lr × global_batch / 512, DeiT's rule).")
    base_lr: float = option(5e-4, "Learning rate for a global batch of 512 (DeiT scaling rule).")
    min_lr: float = option(1e-5, "Final learning rate of the cosine schedule.")
    warmup_lr: float = option(1e-6, "Learning rate at the first step of the warm-up.")
    warmup_epochs: float = option(5.0, "Linear warm-up length in epochs.")
    warmup_steps: Optional[int] = option(None, "Linear warm-up length in optimizer steps (overrides --warmup-epochs).")
    schedule: Literal["cosine", "constant"] = option("cosine", "Learning-rate schedule after the warm-up.")
    weight_decay: float = option(0.05, "AdamW weight decay (none on biases, norms, tokens, γ/ω/λ).")
    layer_decay: Optional[float] = option(None, "Layer-wise lr decay factor (e.g. 0.75); off when unset.")
    clip_grad: float = option(0.0, "Gradient-norm clipping (0 = off).")
    ema_decay: float = option(0.99996, "Model EMA decay per optimizer step (0 = no EMA).")
    ema_warmup: bool = option(True, "Ramp the EMA decay up over the first steps (decay ≤ (1+t)/(10+t)).")
    freeze_blocks: int = option(0, "Freeze the patch embedding and the first N blocks (finetuning).")

    def __post_init__(self) -> None:
        check_range(self, {"epochs": AT_LEAST_1, "steps": AT_LEAST_1, "global_batch": AT_LEAST_1, "micro_batch": AT_LEAST_1,
                           "min_lr": AT_LEAST_0, "warmup_lr": AT_LEAST_0, "warmup_epochs": AT_LEAST_0,
                           "warmup_steps": AT_LEAST_0, "weight_decay": AT_LEAST_0,
                           "clip_grad": AT_LEAST_0, "ema_decay": PROBABILITY, "freeze_blocks": AT_LEAST_0})
        for name in ("lr", "base_lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"`{name}` must be > 0, got {getattr(self, name):g}", params=(name,))
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise UserError(f"`layer_decay` must be in (0, 1], got {self.layer_decay:g}", params=("layer_decay",))


@dataclass
class RunConfig:
    out: str = option("", "Output directory: config.json, checkpoints/, tb/, metrics.jsonl.")
    ds_config: str = option("zero2_bf16", "DeepSpeed config: a file, or a name from ds_configs/ (zero1_bf16, zero2_bf16, zero2_autocast_bf16, zero3_bf16, zero2_fp16, zero3_offload, cpu_fp32).")
    seed: int = option(0, "Random seed (data order, augmentation, init).")
    resume: Optional[str] = option(None, "'auto' (newest complete checkpoint in --out) or a checkpoint directory.")
    save_every: int = option(1000, "Save a checkpoint every N optimizer steps (and at the end).")
    keep_last: int = option(3, "Checkpoints kept besides the best by validation top-1.")
    log_every: int = option(20, "Log losses, lr and images/s every N optimizer steps.")
    oversmoothing_every: int = option(500, "Log layer-wise CosSim / attention std every N steps (0 = off).")
    val_every: int = option(1, "Validate (after saving a checkpoint) every N epochs; 0 = only after the last epoch.")
    max_bad_steps: int = option(5, "Stop after this many non-finite losses in a row.")
    dist_timeout: float = option(30.0, "Minutes a collective may wait before the run fails (a lost node).")
    teacher: Optional[str] = option(None, "Distillation teacher: a vitdeep checkpoint / export, TIMM_NAME=FILE, or a timm name (its pretrained weights).")
    init_from: Optional[str] = option(None, "Start from these weights (any source `vitdeep eval` reads); `finetune --from` sets it.")
    init_from_ema: bool = option(False, "Take the EMA weights of --init-from.")
    overwrite: bool = option(False, "Replace the run already in --out (its checkpoints, logs and config) instead of refusing.")
    plan_check: bool = option(True, "On a GPU, refuse to start a run the memory planner (`vitdeep plan`) says cannot fit.")

    def __post_init__(self) -> None:
        check_range(self, {"save_every": AT_LEAST_1, "keep_last": AT_LEAST_1, "log_every": AT_LEAST_1,
                           "oversmoothing_every": AT_LEAST_0, "val_every": AT_LEAST_0, "max_bad_steps": AT_LEAST_1})
        if self.dist_timeout <= 0:
            raise UserError(f"`dist_timeout` must be > 0 minutes, got {self.dist_timeout:g}", params=("dist_timeout",))
        if self.resume is not None and self.overwrite:
            raise UserError("`resume` continues the run in `out` and `overwrite` replaces it: choose one", params=("resume", "out", "overwrite"))


@dataclass
class TrainConfig:
    """Everything a training run needs; `config.json` and every checkpoint store it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    loss: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    #: flat names the user set (file or CLI), e.g. to tell them apart from defaults in ds configs.
    explicit: frozenset[str] = frozenset()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}

    def flat(self) -> dict[str, Any]:
        return {name: getattr(getattr(self, section), name) for name, section in flat_fields().items()}


#: DeiT's high-resolution finetuning recipe (reference §4): low constant lr, tiny weight decay.
FINETUNE_RECIPE: dict[str, Any] = {
    "img_size": 384,
    "base_lr": 5e-6,
    "weight_decay": 1e-8,
    "epochs": 30,
    "schedule": "constant",
    "warmup_epochs": 0.0,
    "min_lr": 5e-6,
}

SECTIONS = ("model", "data", "augment", "mix", "loss", "optim", "run")
SECTION_TITLES = {
    "model": "Model",
    "data": "Data",
    "augment": "Augmentation",
    "mix": "Mixup / CutMix",
    "loss": "Losses",
    "optim": "Optimisation",
    "run": "Run",
}


def section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {section: hints[section] for section in SECTIONS}


def flat_fields() -> dict[str, str]:
    """Flat option name → section. Names are unique across sections (checked at import)."""
    names: dict[str, str] = {}
    for section, cls in section_classes().items():
        for f in dataclasses.fields(cls):
            if f.name in names:
                raise RuntimeError(f"config option '{f.name}' appears in sections {names[f.name]} and {section}")
            names[f.name] = section
    return names


def field_types() -> dict[str, Any]:
    types = {}
    for cls in section_classes().values():
        types.update(typing.get_type_hints(cls))
    return types


def load_config_file(path: str | Path, _extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Flat option mapping from a YAML or JSON file (sections are flattened), or from a bundled
    recipe given by name (`deit_base_24_losses`; `vitdeep recipes`). A recipe's `recipe:` block is
    metadata, not options; its `extends: NAME` starts from that recipe's options."""
    path = Path(path)
    if not path.is_file():
        bundled = bundled_recipe(str(path))
        if bundled is None:
            raise UserError(f"config file not found: {path} (a YAML / JSON file, or a bundled recipe: {', '.join(recipe_names())})")
        path = bundled
    if path.resolve() in _extended_by:
        raise UserError(f"config file {path} extends itself (through {', '.join(str(p) for p in _extended_by)})")
    import yaml

    text = path.read_text()
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            raw = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError, yaml.YAMLError) as error:
        where = getattr(error, "problem_mark", None)
        detail = f"{getattr(error, 'problem', None) or error} at line {where.line + 1}" if where else str(error)
        raise UserError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {detail}".splitlines()[0]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    metadata = check_metadata(raw[METADATA_KEY], path) if METADATA_KEY in raw else {}
    flat: dict[str, Any] = {}
    if metadata.get("extends"):
        flat.update(load_config_file(metadata["extends"], (*_extended_by, path.resolve())))
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        elif key not in ("explicit", METADATA_KEY):
            flat[key] = value
    return flat


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check a file-provided value against the field's type (YAML gives ints for floats etc.)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise UserError(f"option {name}={value!r} must be one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"option {name}={value!r} must be a list of {len(args)} values")
        return tuple(_coerce(name, v, a) for v, a in zip(value, args))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is bool and isinstance(value, bool) or annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, str):
        return value
    raise UserError(f"option {name}={value!r} should be of type {getattr(annotation, '__name__', annotation)}")


def resolve_config(
    cli: dict[str, Any],
    config_file: str | Path | None = None,
    recipe: dict[str, Any] | None = None,
) -> TrainConfig:
    """Merge defaults ← `recipe` ← `config_file` ← `cli` (flat names) into a `TrainConfig`."""
    sections = flat_fields()
    types = field_types()
    from_file = load_config_file(config_file) if config_file else {}
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for source in (recipe or {}, from_file, cli):
        for name, value in source.items():
            if name not in sections:
                close = [n for n in sections if n.startswith(name[:4])][:3]
                raise UserError(f"unknown option '{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            values[sections[name]][name] = _coerce(name, value, types[name])
    built = {section: cls(**values[section]) for section, cls in section_classes().items()}
    return TrainConfig(**built, explicit=frozenset(from_file) | frozenset(cli))
