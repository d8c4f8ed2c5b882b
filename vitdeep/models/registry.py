"""The model zoo: names, sizes, construction, parameter / FLOP counts (timm registration is
`timm_hub.py`).

This is the one place model dimensions are written down; the CLI table and the README read it.
The options a model is built with are its class's keyword arguments and the over-smoothing
remedies of `vitdeep.architecture.REMEDIES`, which become the class's attention layer here.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitdeep.architecture import ARCHITECTURE_OPTIONS, DEFAULT_IMG_SIZE, EVAL_CROP_RATIO, INTERPOLATION, REMEDIES, REMEDY_NAMES, cait_layer_scale_init
from vitdeep.errors import UserError
from vitdeep.models.cait import Cait
from vitdeep.models.layers import remedy_layers
from vitdeep.models.vit import VisionTransformer



@dataclass(frozen=True)
class Family:
    """A model family: everything outside its class that differs between families, in one entry.
    A new family is its class (on `models/base.py`) and one row of `FAMILIES`."""

    name: str
    model_cls: type[nn.Module]
    #: size name → (width, heads), and size name → the depths the zoo registers
    sizes: dict[str, tuple[int, int]]
    depths: dict[str, tuple[int, ...]]
    #: the zoo name of a size at a depth, e.g. "deit_{size}_{depth}"
    name_format: str
    #: Wang et al.'s official FeatScale code adds the λ-terms twice in its ViT blocks, once in
    #: CaiT's: their λ is scaled by this factor into ours when their checkpoints load.
    official_featscale_factor: float
    #: whether the family can carry DeiT's distillation token (`--distill`)
    distillation_token: bool
    #: the LayerScale init a depth gets when `init_values` is not given (None: the class's default)
    layer_scale_init: Callable[[int], float] | None = None
    #: zoo names whose LayerScale init is not the depth rule's
    init_overrides: dict[str, float] = field(default_factory=dict)


_DEIT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16)}
_CAIT_SIZES = {"xxs": (192, 4), "xs": (288, 6), "s": (384, 8), "m": (768, 16)}
FAMILIES: dict[str, Family] = {
    family.name: family for family in (
        Family("deit", VisionTransformer, _DEIT_SIZES, {size: (12, 24, 36, 48) for size in _DEIT_SIZES}, "deit_{size}_{depth}",
               official_featscale_factor=2.0, distillation_token=True),
        Family("cait", Cait, _CAIT_SIZES, {"xxs": (24, 36), "xs": (24, 36), "s": (24, 36), "m": (36, 48)}, "cait_{size}{depth}",
               official_featscale_factor=1.0, distillation_token=False, layer_scale_init=cait_layer_scale_init,
               # timm's CaiT-XXS36 keeps the depth-24 LayerScale init
               init_overrides={"cait_xxs36": 1e-5}),
    )
}
#: timm models with exactly the same architecture (for checkpoints and equivalence tests).
TIMM_TWINS = {
    "deit_tiny_12": "deit_tiny_patch16_224",
    "deit_small_12": "deit_small_patch16_224",
    "deit_base_12": "deit_base_patch16_224",
    "deit_large_24": "vit_large_patch16_224",
    "cait_xxs24": "cait_xxs24_224",
    "cait_xxs36": "cait_xxs36_224",
    "cait_xs24": "cait_xs24_384",
    "cait_s24": "cait_s24_224",
    "cait_s36": "cait_s36_384",
    "cait_m36": "cait_m36_384",
    "cait_m48": "cait_m48_448",
}


@dataclass(frozen=True)
class ModelSpec:
    """One named architecture: its family and dimensions (all else is an option)."""

    name: str
    family: str
    embed_dim: int
    depth: int
    num_heads: int
    init_values: float | None = None

    @property
    def model_cls(self) -> type[nn.Module]:
        return FAMILIES[self.family].model_cls

    @property
    def timm_twin(self) -> str | None:
        return TIMM_TWINS.get(self.name)

    def kwargs(self) -> dict:
        kwargs = dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads)
        if self.init_values is not None:
            kwargs["init_values"] = self.init_values
        return kwargs


def _build_specs() -> dict[str, ModelSpec]:
    specs = []
    for family in FAMILIES.values():
        for size, (dim, heads) in family.sizes.items():
            for depth in family.depths[size]:
                name = family.name_format.format(size=size, depth=depth)
                specs.append(ModelSpec(name, family.name, dim, depth, heads, family.init_overrides.get(name)))
    return {spec.name: spec for spec in specs}


MODELS: dict[str, ModelSpec] = _build_specs()


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered name, or a `UserError` that suggests the closest names."""
    spec = MODELS.get(name.removeprefix("vitdeep_"))
    if spec is None:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see `vitdeep models`)"
        raise UserError(f"unknown model '{name}'{hint}")
    return spec


def family_of(model: nn.Module) -> str:
    """The family a built model belongs to (its class's, or the nearest base class's)."""
    for cls in type(model).__mro__:
        for family in FAMILIES.values():
            if cls is family.model_cls:
                return family.name
    raise ValueError(f"{type(model).__name__} is not a vitdeep model family's class")


#: Class arguments the options choose rather than take (`class_kwargs`).
LAYER_CHOICES = ("attn_layer", "norm_layer")


def model_options(name: str) -> list[str]:
    """Keyword options `create_model` accepts for this model: its class's arguments and the remedies
    (every remedy, so that one option set fits every model; a family that lacks one takes it off)."""
    params = inspect.signature(get_spec(name).model_cls.__init__).parameters
    return [p for p in params if p not in ("self", *LAYER_CHOICES, *REMEDY_NAMES)] + list(REMEDY_NAMES)


