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
import functools
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from vitdeep.architecture import DEFAULT_IMG_SIZE, DEFAULT_PATCH_SIZE, REMEDIES
from vitdeep.data.options import MAX_BAD_FRACTION, AugmentConfig, MixConfig, ReadPolicy
from vitdeep.documents import read_document
from vitdeep.engine.alarm import ALARM_RISE, ALARM_WINDOW, EXIT_OVERSMOOTHED
from vitdeep.errors import UserError
from vitdeep.fields import (
    BELOW_1,
    MAX_CLASSES,
    MAX_SAMPLES,
    MAX_STEPS,
    MAX_WEIGHT,
    MAX_WORKERS,
    PROBABILITY,
    Checked,
    above,
    at_least,
    check_number,
    clip,
    numeric_fields,
    option,
    range_of,
    shown,
    within,
)
from vitdeep.loss_options import ObjectiveConfig
from vitdeep.recipebook import METADATA_KEY, bundled_recipe, check_metadata, recipe_names


#: The largest model vitdeep builds: past these a plan's tensor shapes overflow or take for ever.
MAX_DEPTH, MAX_WIDTH, MAX_PIXELS = 1024, 1 << 16, 1 << 14
#: The largest batch, and learning rate: beyond them a run is a typo, not a choice. Up to the limit
#: a diverging run stops itself (--max-bad-steps); past 1e300 `base_lr` × `global_batch` overflowed.
MAX_BATCH, MAX_LR = 1 << 24, 1e30
#: The longest `--dist-timeout`, in minutes: a week (a longer `timedelta` overflows the backends).
MAX_DIST_TIMEOUT = 7 * 24 * 60
#: Epochs of a run (and of its warm-up); seeds as numpy takes them.
MAX_EPOCHS, MAX_SEED = 10**6, 2**32 - 1


@dataclass
class ModelFields(Checked):
    """The model section's own fields; `ModelConfig` adds one switch per over-smoothing remedy."""

    model: str = option("deit_small_24", "Model name (see `vitdeep models`).")
    depth: Optional[int] = option(None, "Override the named model's depth (blocks).", at_least(1, MAX_DEPTH))
    embed_dim: Optional[int] = option(None, "Override the named model's width.", at_least(1, MAX_WIDTH))
    num_heads: Optional[int] = option(None, "Override the named model's attention heads.", at_least(1, MAX_WIDTH))
    img_size: int = option(DEFAULT_IMG_SIZE, "Input resolution.", at_least(1, MAX_PIXELS))
    patch_size: int = option(DEFAULT_PATCH_SIZE, "Patch size.", at_least(1, MAX_PIXELS))
    num_classes: Optional[int] = option(None, "Classes (default: from the shards' _info.json).", at_least(1, MAX_CLASSES))
    drop_path: float = option(0.1, "Drop-path rate (linear in depth for DeiT, uniform for CaiT).", PROBABILITY)
    drop: float = option(0.0, "Dropout before the classifier.", BELOW_1)
    attn_drop: float = option(0.0, "Attention dropout.", BELOW_1)
    proj_drop: float = option(0.0, "Dropout after attention / MLP projections.", BELOW_1)
    pos_drop: float = option(0.0, "Dropout on the embeddings once the position embedding is added.", BELOW_1)
    init_values: Optional[float] = option(None, "LayerScale init (DeiT: off unless set; CaiT: by depth).", above(0, MAX_WEIGHT))
    layer_scale_by_depth: bool = option(False, "LayerScale with CaiT's init by depth (0.1 up to 18 blocks, 1e-5 up to 24, 1e-6 deeper) unless --init-values is set: for a grid over depths.")
    grad_checkpointing: bool = option(False, "Activation checkpointing (recompute blocks in backward).")
    compile: bool = option(False, "torch.compile the model through DeepSpeed's engine.compile() (off by default: not yet measured on a GPU).")


#: The most register tokens, and the largest ContraNorm scale, a run takes.
MAX_REG_TOKENS, MAX_CONTRANORM_SCALE = 1024, 1e3


def _remedy_field(remedy: Any) -> tuple[str, Any, Any]:
    """A remedy's switch: off unless set, or (on in some families) the family's default unless set;
    a remedy with a value (register tokens, ContraNorm's scale): 0 = off."""
    if remedy.kind is int:
        return remedy.name, int, option(0, remedy.help, at_least(0, MAX_REG_TOKENS))
    if remedy.kind is float:
        return remedy.name, float, option(0.0, remedy.help, at_least(0, MAX_CONTRANORM_SCALE))
    if remedy.on_by_default:
        return remedy.name, Optional[bool], option(None, remedy.help)
    return remedy.name, bool, option(False, remedy.help)


