"""Loading weights from anywhere into a vitdeep model, and exporting them.

Sources: a vitdeep training checkpoint (any ZeRO stage; consolidated on the CPU, optionally its
EMA), a vitdeep export (`.safetensors` carrying the model name and options), and plain timm /
DeiT / CaiT state dicts (`.pth`, `.bin`, `.safetensors`; wrapped in `model` / `state_dict` /
`module.` or not), including the official AttnScale / FeatScale checkpoints of Wang et al. and
Gong et al.'s released models (talking heads as bias-free `proj_pre` / `proj_post`).

Adapting a source to a model: position embeddings are resampled to the model's grid (prefix
slots kept); parameters the source lacks start at their identity values (ω = 0, λ = 0, γ = 1,
talking heads = identity) or, for a new classifier / patch head, at their initial values, and
are listed in the report; anything else that does not fit is an error, never a silent skip.
Every file, vitdeep's and DeepSpeed's included, is read with `torch.load(weights_only=True)` or
safetensors: a run directory can come from anyone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitdeep.errors import UserError

EXPORT_FORMAT = "vitdeep-export-1"
#: Wrappers seen around state dicts in the wild, tried in this order.
WRAPPER_KEYS = ("model", "state_dict", "module")
#: Official FeatScale code (Wang et al.) adds λ-terms twice in its ViT blocks, once in CaiT.
OFFICIAL_FEATSCALE_FACTOR = {"deit": 2.0, "cait": 1.0}


@dataclass
class Weights:
    """A consolidated fp32 state dict and what is known about the model it belongs to."""

    state_dict: dict[str, torch.Tensor]
    source: str
    kind: str
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    source: str
    kind: str
    identity: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    resampled: str | None = None

    def lines(self) -> list[str]:
        lines = [f"loaded {self.source} ({self.kind})"]
        if self.resampled:
            lines.append(f"  position embedding resampled {self.resampled}")
        if self.converted:
            lines.append(f"  converted: {_summarise(self.converted)}")
        if self.identity:
            lines.append(f"  not in the source, set to identity: {_summarise(self.identity)}")
        if self.fresh:
            lines.append(f"  not in the source, freshly initialised: {_summarise(self.fresh)}")
        return lines


def _summarise(keys: list[str]) -> str:
    """`blocks.{0..23}.attn.attn_scale.omega` style summary of many per-block keys (also of
    `old → new` conversion lines, whose block index appears on both sides)."""
    groups: dict[str, list[int]] = {}
    for key in keys:
        indices = {int(i) for i in re.findall(r"\bblocks\.(\d+)\.", key)}
        pattern = re.sub(r"\bblocks\.\d+\.", "blocks.*.", key) if len(indices) == 1 else key
        groups.setdefault(pattern, []).extend(indices if len(indices) == 1 else [])
    parts = []
    for pattern, indices in groups.items():
        parts.append(pattern.replace("*", f"{{{min(indices)}..{max(indices)}}}") if indices else pattern)
    return ", ".join(parts)


# -- reading -------------------------------------------------------------------------------------


def read_weights(src: str | Path, ema: bool = False) -> Weights:
    """Read any supported source into a consolidated fp32 state dict (on the CPU)."""
    path = Path(src)
    if not path.exists():
        raise UserError(f"checkpoint not found: {src}")
    if path.is_dir():
        return _read_training_checkpoint(path, ema)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, ema)
    return _read_torch_file(path, ema)


def _read_training_checkpoint(src: Path, ema: bool) -> Weights:
    """The newest intact checkpoint of a run directory, or the named one, consolidated."""
    from vitdeep.engine.checkpoint import consolidate, find_checkpoint, read_marker

    skipped: list[str] = []
    path = find_checkpoint(src, on_skip=lambda p, why: skipped.append(f"{p.name} skipped: {why}"))
    marker = read_marker(path)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # DeepSpeed's chatter
        state_dict = consolidate(path, marker["zero_stage"], ema=ema)
    kind = f"vitdeep checkpoint, step {marker['step']}" + (", EMA" if ema else "") + "".join(f"; {s}" for s in skipped)
    return Weights(state_dict, str(path), kind, marker["model"], dict(marker.get("model_kwargs", {})))


def _read_safetensors(path: Path, ema: bool) -> Weights:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} is not a readable safetensors file: {error}") from error
    if metadata.get("format_vitdeep") == EXPORT_FORMAT:
        if ema and metadata.get("ema") != "true":
            raise UserError(f"{path} was exported without --ema; load it without --ema")
        return Weights(
            {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()},
            str(path), "vitdeep export", metadata["model"], json.loads(metadata["model_kwargs"]),
        )
    return Weights(_unwrap(state_dict, path, ema), str(path), "state dict")


def _read_torch_file(path: Path, ema: bool) -> Weights:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for "not a checkpoint"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is not a checkpoint torch can read safely ({reason})") from error
    return Weights(_unwrap(raw, path, ema), str(path), "state dict")


def _unwrap(raw: Any, path: Path, ema: bool) -> dict[str, torch.Tensor]:
    """The tensor mapping inside DeiT / timm style wrappers, without a `module.` prefix."""
    if ema:
        raw = next((raw[k] for k in ("model_ema", "state_dict_ema") if isinstance(raw, dict) and isinstance(raw.get(k), dict)), None)
        if raw is None:
            raise UserError(f"{path} holds no EMA weights (no model_ema / state_dict_ema); drop --ema")
    while isinstance(raw, dict) and not _is_state_dict(raw):
        inner = next((raw[k] for k in WRAPPER_KEYS if isinstance(raw.get(k), dict)), None)
        if inner is None:
            break
        raw = inner
    if not isinstance(raw, dict) or not _is_state_dict(raw):
        raise UserError(f"{path} holds no model state dict")
    return {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in raw.items()}


def _is_state_dict(mapping: dict) -> bool:
    return bool(mapping) and all(isinstance(v, torch.Tensor) for v in mapping.values())


# -- adapting ------------------------------------------------------------------------------------


#: Gong et al.'s bias-free talking-heads maps (PatchVisionTransformer's `deit/models.py`) → timm's names.
GONG_TALKING_HEADS = {"proj_pre": "proj_l", "proj_post": "proj_w"}


def _convert_official(state_dict: dict[str, torch.Tensor], family: str, report: LoadReport) -> dict[str, torch.Tensor]:
    """The authors' parameter names. Wang et al.: `blocks.i.attn.lamb` (ω), `blocks.i.lamb1/2`
    (λ). Gong et al.: `blocks.i.attn.proj_pre/proj_post.weight`, talking heads without bias,
    which are timm's `proj_l` / `proj_w` with a zero bias."""
    converted = {}
    for key, value in state_dict.items():
        wang = re.match(r"^(blocks\.\d+\.)(attn\.lamb|lamb1|lamb2)$", key)
        gong = re.match(r"^(blocks\.\d+\.attn\.)(proj_pre|proj_post)\.weight$", key)
        if wang is not None:
            prefix, name = wang.groups()
            if name == "attn.lamb":
                new_key = f"{prefix}attn.attn_scale.omega"
            else:
                new_key = f"{prefix}attn.feat_scale.lambda{name[-1]}"
                value = value * OFFICIAL_FEATSCALE_FACTOR[family]
            converted[new_key] = value
            report.converted.append(f"{key} → {new_key}")
        elif gong is not None:
            prefix, name = gong.groups()
            new_name = f"{prefix}{GONG_TALKING_HEADS[name]}"
            converted[f"{new_name}.weight"] = value
            converted[f"{new_name}.bias"] = torch.zeros(value.shape[0], dtype=value.dtype)
            report.converted.append(f"{key} → {new_name}.weight (bias 0)")
        else:
            converted[key] = value
    return converted