def resolved_options(name: str, **kwargs) -> dict:
    """Every option `create_model(name, **kwargs)` builds with: the given ones over the named size's,
    the remedies' (e.g. `talking_heads` is on for CaiT unless turned off) and the class's defaults."""
    spec = get_spec(name)
    params = inspect.signature(spec.model_cls.__init__).parameters
    defaults = {p: params[p].default for p in model_options(name) if p in params}
    remedies = {remedy.name: remedy.default(spec.family) for remedy in REMEDIES}
    return {**defaults, **remedies, **spec.kwargs(), **{k: v for k, v in kwargs.items() if v is not None}}


def resolved_architecture(name: str, kwargs: dict) -> dict:
    """The architecture options of `resolved_options`, with CaiT's LayerScale init by depth spelled
    out too, so that `--depth 12` and no `--depth` compare equal for a 12-block model."""
    options = resolved_options(name, **kwargs)
    values = {k: options[k] for k in ARCHITECTURE_OPTIONS if k in options}
    layer_scale_init = FAMILIES[get_spec(name).family].layer_scale_init
    if layer_scale_init is not None and values.get("init_values") is None:
        values["init_values"] = layer_scale_init(values["depth"])
    return values


def class_kwargs(spec: ModelSpec, kwargs: dict) -> dict:
    """The model class's arguments for these options: the named size's dimensions, and the
    remedies (the family's defaults unless set) as the blocks' attention and norm layers and the
    model's register tokens. A remedy the family lacks must be off."""
    kwargs = dict(kwargs)
    values = {}
    for remedy in REMEDIES:
        value = kwargs.pop(remedy.name, None)
        values[remedy.name] = remedy.default(spec.family) if value is None else remedy.value(value)
        if values[remedy.name] and spec.family not in remedy.families:
            raise UserError(f"{remedy.name} is an option of {', '.join(remedy.families)} models only, not of {spec.name}")
    return {**spec.kwargs(), **kwargs, **remedy_layers(**values)}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. `create_model("deit_small_24", img_size=224, attnscale=True)`.

    Options are the model class's keyword arguments (`img_size`, `patch_size`, `num_classes`,
    `drop_path_rate`, `patch_head`, `distilled` for DeiT, `init_values` for LayerScale, …) and the
    remedies (`talking_heads`, `reattention`, `attnscale`, `featscale`, `qk_norm`, `contranorm`,
    `reg_tokens`). Unknown names and options raise `UserError`.
    """
    spec = get_spec(name)
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise UserError(f"model '{spec.name}' has no option {', '.join(unknown)} (options: {', '.join(options)})")
    return with_pretrained_cfg(spec.model_cls(**class_kwargs(spec, kwargs)))


def cached_meta_model(name: str, **kwargs) -> nn.Module:
    """`create_model` on the meta device (shapes and counts, no memory, no values), built once per
    name and options and then shared: read it, never change it. Checking a grid's cells builds the
    same model for every cell; on the meta device its weight init alone took ~35 ms each."""
    try:
        key = tuple(sorted(kwargs.items()))
        hash(key)
    except TypeError:  # an option value that cannot be a cache key
        with torch.device("meta"):
            return create_model(name, **kwargs)
    return _cached_meta_model(name, key)


@lru_cache(maxsize=16)
def _cached_meta_model(name: str, options: tuple) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **dict(options))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, img_size: int | None = None, batch_size: int = 1) -> int:
    """Forward FLOPs (a multiply-add counts 2) of one pass, as counted by torch's FlopCounterMode.

    The papers' "FLOPs" (DeiT-S 4.6G) count multiply-adds, i.e. half this number. On a model
    built on the meta device (`model_stats`) the count costs no compute.
    """
    img_size = img_size or model.img_size
    param = next(model.parameters())
    x = torch.empty(batch_size, model.patch_embed.proj.in_channels, img_size, img_size, device=param.device, dtype=param.dtype)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@lru_cache(maxsize=None)
def model_stats(name: str, img_size: int = DEFAULT_IMG_SIZE, **kwargs) -> tuple[int, int]:
    """(parameters, forward FLOPs per image) of a named model, built on the meta device.

    Blocks are identical, so both counts are affine in depth: count depths 1 and 2 and
    extrapolate, which is exact and keeps `vitdeep models` fast.
    """
    depth = kwargs.pop("depth", None) or get_spec(name).depth
    counts = []
    for probe_depth in (1, 2):
        with torch.device("meta"):
            model = create_model(name, img_size=img_size, depth=probe_depth, **kwargs)
        counts.append((count_parameters(model), count_flops(model, img_size)))
    (p1, f1), (p2, f2) = counts
    return p1 + (depth - 1) * (p2 - p1), f1 + (depth - 1) * (f2 - f1)


#: timm's `pretrained_cfg` of every zoo model: its input (any size that tiles into patches; DeiT's
#: evaluation crop and interpolation), ImageNet normalisation, first conv and classifier.
PRETRAINED_CFG = dict(
    url="", num_classes=1000, input_size=(3, DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE), pool_size=None, fixed_input_size=False,
    crop_pct=EVAL_CROP_RATIO, interpolation=INTERPOLATION, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
    first_conv="patch_embed.proj", classifier="head",
)
def with_pretrained_cfg(model: nn.Module, cfg: dict | None = None) -> nn.Module:
    """The model with its `pretrained_cfg` (timm's) describing the model as built: its input size
    and classes."""
    cfg = dict(cfg or PRETRAINED_CFG)
    cfg.update(input_size=(model.patch_embed.proj.in_channels, model.img_size, model.img_size), num_classes=model.num_classes)
    model.pretrained_cfg = model.default_cfg = cfg
    return model
