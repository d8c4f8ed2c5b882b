"""The format of `vitdeep export`: a safetensors file whose metadata names the model and its options.

Read from the file's JSON header alone (no tensors, no torch), so both the engine, which writes and
reads exports, and the timm entry points, which build the model an export was saved from, use it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

EXPORT_FORMAT = "vitdeep-export-1"
#: A header larger than this is not one of ours (the tensors' table of a 48-block model is ~100 kB).
_MAX_HEADER = 100_000_000


def export_metadata(model: str, model_kwargs: dict[str, Any], source: str, ema: bool,
                    crop_ratio: float | None = None) -> dict[str, str]:
    """The safetensors metadata of an export (string values, as the format requires); `crop_ratio`
    is the run's evaluation crop (timm's `crop_pct`), when known."""
    metadata = {
        "format": "pt",
        "format_vitdeep": EXPORT_FORMAT,
        "model": model,
        "model_kwargs": json.dumps(model_kwargs),
        "source": source,
        "ema": "true" if ema else "false",
    }
    if crop_ratio is not None:
        metadata["crop_ratio"] = repr(float(crop_ratio))
    return metadata


def saved_crop_ratio(value: Any) -> float | None:
    """A crop ratio read from a checkpoint or an export, None unless it is one (a number in (0, 1])."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        return None
    return ratio if 0.0 < ratio <= 1.0 else None


def export_crop_ratio(path: str | Path) -> float | None:
    """The evaluation crop stored in a vitdeep export (None for any other file, or when not stored)."""
    metadata = read_export_metadata(path)
    return saved_crop_ratio(metadata.get("crop_ratio")) if metadata is not None else None


def read_export_metadata(path: str | Path) -> dict[str, str] | None:
    """The metadata of a vitdeep export; None for any other file (a plain state dict, not a file)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_HEADER:
                return None
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) and metadata.get("format_vitdeep") == EXPORT_FORMAT else None


def export_options(path: str | Path) -> dict[str, Any] | None:
    """Model options stored in a vitdeep export (None for any other file)."""
    metadata = read_export_metadata(path)
    return json.loads(metadata["model_kwargs"]) if metadata is not None else None