def _identity_value(key: str, like: torch.Tensor) -> torch.Tensor | None:
    """The value at which a parameter the source lacks leaves the source's function unchanged."""
    name = key.rsplit(".", 1)[-1]
    if name in ("omega", "lambda1", "lambda2"):
        return torch.zeros_like(like)
    if name in ("gamma", "gamma_1", "gamma_2"):
        return torch.ones_like(like)
    if re.search(r"attn\.proj_[lw]\.weight$", key):
        return torch.eye(like.shape[0], dtype=like.dtype)
    if re.search(r"attn\.proj_[lw]\.bias$", key):
        return torch.zeros_like(like)
    return None


def _is_classifier(key: str) -> bool:
    return key.split(".", 1)[0] in ("head", "head_dist", "patch_head")


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str = "", kind: str = "") -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Fit `state_dict` to `model` (see the module docstring); raises `UserError` on a mismatch."""
    from vitdeep.models.registry import family_of

    report = LoadReport(source, kind)
    state = _convert_official(state_dict, family_of(model), report)
    target = model.state_dict()
    source_depth, source_width = _source_shape(state)
    if (source_depth, source_width) != (len(model.blocks), model.embed_dim):
        raise UserError(
            f"{source} does not fit the model: source depth {source_depth}, width {source_width}; "
            f"model depth {len(model.blocks)}, width {model.embed_dim}"
        )

    unexpected = sorted(set(state) - set(target))
    if unexpected:
        raise UserError(f"{source} has parameters this model lacks: {_summarise(unexpected)} ({_architecture_hint(state, model)})")

    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        state["pos_embed"], report.resampled = _resample_pos_embed(state["pos_embed"], model, source)

    new_head = [k for k in state if _is_classifier(k) and state[k].shape != target[k].shape]
    for key in new_head:
        del state[key]
    for key, value in state.items():
        if value.shape != target[key].shape:
            raise UserError(f"{source}: {key} has shape {list(value.shape)}, the model needs {list(target[key].shape)} ({_architecture_hint(state, model)})")

    for key in sorted(set(target) - set(state)):
        identity = _identity_value(key, target[key])
        if identity is not None:
            state[key] = identity
            report.identity.append(key)
        elif _is_classifier(key):
            state[key] = target[key]
            report.fresh.append(key)
        else:
            raise UserError(f"{source} lacks {key} ({_architecture_hint(state, model)})")
    return state, report


def _source_shape(state: dict[str, torch.Tensor]) -> tuple[int, int | None]:
    """(number of self-attention blocks, width) of a state dict."""
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    norm = state.get("norm.weight")
    return depth, norm.shape[0] if norm is not None else None


def _architecture_hint(state: dict[str, torch.Tensor], model: nn.Module) -> str:
    depth, width = _source_shape(state)
    return f"source: depth {depth}, width {width}; model: depth {len(model.blocks)}, width {model.embed_dim}"


def _resample_pos_embed(pos_embed: torch.Tensor, model: nn.Module, source: str) -> tuple[torch.Tensor, str]:
    from timm.layers import resample_abs_pos_embed

    prefix = model.pos_embed_prefix_tokens
    old_tokens = pos_embed.shape[1] - prefix
    old_side = int(round(old_tokens**0.5))
    new_side = model.patch_embed.grid_size[0]
    if old_side * old_side != old_tokens or pos_embed.shape[-1] != model.embed_dim:
        raise UserError(
            f"{source}: pos_embed {list(pos_embed.shape)} does not fit a {new_side}×{new_side} grid with "
            f"{prefix} prefix token(s) and width {model.embed_dim}"
        )
    # plain bicubic when enlarging (as DeiT's finetuning code), antialiased when shrinking
    resampled = resample_abs_pos_embed(
        pos_embed, new_size=[new_side, new_side], old_size=[old_side, old_side], num_prefix_tokens=prefix,
        antialias=new_side < old_side,
    )
    return resampled, f"{old_side}×{old_side} → {new_side}×{new_side}"


def load_weights_into(model: nn.Module, weights: Weights) -> LoadReport:
    state, report = adapt_state_dict(weights.state_dict, model, weights.source, weights.kind)
    model.load_state_dict(state, strict=True)
    return report


#: Model switches a plain state dict shows by its keys (the authors' names included).
SWITCH_KEYS = {
    "talking_heads": r"^blocks\.\d+\.attn\.(proj_l|proj_pre)\.weight$",
    "attnscale": r"^blocks\.\d+\.attn\.(attn_scale\.omega|lamb)$",
    "featscale": r"^blocks\.\d+\.(attn\.feat_scale\.lambda1|lamb1)$",
    "patch_head": r"^patch_head\.weight$",
    "distilled": r"^dist_token$",
}


def options_in_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, bool]:
    """The switches a plain state dict's keys show to be on (e.g. `{"talking_heads": True}`)."""
    return {name: True for name, pattern in SWITCH_KEYS.items() if any(re.match(pattern, key) for key in state_dict)}


