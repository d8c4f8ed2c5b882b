"""DeepSpeed set-up: the process group, the ds_config ("auto" filling and checks), the client
AdamW with weight-decay / layer-decay groups, and `deepspeed.initialize`.

DeepSpeed itself is imported lazily: `--dry-run` and the checks run without starting it.
"""

from __future__ import annotations

import copy
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitdeep.cores import usable_cores
from vitdeep.errors import UserError
from vitdeep.fields import check_number, range_of
from vitdeep.ranks import read_ranks

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by deepspeed / torchrun / SLURM mapping; 1 process
    otherwise. A malformed or half-set environment is a `UserError` (`vitdeep.ranks`)."""
    ranks = read_ranks()
    return ranks.rank, ranks.world_size, ranks.local_rank


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: float) -> DistInfo:
    """Join (or, for a plain single process, create) the process group.

    CPU runs use gloo; GPU runs NCCL. `timeout_minutes` bounds every collective, so a lost node
    ends the others with an error instead of a hang.
    """
    import deepspeed
    import torch.distributed as dist

    rank, world_size, local_rank = world_from_env()  # a half-set launch environment is refused before it is filled in
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    on_gpu = torch.cuda.is_available()
    if on_gpu and local_rank >= torch.cuda.device_count():
        raise UserError(f"the environment sets LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s)")
    if on_gpu:
        torch.cuda.set_device(local_rank)
    else:
        _share_cpu_cores()
    timeout = timedelta(minutes=timeout_minutes)
    _set_default_group_timeout(timeout)
    if not dist.is_initialized():
        _skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", timeout=timeout, verbose=False)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return DistInfo(rank, world_size, local_rank, device)


def leave_process_group() -> None:
    """End this process's part in a multi-rank launch: wait for every rank, then close the process
    group, so that no rank exits with gloo's threads still running under its peers (a rank of a
    2-rank `vitdeep eval` once died at exit with "terminate called without an active exception",
    code 250, after printing its result). Only a process that is done with the group calls it: an
    ablate launch evaluates a cell and goes on to the next."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def _share_cpu_cores() -> None:
    """CPU ranks on one machine split the cores this process may use (its affinity and cgroup
    quota, `vitdeep.cores`), unless OMP_NUM_THREADS says otherwise.

    Every rank would otherwise start one thread per machine core: with DeepSpeed's shared-memory
    all-reduce spinning beside them, 2 ranks on 2 cores measured 11 s per step instead of 0.2 s.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = read_ranks().local_world_size or 1
    torch.set_num_threads(max(1, usable_cores() // local_ranks))


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed from compiling its shared-memory comm op when it joins the process group.

    DeepSpeed's torch backend builds that C++ op (gcc + ninja, ~80 s on 2 cores, again in every
    environment that shares the torch extensions cache) for `inference_all_reduce` alone: training
    reduces through torch.distributed, which is what the op's absence falls back to. Without it no
    66 MB all-reduce buffer per rank lands in /dev/shm either.
    """
    import importlib

    # `import deepspeed.comm.torch as m` would bind `torch`, which deepspeed.comm imports by that name
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _set_default_group_timeout(timeout: timedelta) -> None:
    """Make `timeout` the default of every process group created from here on.

    `init_process_group(timeout=…)` covers only the world group: groups made by `new_group()`
    without a timeout (DeepSpeed's data-parallel / ZeRO groups, which carry the gradient
    reductions) take torch's module default instead, 30 minutes for gloo and 10 for NCCL, so a
    hung node would stall the others that long whatever --dist-timeout says.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


#: Words of the errors gloo / NCCL raise when a peer died, hung past the timeout or was cut off
#: (gloo's carry its source path, e.g. "[.../gloo/transport/tcp/pair.cc:545] Read error …").
_PEER_ERROR_WORDS = ("gloo/", "nccl", "connection reset by peer", "connection closed by peer")


def lost_peer_reason(error: BaseException) -> str | None:
    """The short reason when `error` (or its cause) is a collective / rendezvous losing a peer, else None.

    torch.distributed's own error classes always count; a plain RuntimeError only when it carries
    gloo's or NCCL's words and a process group of several ranks exists (so other bugs keep their
    traceback).
    """
    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if isinstance(current, dist.DistError) or (
            grouped and isinstance(current, RuntimeError) and any(w in text.lower() for w in _PEER_ERROR_WORDS)
        ):
            return _short_reason(text)
        current = current.__cause__ or current.__context__
    return None


def _short_reason(text: str) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "unknown error")
    line = re.sub(r"^(\[[^\]]*\]\s*)+", "", line)  # gloo's "[file.cc:123]" prefix
    line = line.split(". This is typically caused")[0].rstrip(". ")
    return line[:240]


#: Store keys under which a rank that stops with an error leaves its message for the others.
_FAILURE_KEY = "vitdeep/failed/{rank}"
#: How long a failing rank that hosts the rendezvous store keeps it up for the others to read.
_STORE_LINGER_S = 3.0


def _default_store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))
        return store
    except Exception:  # the store's host is gone: nothing to read or leave
        return None


def announce_failure(message: str) -> None:
    """Leave this rank's error for the others before it exits, so that they report "rank R
    stopped with an error" instead of a lost node (best effort: `lost_peer_message` reads it).

    The process group is closed at once (gloo peers notice a closed connection immediately);
    rank 0 of a deepspeed-launched run hosts the store and keeps it up a moment longer.
    """
    import time

    import torch.distributed as dist

    store = _default_store()
    if store is None:
        return
    rank = dist.get_rank()
    try:
        store.set(_FAILURE_KEY.format(rank=rank), message[:1000])
    except Exception:
        return
    hosts_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if dist.get_backend() == "gloo":
        dist.destroy_process_group()
        if hosts_store:
            time.sleep(_STORE_LINGER_S)


def _peer_failures(store) -> list[str]:
    import torch.distributed as dist

    me, failures = dist.get_rank(), []
    for rank in range(dist.get_world_size()):
        key = _FAILURE_KEY.format(rank=rank)
        try:
            if rank != me and store.check([key]):
                failures.append(f"rank {rank} stopped with an error: {store.get(key).decode()}")
        except Exception:
            break
    return failures


def lost_peer_message(reason: str, out: str | Path | None = None) -> str:
    """One line for a run that lost a rank: what happened (another rank's error when it left one,
    else a lost node) and how to go on."""
    import torch.distributed as dist

    from vitdeep.engine.checkpoint import CHECKPOINTS, newest_intact, read_marker

    rank, world_size, _ = world_from_env()
    if not (dist.is_available() and dist.is_initialized()):
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return (f"the ranks could not form a process group at {where} (rank {rank} of {world_size}: {reason}); check "
                f"MASTER_ADDR / MASTER_PORT, the firewall, and that every node starts within --dist-timeout")
    store = _default_store()
    failures = _peer_failures(store) if store is not None else []
    if failures:
        text = f"{failures[0]} (this is rank {rank} of {world_size}, which stopped with it)"
    else:
        text = f"lost contact with another rank (rank {rank} of {world_size}: {reason}); a node died, hung or was cut off"
    if out is None:
        return text
    found = newest_intact(Path(out))
    if found is None:
        return f"{text}; no checkpoint was complete yet in {Path(out) / CHECKPOINTS}, start the run again"
    return (f"{text}; the last complete checkpoint {found} (step {read_marker(found)['step']}) is intact, "
            f"resume with --resume auto")


def find_ds_config(name_or_path: str) -> Path:
    """A ds_config file path, or the name of a bundled one (`zero2_bf16`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = DS_CONFIG_DIR / f"{name_or_path.removesuffix('.json')}.json"
    if bundled.is_file() and path.parent == Path("."):
        return bundled
    names = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
    raise UserError(f"ds-config not found: {name_or_path} (a JSON file, or one of: {names})")


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    from vitdeep.config import OptimConfig
    from vitdeep.documents import read_document

    path = find_ds_config(name_or_path)
    config = read_document(path, "ds-config", as_json=True)
    if not isinstance(config, dict):
        raise UserError(f"ds-config {path} must hold a JSON object")
    if "optimizer" in config or "scheduler" in config:
        raise UserError(f"ds-config {path}: remove the 'optimizer'/'scheduler' blocks; vitdeep passes its own AdamW and schedule")
    for key, name in _AUTO_KEYS.items():  # a value here replaces the option's: the same range holds
        if config.get(key, "auto") != "auto":
            check_number(key, config[key], range_of(OptimConfig, name), f"ds-config {path}", flag=False)
    return config


#: `torch_autocast.dtype` spellings DeepSpeed accepts → vitdeep's precision name.
_AUTOCAST_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
                    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16"}


def precision(ds_config: dict[str, Any]) -> str:
    """'bf16', 'fp16', 'fp32', or 'autocast-bf16' / 'autocast-fp16', from the ds_config.

    The autocast modes (DeepSpeed's `torch_autocast` section) keep the weights and the ZeRO
    master copies in fp32 and run the forward pass under `torch.autocast`.
    """
    enabled = [name for name in ("bf16", "fp16", "torch_autocast") if ds_config.get(name, {}).get("enabled")]
    if len(enabled) > 1:
        raise UserError(f"ds-config enables {' and '.join(enabled)}; choose one")
    if enabled == ["torch_autocast"]:
        dtype = str(ds_config["torch_autocast"].get("dtype", ""))
        if dtype not in _AUTOCAST_DTYPES:
            raise UserError(f"ds-config torch_autocast.dtype={dtype!r}: use bfloat16 or float16")
        return f"autocast-{_AUTOCAST_DTYPES[dtype]}"
    return enabled[0] if enabled else "fp32"


def autocast_dtype(ds_config: dict[str, Any]) -> torch.dtype | None:
    """The dtype the engine's forward runs in under `torch_autocast`, else None."""
    mode = precision(ds_config)
    return {"autocast-bf16": torch.bfloat16, "autocast-fp16": torch.float16}.get(mode)


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


@dataclass(frozen=True)
class BatchPlan:
    """Global batch = micro batch × gradient accumulation × world size."""

    global_batch: int
    micro_batch: int
    world_size: int
    grad_accum: int


def plan_batches(global_batch: int, micro_batch: int, world_size: int) -> BatchPlan:
    if global_batch <= 0 or micro_batch <= 0:
        raise UserError(f"batch sizes must be positive (global_batch={global_batch}, micro_batch={micro_batch})")
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise UserError(
            f"global_batch={global_batch} is not a multiple of micro_batch={micro_batch} × world size {world_size} = {per_step}"
        )
    return BatchPlan(global_batch, micro_batch, world_size, global_batch // per_step)


#: ds_config key → (vitdeep option it mirrors).
_AUTO_KEYS = {
    "train_batch_size": "global_batch",
    "train_micro_batch_size_per_gpu": "micro_batch",
    "gradient_clipping": "clip_grad",
}


#: DeepSpeed's default ZeRO bucket sizes (elements); "auto" caps them at the model's size.
ZERO_BUCKETS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000}


def adopted_ds_values(ds_config: dict[str, Any], options: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
    """The batch / clipping options an explicit ds_config value sets (it wins over a vitdeep
    default); a value contradicting an option the user set is an error naming both."""
    adopted: dict[str, Any] = {}
    for key, name in _AUTO_KEYS.items():
        value = ds_config.get(key, "auto")
        if value == "auto":
            continue
        if name in explicit and value != options[name]:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"ds-config sets {key}={value} but {flag}={options[name]}; remove one of them")
        adopted[name] = type(options[name])(value) if options[name] is not None else value
    return adopted


def fill_ds_config(
    ds_config: dict[str, Any], options: dict[str, Any], explicit: frozenset[str], world_size: int, num_parameters: int
) -> tuple[dict[str, Any], dict[str, Any], BatchPlan]:
    """Fill the "auto" values from the run options and check the explicit ones.

    An explicit ds_config value wins over a vitdeep *default*; an explicit value that contradicts
    an option the user set is an error naming both. Returns (filled config, the options it
    changed, the batch plan). `gradient_clipping` is always written out (its default moved
    between DeepSpeed releases). "auto" ZeRO buckets are DeepSpeed's defaults capped at the
    model's parameter count: DeepSpeed allocates them whole, so a 5e8-element bucket for a
    model of 2e7 parameters multiplied the per-rank peak memory by 3-5 (benchmarks, row 6).
    """
    filled = copy.deepcopy(ds_config)
    adopted = adopted_ds_values(filled, options, explicit)
    merged = {**options, **adopted}
    plan = plan_batches(merged["global_batch"], merged["micro_batch"], world_size)
    accum = filled.get("gradient_accumulation_steps", "auto")
    if accum != "auto" and int(accum) != plan.grad_accum:
        raise UserError(
            f"ds-config sets gradient_accumulation_steps={accum} but global_batch={plan.global_batch} / "
            f"(micro_batch={plan.micro_batch} × world size {world_size}) = {plan.grad_accum}"
        )
    zero = filled.get("zero_optimization", {})
    for key, default in ZERO_BUCKETS.items():
        if zero.get(key) == "auto":
            zero[key] = min(default, num_parameters)
    filled.update(
        train_batch_size=plan.global_batch,
        train_micro_batch_size_per_gpu=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        gradient_clipping=float(merged["clip_grad"]),
    )
    leftover = [k for k, v in _walk(filled) if v == "auto"]
    if leftover:
        raise UserError(f"ds-config has 'auto' values vitdeep cannot fill: {', '.join(leftover)}")
    return filled, adopted, plan


def _walk(config: dict[str, Any], prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_precision_supported(ds_config: dict[str, Any]) -> None:
    """fp16 needs a GPU (DeepSpeed's loss scaling is refused on the CPU accelerator)."""
    if precision(ds_config).endswith("fp16") and not torch.cuda.is_available():
        raise UserError("fp16 needs a GPU; this machine has none (use a bf16 or fp32 ds-config)")
    offload = ds_config.get("zero_optimization", {})
    if not torch.cuda.is_available() and ("offload_optimizer" in offload or "offload_param" in offload):
        raise UserError("ZeRO offload moves GPU memory to the CPU; this machine has no GPU (use zero3_bf16)")


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D parameters and `model.no_weight_decay()`; with
    `layer_decay`, lr scale decay^(depth from the top) per layer (timm's grouping, `lr_scale`)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    skip = model.no_weight_decay()
    if layer_decay:
        return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def build_optimizer(model: nn.Module, weight_decay: float, layer_decay: float | None, lr: float) -> torch.optim.Optimizer:
    """The client AdamW; DeepSpeed wraps it for ZeRO. Fused on the GPU and on the CPU alike (one
    kernel over all tensors): the CPU's per-tensor loop took 15 % of a small deep model's step."""
    groups = param_groups(model, weight_decay, layer_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    """`deepspeed.initialize`, with checkpoints read (on resume) without unpickling."""
    import deepspeed

    from vitdeep.engine.checkpoint import use_safe_checkpoint_engine

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    use_safe_checkpoint_engine(engine)
    return engine


def engine_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype of the engine's weights, and so of its inputs (fp32 under autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(ds_config), torch.float32)