#: The model section: `ModelFields` and a switch per remedy of `vitdeep.architecture.REMEDIES`, so
#: that a new remedy is a config field and a flag without being written here.
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig", [_remedy_field(r) for r in REMEDIES], bases=(ModelFields,), namespace={"__module__": __name__}
)


@dataclass
class DataConfig(Checked):
    data: str = option("", "Training shards: a directory, a brace pattern such as 'train-{000000..000127}.tar', or pipe:CMD.")
    val: Optional[str] = option(None, "Validation shards (evaluated every --val-every epochs and at the run's end, exactly once per sample).")
    num_samples: Optional[int] = option(None, "Training samples per epoch when the shards carry no _info.json.", at_least(1, MAX_SAMPLES))
    val_num_samples: Optional[int] = option(None, "Validation samples when the shards carry no _info.json.", at_least(1, MAX_SAMPLES))
    workers: int = option(4, "Data-loader worker processes per rank (when not given: this, or the usable cores per rank where fewer; the sample order does not depend on it).", at_least(0, MAX_WORKERS))
    max_bad_fraction: float = option(MAX_BAD_FRACTION, "Stop when more than this fraction of samples is unreadable.", PROBABILITY)
    lanes: int = option(0, "Lanes of the training order, fixed for the run's life (0 = the largest up to 64, or 8 × the starting ranks, that divides the global batch and fits the starting ranks × workers). The same samples come in the same order on any ranks, workers and micro-batch the lanes fit: `vitdeep train --dry-run` lists them.", at_least(0, MAX_BATCH))
    read_timeout: float = option(ReadPolicy.read_timeout, ReadPolicy.help()["read_timeout"], range_of(ReadPolicy, "read_timeout"))
    read_retries: int = option(ReadPolicy.read_retries, ReadPolicy.help()["read_retries"], range_of(ReadPolicy, "read_retries"))

    def check(self) -> None:
        self.read_policy()

    def read_policy(self) -> ReadPolicy:
        """The timeouts and retries of the run's reads."""
        return ReadPolicy(self.read_timeout, self.read_retries)


@dataclass
class OptimConfig(Checked):
    epochs: int = option(300, "Training epochs (ignored when --steps is set).", at_least(1, MAX_EPOCHS))
    steps: Optional[int] = option(None, "Optimizer steps in total (overrides --epochs).", at_least(1, MAX_STEPS))
    global_batch: int = option(1024, "Images per optimizer step over all ranks.", at_least(1, MAX_BATCH))
    micro_batch: int = option(64, "Images per forward pass on one rank; accumulation fills the rest.", at_least(1, MAX_BATCH))
    lr: Optional[float] = option(None, "Peak learning rate (default: base_lr × global_batch / 512, DeiT's rule).", above(0, MAX_LR))
    base_lr: float = option(5e-4, "Learning rate for a global batch of 512 (DeiT scaling rule).", above(0, MAX_LR))
    min_lr: float = option(1e-5, "Final learning rate of the cosine schedule.", at_least(0, MAX_LR))
    warmup_lr: float = option(1e-6, "Learning rate at the first step of the warm-up.", at_least(0, MAX_LR))
    warmup_epochs: float = option(5.0, "Linear warm-up length in epochs.", at_least(0, MAX_EPOCHS))
    warmup_steps: Optional[int] = option(None, "Linear warm-up length in optimizer steps (overrides --warmup-epochs).", at_least(0, MAX_STEPS))
    schedule: Literal["cosine", "constant"] = option("cosine", "Learning-rate schedule after the warm-up.")
    weight_decay: float = option(0.05, "AdamW weight decay (none on biases, norms, tokens, γ/ω/λ).", at_least(0, MAX_WEIGHT))
    layer_decay: Optional[float] = option(None, "Layer-wise lr decay factor (e.g. 0.75); off when unset.", within(0, 1, low_open=True))
    clip_grad: float = option(0.0, "Gradient-norm clipping (0 = off).", at_least(0, MAX_WEIGHT))
    ema_decay: float = option(0.99996, "Model EMA decay per optimizer step (0 = no EMA).", PROBABILITY)
    ema_warmup: bool = option(True, "Ramp the EMA decay up over the first steps (decay ≤ (1+t)/(10+t)).")
    freeze_blocks: int = option(0, "Freeze the patch embedding and the first N blocks (finetuning).", at_least(0, MAX_DEPTH))