def build_model(weights: Weights, model_name: str | None = None, **overrides: Any) -> tuple[nn.Module, LoadReport]:
    """The model a source describes, with `overrides` (e.g. a new `img_size` or `num_classes`).

    A vitdeep checkpoint or export builds the model it records, with its saved options;
    `model_name` (`vitdeep_` prefix or not) names the architecture of a plain state dict only,
    whose switches (talking heads, AttnScale, FeatScale, patch head, distillation token) are read
    from its keys.
    """
    from vitdeep.models.registry import create_model, get_spec

    if weights.model is not None:
        name, saved = weights.model, weights.model_kwargs
    elif model_name is not None:
        name, saved = get_spec(model_name).name, options_in_state_dict(weights.state_dict)
    else:
        raise UserError(f"{weights.source} is a plain state dict: name its model with --model NAME")
    kwargs = {**saved, **{k: v for k, v in overrides.items() if v is not None}}
    if "num_classes" not in kwargs and "head.weight" in weights.state_dict:
        kwargs["num_classes"] = weights.state_dict["head.weight"].shape[0]
    model = create_model(name, **{k: v for k, v in kwargs.items() if v is not None})
    return model, load_weights_into(model, weights)


# -- exporting -----------------------------------------------------------------------------------


def export_weights(weights: Weights, out: str | Path, dtype: torch.dtype = torch.float32, ema: bool = False) -> Path:
    """One consolidated state dict as safetensors, with the model name and options in its
    metadata (read back by `read_weights` and by `timm.create_model("vitdeep_<name>", ...)`),
    plus a small JSON beside it for people."""
    from safetensors.torch import save_file

    if weights.model is None:
        raise UserError(f"{weights.source} does not say which vitdeep model it is; export needs a vitdeep checkpoint")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"export writes a .safetensors file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in weights.state_dict.items()}
    metadata = {
        "format": "pt",
        "format_vitdeep": EXPORT_FORMAT,
        "model": weights.model,
        "model_kwargs": json.dumps(weights.model_kwargs),
        "source": weights.source,
        "ema": "true" if ema else "false",
    }
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(out)
    info = {"model": weights.model, "options": weights.model_kwargs, "source": weights.source, "ema": ema, "dtype": str(dtype).removeprefix("torch.")}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return out


