"""Weights from anywhere: reading every supported source, building the model it describes, export.

Sources: a vitdeep training checkpoint (any ZeRO stage; consolidated on the CPU, optionally its
EMA; `vitdeep.engine.checkpoint`), a vitdeep export (`.safetensors` carrying the model name and
options), and plain timm / DeiT / CaiT state dicts (`.pth`, `.bin`, `.safetensors`; wrapped in
`model` / `state_dict` / `module.` or not), including the authors' own checkpoints. Every file is
read with `torch.load(weights_only=True)` or safetensors: a run directory can come from anyone.
Fitting the weights to a model (key maps, position-embedding resampling, identity init, the
load report) is `vitdeep.models.checkpoints`' job.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitdeep.architecture import INHERITED_OPTIONS
from vitdeep.engine.checkpoint import find_checkpoint, read_marker, read_run_weights
from vitdeep.errors import UserError
from vitdeep.export_format import export_metadata, read_export_metadata, saved_crop_ratio
from vitdeep.models import create_model, get_spec
from vitdeep.models.checkpoints import LoadReport, adapt_state_dict, options_in_state_dict
from vitdeep.paths import follow_umask

#: Wrappers seen around state dicts in the wild, tried in this order.
WRAPPER_KEYS = ("model", "state_dict", "module")


@dataclass
class Weights:
    """A consolidated fp32 state dict and what is known about the model it belongs to."""

    state_dict: dict[str, torch.Tensor]
    source: str
    kind: str
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: The training step of a vitdeep checkpoint (None for exports and state dicts).
    step: int | None = None
    #: The centre-crop ratio the run validated with (its `crop_ratio`), which `eval`, `analyze`
    #: and exports take unless told otherwise; None when the source does not say.
    crop_ratio: float | None = None


def read_weights(src: str | Path, ema: bool = False) -> Weights:
    """Read any supported source into a consolidated fp32 state dict (on the CPU)."""
    path = Path(src)
    if not path.exists():
        raise UserError(f"checkpoint not found: {src}")
    if path.is_dir():
        state_dict, marker, kind, found = read_run_weights(path, ema)
        return Weights(state_dict, str(found), kind, marker["model"], dict(marker.get("model_kwargs", {})), marker.get("step"),
                       saved_crop_ratio(marker.get("config", {}).get("augment", {}).get("crop_ratio")))
    if path.suffix == ".safetensors":
        return _read_safetensors(path, ema)
    return _read_torch_file(path, ema)


def _read_safetensors(path: Path, ema: bool) -> Weights:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} is not a readable safetensors file: {error}") from error
    if read_export_metadata(path) is not None:
        if ema and metadata.get("ema") != "true":
            raise UserError(f"{path} was exported without `ema`; load it without `ema`", params=("ema",))
        return Weights(
            {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()},
            str(path), "vitdeep export", metadata["model"], json.loads(metadata["model_kwargs"]),
            crop_ratio=saved_crop_ratio(metadata.get("crop_ratio")),
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
            raise UserError(f"{path} holds no EMA weights (no model_ema / state_dict_ema); drop `ema`", params=("ema",))
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


def load_weights_into(model: nn.Module, weights: Weights) -> LoadReport:
    state, report = adapt_state_dict(weights.state_dict, model, weights.source, weights.kind)
    model.load_state_dict(state, strict=True)
    return report


def build_model(weights: Weights, model_name: str | None = None, **overrides: Any) -> tuple[nn.Module, LoadReport]:
    """The model a source describes, with `overrides` (e.g. a new `img_size` or `num_classes`).

    A vitdeep checkpoint or export builds the model it records, with its saved options;
    `model_name` (`vitdeep_` prefix or not) names the architecture of a plain state dict only,
    whose switches (the remedies, a patch head, a distillation token) are read from its keys.
    """
    if weights.model is not None:
        name, saved = weights.model, weights.model_kwargs
    elif model_name is not None:
        name = get_spec(model_name).name
        saved = options_in_state_dict(weights.state_dict, name)
    else:
        raise UserError(f"{weights.source} is a plain state dict: name its model with `model_name`", params=("model_name",))
    kwargs = {**saved, **{k: v for k, v in overrides.items() if v is not None}}
    if "num_classes" not in kwargs and "head.weight" in weights.state_dict:
        kwargs["num_classes"] = weights.state_dict["head.weight"].shape[0]
    model = create_model(name, **{k: v for k, v in kwargs.items() if v is not None})
    return model, load_weights_into(model, weights)


def export_weights(weights: Weights, out: str | Path, dtype: torch.dtype = torch.float32, ema: bool = False) -> Path:
    """One consolidated state dict as safetensors, with the model name and options in its
    metadata (read back by `read_weights` and by `timm.create_model("vitdeep_<name>", ...)`),
    plus a small JSON beside it for people."""
    from safetensors.torch import save_file

    if weights.model is None:
        raise UserError(f"{weights.source} does not say which vitdeep model it is; export needs a vitdeep checkpoint")
    out, sidecar = export_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in weights.state_dict.items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=export_metadata(weights.model, weights.model_kwargs, weights.source, ema, weights.crop_ratio))
    follow_umask(tmp)  # safetensors creates its file for its owner only
    tmp.replace(out)
    info = {"model": weights.model, "options": weights.model_kwargs, "source": weights.source, "ema": ema, "dtype": str(dtype).removeprefix("torch."),
            "crop_ratio": weights.crop_ratio}
    sidecar.write_text(json.dumps(info, indent=2))
    return out


def export_paths(out: str | Path) -> tuple[Path, Path]:
    """The files an export to `out` writes: `out` (a .safetensors file) and its JSON sidecar."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"export writes a .safetensors file, got {out}")
    return out, out.with_suffix(".json")