@dataclass
class RunConfig(Checked):
    out: str = option("", "Output directory: config.json, checkpoints/, tb/, metrics.jsonl.")
    ds_config: str = option("zero2_bf16", "DeepSpeed config: a file, or a name from ds_configs/ (zero1_bf16, zero2_bf16, zero2_autocast_bf16, zero3_bf16, zero2_fp16, zero3_offload, cpu_fp32).")
    seed: int = option(0, "Random seed (data order, augmentation, init).", at_least(0, MAX_SEED))
    resume: Optional[str] = option(None, "'auto' (newest complete checkpoint in --out) or a checkpoint directory.")
    save_every: int = option(1000, "Save a checkpoint every N optimizer steps (and at the end).", at_least(1, MAX_STEPS))
    keep_last: int = option(3, "Checkpoints kept besides the best by validation top-1.", at_least(1, MAX_STEPS))
    log_every: int = option(20, "Log losses, lr and images/s every N optimizer steps.", at_least(1, MAX_STEPS))
    oversmoothing_every: int = option(500, "Log layer-wise CosSim / attention std every N steps (0 = off).", at_least(0, MAX_STEPS))
    oversmoothing_alarm: float = option(0.0, f"Over-smoothing alarm (0 = off): fires when the last layer's patch CosSim stays above X for {ALARM_WINDOW} measurements, or rises at each of them and by more than {ALARM_RISE:g} in all; needs --oversmoothing-every > 0.", within(0, 1))
    oversmoothing_action: Literal["warn", "stop"] = option("warn", f"What the alarm does: warn (a line, an `alarm` row in metrics.jsonl, a TensorBoard text), or stop (also save a checkpoint, then exit with code {EXIT_OVERSMOOTHED}).")
    val_every: int = option(1, "Validate (after saving a checkpoint) every N epochs; 0 = only at the run's end (always validated, also when --steps ends it mid-epoch).", at_least(0, MAX_EPOCHS))
    max_bad_steps: int = option(5, "Stop after this many non-finite losses in a row.", at_least(1, MAX_STEPS))
    dist_timeout: float = option(30.0, "Minutes a collective may wait before the run fails (a lost node).", above(0, MAX_DIST_TIMEOUT))
    teacher: Optional[str] = option(None, "Distillation teacher: a vitdeep checkpoint / export, TIMM_NAME=FILE, or a timm name (its pretrained weights).")
    init_from: Optional[str] = option(None, "Start from these weights (any source `vitdeep eval` reads); `finetune --from` sets it.")
    init_from_ema: bool = option(False, "Take the EMA weights of --init-from.")
    overwrite: bool = option(False, "Replace the run already in --out (its checkpoints, logs and config) instead of refusing.")
    plan_check: bool = option(True, "On a GPU, refuse to start a run the memory planner (`vitdeep plan`) says cannot fit.")
    tracker: Literal["none", "mlflow"] = option("none", "Experiment tracker beside TensorBoard and metrics.jsonl: none, or mlflow (pip install 'vitdeep[mlflow]'; the store is MLFLOW_TRACKING_URI, else OUT/mlflow.db).")
    sample_ledger: bool = option(False, "Record the sample keys and global positions of every step in OUT/ledger/ (one file per rank), e.g. to check the order across a resume.")

    def check(self) -> None:
        if self.oversmoothing_alarm > 0 and self.oversmoothing_every == 0:
            raise UserError("`oversmoothing_alarm` watches the CosSim that `oversmoothing_every` measures: set it above 0",
                            params=("oversmoothing_alarm", "oversmoothing_every"))
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