def _export_metadata(path: str | Path) -> dict[str, str] | None:
    """The safetensors metadata of a vitdeep export (None for any other file)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:
        return None
    return metadata if metadata.get("format_vitdeep") == EXPORT_FORMAT else None


def export_options(path: str | Path) -> dict[str, Any] | None:
    """Model options stored in a vitdeep export (None for any other file)."""
    metadata = _export_metadata(path)
    return json.loads(metadata["model_kwargs"]) if metadata is not None else None


def source_model_options(src: str | Path) -> dict[str, Any]:
    """`{"model": name, <architecture options>}` of a vitdeep checkpoint or export, read from its
    metadata only; `{}` for a plain state dict (the user names the model)."""
    from vitdeep.engine.checkpoint import find_checkpoint, read_marker

    path = Path(src)
    if not path.exists():
        raise UserError(f"checkpoint not found: {src}")
    if path.is_dir():
        marker = read_marker(find_checkpoint(path))
        name, kwargs = marker["model"], marker.get("model_kwargs", {})
    else:
        metadata = _export_metadata(path)
        if metadata is None:
            return {}
        name, kwargs = metadata["model"], json.loads(metadata["model_kwargs"])
    from vitdeep.architecture import INHERITED_OPTIONS

    return {"model": name, **{k: kwargs[k] for k in INHERITED_OPTIONS if kwargs.get(k) is not None}}
