"""`vitdeep export`: one consolidated state dict (safetensors) that vitdeep and timm load."""

from __future__ import annotations

from pathlib import Path

import torch

from vitdeep.engine.weights import export_paths, export_weights, read_weights
from vitdeep.errors import UserError
from vitdeep.monitor import make_console
from vitdeep.paths import check_output_file, checkpoint_inputs, claim_outputs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_export(source: str, out: Path, ema: bool = False, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Check the output paths (the export and its JSON sidecar: neither may be the source nor, without
    `overwrite`, exist) and the dtype, read the source (consolidating a ZeRO checkpoint), write
    OUT.safetensors and OUT.json, and say so."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose {' or '.join(DTYPES)}")
    check_output_file(out, "OUT", "model.safetensors")
    outputs = export_paths(out)
    claim_outputs(outputs, checkpoint_inputs(source), flag="OUT", overwrite=overwrite)
    weights = read_weights(source, ema=ema)
    path = export_weights(weights, out, dtype=DTYPES[dtype], ema=ema)
    make_console().print(f"exported {weights.model} ({weights.kind}) to {path} and {outputs[1]}")
    return path