#: DeiT's high-resolution finetuning recipe (its README's 384 command): low lr, tiny weight decay,
#: and main.py's 5 warm-up epochs from `warmup_lr` (1e-6), which that command keeps; its cosine
#: from lr to min_lr = lr is a constant rate.
FINETUNE_RECIPE: dict[str, Any] = {
    "img_size": 384,
    "base_lr": 5e-6,
    "weight_decay": 1e-8,
    "epochs": 30,
    "schedule": "constant",
    "warmup_epochs": 5.0,
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


@functools.cache
def section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {section: hints[section] for section in SECTIONS}


@functools.cache
def flat_fields() -> dict[str, str]:
    """Flat option name → section. Names are unique across sections (checked at import)."""
    names: dict[str, str] = {}
    for section, cls in section_classes().items():
        for f in dataclasses.fields(cls):
            if f.name in names:
                raise RuntimeError(f"config option '{f.name}' appears in sections {names[f.name]} and {section}")
            names[f.name] = section
    return names


@functools.cache
def field_types() -> dict[str, Any]:
    types = {}
    for cls in section_classes().values():
        types.update(typing.get_type_hints(cls))
    return types


#: A run's own `OUT/config.json` also records its `plan:` (what it resolved to); given back as
#: `--config`, the plan is recomputed and these options are the new run's own to name.
RUN_RECORD_KEY = "plan"
RERUN_OWN = ("out", "resume", "overwrite")


def load_config_file(path: str | Path, _extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Flat option mapping from a YAML or JSON file (sections are flattened), or from a bundled
    recipe given by name (`deit_base_24_losses`; `vitdeep recipes`). A recipe's `recipe:` block is
    metadata, not options; its `extends: NAME` starts from that recipe's options. A run's
    `config.json` reruns as it is: its `plan:` record and `RERUN_OWN` options are left out."""
    path = Path(path)
    if not path.is_file():
        bundled = bundled_recipe(str(path))
        if bundled is None:
            raise UserError(f"config file not found: {path} (a YAML / JSON file, or a bundled recipe: {', '.join(recipe_names())})")
        path = bundled
    if path.resolve() in _extended_by:
        raise UserError(f"config file {path} extends itself (through {', '.join(str(p) for p in _extended_by)})")
    raw = read_document(path, "config file")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    metadata = check_metadata(raw[METADATA_KEY], path) if METADATA_KEY in raw else {}
    run_record = isinstance(raw.get(RUN_RECORD_KEY), dict)
    own: dict[str, Any] = {}
    for key, value in raw.items():
        if run_record and key == RUN_RECORD_KEY:
            continue
        if key in SECTIONS and isinstance(value, dict):
            entries = [(name, option_value, f"under {key}:") for name, option_value in value.items()]
        elif key not in ("explicit", METADATA_KEY):
            entries = [(key, value, "at the top")]
        else:
            continue
        for name, option_value, place in entries:
            _check_name(name, f"config file {path} {place}")
            if name in own:
                raise UserError(f"config file {path} sets option {name} twice (flat and under its section): remove one")
            if not (run_record and name in RERUN_OWN):
                own[name] = option_value
    inherited = load_config_file(metadata["extends"], (*_extended_by, path.resolve())) if metadata.get("extends") else {}
    return {**inherited, **own}


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str):
        raise UserError(f"{where}: option names are words such as lr, not {'null' if name is None else shown(name)}")


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
            raise UserError(f"option {name}={shown(value)} must be one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"option {name}={shown(value)} must be a list of {len(args)} values")
        return tuple(_coerce(name, v, a) for v, a in zip(value, args))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise UserError(f"`{name}` must be finite, got {shown(value)}", params=(name,)) from None
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is bool and isinstance(value, bool) or annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, str):
        return value
    raise UserError(f"option {name}={shown(value)} should be of type {getattr(annotation, '__name__', annotation)}")


def _unknown_option(name: str, where: str = "") -> UserError:
    close = [n for n in flat_fields() if n.startswith(name[:4])][:3]
    return UserError(f"{where}unknown option {shown(name)}" + (f" (did you mean {', '.join(close)}?)" if close else ""))


def parse_overrides(pairs: Iterable[str], flag: str = "--set") -> dict[str, Any]:
    """`--set KEY=VALUE` pairs (the habit of Hydra and Lightning users) as options. KEY is an
    option's name as a config file writes it, flat (`lr`) or under its section (`optim.lr`); VALUE
    is read as a YAML value, as the file's would be (`1e-3`, `true`, `[0.9, 0.999]`; empty: the
    empty string, as a flag's). Each is checked as the file's option is (name, type, range)
    before any is used, the error naming `--set KEY`, so a typo never runs a default silently."""
    from vitdeep.documents import parse_document

    sections, types = flat_fields(), field_types()
    ranges = {name: valid for cls in section_classes().values() for name, valid in numeric_fields(cls)}
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{flag} {shown(pair)} is not KEY=VALUE (e.g. {flag} optim.lr=1e-3)")
        where = f"{flag} {clip(key, 60)}: "
        section, dot, name = key.rpartition(".")
        if name not in sections:
            raise _unknown_option(name, where)
        if dot and section != sections[name]:
            raise UserError(f"{where}{name} is a {sections[name]} option: {sections[name]}.{name} or {name}")
        if name in options:
            raise UserError(f"{where}{name} is set twice: keep one")
        value = parse_document(text, where.removesuffix(": "), as_json=False) if text.strip() else text
        try:
            value = _coerce(name, value, types[name])
            options[name] = check_number(name, value, ranges[name], flag=False) if name in ranges else value
        except UserError as error:
            raise UserError(f"{where}{error}") from None
    return options


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
            _check_name(name, "options")
            if name not in sections:
                raise _unknown_option(name)
            values[sections[name]][name] = _coerce(name, value, types[name])
    built = {section: cls(**values[section]) for section, cls in section_classes().items()}
    return TrainConfig(**built, explicit=frozenset(from_file) | frozenset(cli))
