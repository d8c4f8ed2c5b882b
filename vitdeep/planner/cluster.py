"""The hardware a run is planned for (`vitdeep plan`), with its defaults.

Free of torch, so the command line can show these defaults in `--help` without importing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vitdeep.errors import UserError
from vitdeep.fields import FRACTION, MAX_RANKS, Checked, above, at_least, option, shown

#: An 80 GB A100 / H100. GB are decimal: such a GPU reports 85.0·10⁹ bytes (79.2 GiB) to torch,
#: so the default leaves a margin beside the framework allowance (pass 79GiB for the exact size).
DEFAULT_GPU_MEMORY = "80GB"
#: H100 SXM dense bf16 tensor-core peak, TFLOP/s (A100: 312).
DEFAULT_GPU_TFLOPS = 989.0
DEFAULT_MFU = 0.4
DEFAULT_GPUS_PER_NODE = 8
#: ImageNet-1k's training set, assumed when a plan is made without --data.
IMAGENET_TRAIN_SAMPLES = 1_281_167
IMAGENET_CLASSES = 1000

#: The most memory (1 PiB) and peak TFLOP/s one GPU may be said to have.
MAX_GPU_MEMORY, MAX_TFLOPS = 2**50, 1e6
#: The most CPU cores one node, and images/s one core, may be said to have (`plan --cores-per-node`, `--decode-rate`).
MAX_CORES, MAX_DECODE_RATE = 2**20, 1e7

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'80GB' → 80·10⁹ bytes, '79GiB' → 79·2³⁰ (GB decimal, GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"`gpu_memory` must be a size such as 80GB or 79GiB, got {shown(text)}", params=("gpu_memory",))
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if size > MAX_GPU_MEMORY:  # also inf, from hundreds of digits
        raise UserError(f"`gpu_memory` must be at most 1PiB, got {shown(text)}", params=("gpu_memory",))
    return int(size)


@dataclass(frozen=True)
class Cluster(Checked):
    """`nodes` × `gpus_per_node` GPUs of `gpu_memory` bytes and `gpu_tflops` peak each, run at
    `mfu`; `device` is where the optimizer runs (CUDA's fused AdamW, or the CPU's)."""

    nodes: int = option(1, "Nodes.", at_least(1, MAX_RANKS))
    gpus_per_node: int = option(DEFAULT_GPUS_PER_NODE, "GPUs per node.", at_least(1, MAX_RANKS))
    gpu_memory: int = option(parse_memory(DEFAULT_GPU_MEMORY), "Bytes of one GPU's memory.", at_least(1, MAX_GPU_MEMORY))
    gpu_tflops: float = option(DEFAULT_GPU_TFLOPS, "Peak TFLOP/s of one GPU.", above(0, MAX_TFLOPS))
    mfu: float = option(DEFAULT_MFU, "Model FLOPs utilisation.", FRACTION)
    device: str = option("cuda", "Where the optimizer runs.")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node