def source_architecture(src: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(model name, every saved model option) of a vitdeep checkpoint or export, read from its
    metadata only; None for a plain state dict (the user names the model)."""
    path = Path(src)
    if not path.exists():
        raise UserError(f"checkpoint not found: {src}")
    if path.is_dir():
        marker = read_marker(find_checkpoint(path))
        return marker["model"], dict(marker.get("model_kwargs", {}))
    metadata = read_export_metadata(path)
    if metadata is None:
        return None
    return metadata["model"], json.loads(metadata["model_kwargs"])


def source_model_options(src: str | Path) -> dict[str, Any]:
    """`{"model": name, <architecture options>}` of a vitdeep checkpoint or export, read from its
    metadata only; `{}` for a plain state dict (the user names the model)."""
    architecture = source_architecture(src)
    if architecture is None:
        return {}
    name, kwargs = architecture
    return {"model": name, **{k: kwargs[k] for k in INHERITED_OPTIONS if kwargs.get(k) is not None}}


def check_inherited_model(model: str, named_by: str, source: str | Path, inherited: dict[str, Any]) -> None:
    """A finetune keeps its source's architecture (`inherited`, from `source_model_options`), so
    its model is the source's: another name (a recipe for another model, `--model`) would label
    the source's depth and width with it, e.g. a 2 M-parameter model as deit_base_24. `named_by`
    says where `model` came from; a plain state dict (`inherited` empty) takes the model named."""
    if inherited and get_spec(model).name != get_spec(inherited["model"]).name:
        raise UserError(f"the model is {model} (from {named_by}), but --from {source} holds a {inherited['model']} (depth "
                        f"{inherited.get('depth')}, width {inherited.get('embed_dim')}), whose architecture a finetune keeps: "
                        f"drop {named_by.split()[0]}, or finetune a {model}")


def source_crop_ratio(src: str | Path) -> float | None:
    """The evaluation crop a vitdeep run or export was validated with, from its metadata only;
    None for a plain state dict (or a source that does not say)."""
    path = Path(src)
    if path.is_dir():
        marker = read_marker(find_checkpoint(path))
        return saved_crop_ratio(marker.get("config", {}).get("augment", {}).get("crop_ratio"))
    metadata = read_export_metadata(path)
    return saved_crop_ratio(metadata.get("crop_ratio")) if metadata is not None else None
