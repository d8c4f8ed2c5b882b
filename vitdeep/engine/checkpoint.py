"""Training checkpoints: save, check, find the newest intact one, resume, prune, consolidate, read.

Layout under `OUT/checkpoints/step_00001000/`: DeepSpeed's engine state (every rank writes its
own ZeRO partition, so the directory must be on storage all nodes share), one
`rank_00000.pt` per rank (RNG states and that rank's EMA partition), and last the marker
`vitdeep.json` (step, epoch, data position, config, metrics, and the size of every file). The
marker is written by rank 0 only after every rank has finished writing, atomically, so a save
interrupted at any point never leaves a checkpoint that looks complete.

A run directory can come from anyone, so nothing here unpickles: every file, DeepSpeed's
included, is read with `torch.load(weights_only=True)` and the few DeepSpeed classes its files
hold registered as safe globals (`SAFE_GLOBALS`). Resuming goes through the same reader
(a safe subclass replaces DeepSpeed's checkpoint engine), and so does consolidation.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vitdeep.engine.markers import (
    CHECKPOINTS,
    MARKER,
    MARKER_FIELDS,
    complete_checkpoints,
    first_line,
    marked,
    marker_problem,
    read_marker,
    tag_for,
)
from vitdeep.errors import TrainingStopped, UserError
from vitdeep.paths import write_json_atomic

#: DeepSpeed objects inside its checkpoint files (loss scaler, ZeRO stage, fragment addresses).
SAFE_GLOBAL_NAMES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class DamagedCheckpoint(UserError):
    """A checkpoint file that is missing, truncated, unreadable or holds objects we do not load."""


def rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.pt"


# -- reading files safely ----------------------------------------------------------------------


def _safe_globals() -> list[Any]:
    import importlib

    found = []
    for name in SAFE_GLOBAL_NAMES:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), attr))
    return found


def load_safely(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` of a vitdeep or DeepSpeed checkpoint file.

    `mmap=True` reads only the pickled structure (the tensor data stays on disk), which is how a
    checkpoint is checked before use. Raises `DamagedCheckpoint` naming the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise DamagedCheckpoint(f"{path} is missing")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            refused = next((line.strip() for line in str(error).splitlines() if "Unsupported" in line), "a code-running object")
            raise DamagedCheckpoint(f"{path} holds objects vitdeep does not unpickle ({refused}); refusing to load it") from None
        raise DamagedCheckpoint(f"{path} is not a readable checkpoint file ({first_line(error)})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise DamagedCheckpoint(f"{path} is damaged or truncated ({first_line(error)})") from None


@functools.cache
def _safe_checkpoint_engine_class() -> type:
    """DeepSpeed's torch checkpoint engine, reading with `weights_only=True` and recording a
    failed write (a full disk) instead of raising it, so that every rank still reaches DeepSpeed's
    barriers and the ranks can decide together that the save failed (`save_checkpoint`)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        write_error: OSError | None = None

        def save(self, state_dict, path: str) -> None:
            try:
                super().save(state_dict, path)
            except OSError as error:
                self.write_error = self.write_error or error

        def load(self, path: str, map_location=None):
            return load_safely(path, map_location=map_location)

    return SafeCheckpointEngine


def use_safe_checkpoint_engine(engine: Any) -> None:
    """Make `engine` read and write its checkpoints through the safe checkpoint engine."""
    engine.checkpoint_engine = _safe_checkpoint_engine_class()(engine._config)


# -- markers and intact checkpoints ------------------------------------------------------------


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint directory cannot be used (None when it is intact).

    Intact: a well-formed marker, every file it lists present at its recorded size (older
    markers without the list: each rank's file present), and every file readable by the safe
    reader (only its pickled structure is read, so this is cheap).
    """
    marker, problem = marker_problem(path)
    if problem is not None:
        return problem
    files = marker.get("files")
    if isinstance(files, dict):
        for name, size in files.items():
            file = Path(path) / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} is truncated ({file.stat().st_size:,} of {size:,} bytes)"
    else:
        missing = [rank_file(Path(path), r).name for r in range(marker["world_size"]) if not rank_file(Path(path), r).is_file()]
        if missing:
            return f"{missing[0]} is missing"
        files = {p.name: None for p in Path(path).glob("*.pt")}
    for name in files:
        if name.endswith(".pt"):
            try:
                load_safely(Path(path) / name, mmap=True)
            except DamagedCheckpoint as error:
                return str(error)
    return None


def newest_intact(out: Path, on_skip: Callable[[Path, str], None] | None = None) -> Path | None:
    """The newest intact checkpoint of a run directory; `on_skip(path, reason)` hears of every newer
    one passed over (a damaged file, a marker of the wrong shape)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and (p / MARKER).exists()), key=lambda p: p.name)
    for path in reversed(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if on_skip is not None:
            on_skip(path, problem)
    return None


def require_intact(path: Path) -> dict[str, Any]:
    """The marker of a checkpoint directory named by the user, or a `UserError` saying what is wrong."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise DamagedCheckpoint(f"checkpoint {path} cannot be used: {problem}")
    return read_marker(path)


def find_checkpoint(path: str | Path, on_skip: Callable[[Path, str], None] | None = None) -> Path:
    """A checkpoint directory named by the user: a `step_*` directory (which must be intact), or a
    run / `checkpoints/` directory (its newest intact checkpoint)."""
    path = Path(path)
    if (path / MARKER).exists():
        require_intact(path)
        return path
    run_dir = path.parent if path.name == CHECKPOINTS else path
    found = newest_intact(run_dir, on_skip)
    if found is None:
        raise UserError(f"{path} is not a vitdeep checkpoint (no intact checkpoint found in it)")
    return found


def resolve_resume(resume: str | None, out: Path, on_skip: Callable[[Path, str], None] | None = None) -> Path | None:
    """`auto` → newest intact checkpoint in `out` (None when there is none); a path must be intact."""
    if resume is None:
        return None
    if resume == "auto":
        return newest_intact(out, on_skip)
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {resume}")
    if not (path / MARKER).exists():
        raise UserError(f"{resume} is not a complete vitdeep checkpoint (no {MARKER}; an interrupted save?)")
    require_intact(path)
    return path


# -- RNG state as tensors (so rank files need no unpickling) --------------------------------------


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- saving ------------------------------------------------------------------------------------


def _any_rank_failed(error: OSError | None) -> list[str]:
    """Every rank's write error (empty when all succeeded); a collective."""
    import torch.distributed as dist

    failed = torch.tensor([1.0 if error is not None else 0.0])
    dist.all_reduce(failed)
    if not failed.item():
        return []
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"rank {dist.get_rank()}: {first_line(error)}")
    return [m for m in messages if m]


def save_checkpoint(
    engine: Any,
    out: Path,
    *,
    rank: int,
    step: int,
    meta: dict[str, Any],
    ema_state: dict[str, Any] | None,
) -> Path:
    """Save on every rank (a collective); returns the checkpoint directory.

    A write that fails on any rank (a full disk) fails the save on all of them: no marker is
    written, the partial directory is removed, and `TrainingStopped` names the newest intact
    checkpoint, which is untouched.
    """
    import torch.distributed as dist

    root = Path(out) / CHECKPOINTS
    tag = tag_for(step)
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # the remains of an interrupted save at this step
    dist.barrier()
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.write_error = None
    engine.save_checkpoint(str(root), tag=tag, client_state={"vitdeep": {"step": step}}, save_latest=False)
    error = checkpoint_engine.write_error
    own = rank_file(path, rank)
    tmp = own.with_name(own.name + ".tmp")
    try:
        if error is None:
            torch.save({"rng": rng_state(), "ema": ema_state}, tmp)
            os.replace(tmp, own)
    except OSError as write_error:
        error = write_error
    failures = _any_rank_failed(error)
    if failures:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        raise TrainingStopped(_save_failed_message(step, failures, out), shared=True)
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != MARKER}
        write_json_atomic(path / MARKER, {**meta, "step": step, "world_size": dist.get_world_size(), "files": files})
    dist.barrier()
    return path


def _save_failed_message(step: int, failures: list[str], out: Path) -> str:
    full = any(os.strerror(errno.ENOSPC).lower() in f.lower() for f in failures)
    what = "no space left on device" if full else "a write failed"
    kept = newest_intact(out)
    intact = f"step {read_marker(kept)['step']} ({kept}) is intact" if kept else "no earlier checkpoint exists"
    return f"{what} while saving step {step} ({'; '.join(failures)}); {intact}"


def prune_checkpoints(out: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints and the best by validation top-1;
    remove the rest and the remains of interrupted saves older than the newest complete one."""
    found = marked(out)
    if not found:
        return
    complete = [path for path, _ in found]
    keep = set(complete[-max(keep_last, 1):])
    scored = [(marker["val_top1"], path) for path, marker in found if marker.get("val_top1") is not None]
    if scored:
        keep.add(max(scored, key=lambda sp: sp[0])[1])
    newest_step = found[-1][1]["step"]
    for path in (Path(out) / CHECKPOINTS).iterdir():
        if not path.is_dir() or path in keep:
            continue
        step = _step_of(path)
        if path in complete or (step is not None and step < newest_step):
            shutil.rmtree(path, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return None


def update_marker(path: Path, **fields: Any) -> None:
    """Add fields to a saved checkpoint's marker (rank 0), e.g. the validation run after the save."""
    marker = read_marker(path)
    write_json_atomic(path / MARKER, {**marker, **fields})


# -- loading -----------------------------------------------------------------------------------


def load_checkpoint(engine: Any, path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load engine state (weights, optimizer) from an intact checkpoint; returns
    (marker, this rank's extra state with `rng` and `ema`)."""
    marker = read_marker(path)
    engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False)
    extra = load_safely(rank_file(path, rank))
    return marker, extra


#: The Adam moments `consolidate` merges like the weights (`part`).
MOMENTS = ("exp_avg", "exp_avg_sq")


def consolidate(path: Path, zero_stage: int, ema: bool = False, part: str | None = None) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a checkpoint directory (every ZeRO stage), read safely.

    ZeRO partitions are merged by DeepSpeed's own `zero_to_fp32` code, fed with files read here.
    The EMA is kept as per-rank partitions with the same layout as the fp32 master weights, and so
    are the Adam moments (`part` "exp_avg" / "exp_avg_sq", ZeRO 1-3): they go through the same
    merge with the partitions swapped in, a copy without casts or sums.
    """
    part = part or ("ema" if ema else "weights")
    if zero_stage == 0:
        if part in MOMENTS:
            raise ValueError("without ZeRO the optimizer state is saved whole, not in partitions")
        module = load_safely(path / "mp_rank_00_model_states.pt")["module"]
        state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
        if part == "ema":
            saved = ema_state(path, 0)
            state.update({name: t.float() for name, t in zip(saved["names"], saved["partitions"])})
        return state
    from deepspeed.utils import zero_to_fp32 as z

    model_states = [_zero_model_state(z, load_safely(f)) for f in z.get_model_state_files(str(path))]
    stage, world_size, states = _zero_optim_states(z, path)
    if part == "ema":
        flat_groups = [ema_state(path, rank)["partitions"] for rank in range(world_size)]
    elif part in MOMENTS:
        flat_groups = [_moment_partitions(state, stage, part) for state in states]
    else:
        flat_groups = [state["single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"] for state in states]
    with contextlib.redirect_stdout(None):
        if stage <= 2:
            merged = z._get_fp32_state_dict_from_zero2_checkpoint(world_size, flat_groups, model_states, False,
                                                                 states[0].get("param_alignment_paddings"))
        else:
            merged = z._get_fp32_state_dict_from_zero3_checkpoint(world_size, flat_groups, model_states, False)
    # frozen parameters have no fp32 master: they come back in the training precision
    return {k: v.float() if v.is_floating_point() else v for k, v in z.to_torch_tensor(merged).items()}


def _moment_partitions(state: dict[str, Any], stage: int, key: str) -> list[torch.Tensor]:
    """One rank's partition of an Adam moment per flat group (the base optimizer's state)."""
    base = state["base_optimizer_state" if stage <= 2 else "optimizer_state_dict"]["state"]
    return [base[group][key] for group in sorted(base)]


def saved_optimizer_step(path: Path, zero_stage: int) -> torch.Tensor | None:
    """The Adam step count a ZeRO checkpoint's optimizer saved (None without ZeRO)."""
    if zero_stage == 0:
        return None
    from deepspeed.utils import zero_to_fp32 as z

    stage, _, states = _zero_optim_states(z, path)
    base = states[0]["base_optimizer_state" if stage <= 2 else "optimizer_state_dict"]["state"]
    return base[min(base)]["step"].clone() if base else None


def read_run_weights(src: str | Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], str, Path]:
    """The weights of a run directory's newest intact checkpoint (or of the `step_*` directory
    named), consolidated on the CPU: (state dict, marker, what was read, the checkpoint's path)."""
    skipped: list[str] = []
    path = find_checkpoint(src, on_skip=lambda p, why: skipped.append(f"{p.name} skipped: {why}"))
    marker = read_marker(path)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # DeepSpeed's chatter
        state_dict = consolidate(path, marker["zero_stage"], ema=ema)
    kind = f"vitdeep checkpoint, step {marker['step']}" + (", EMA" if ema else "") + "".join(f"; {s}" for s in skipped)
    return state_dict, marker, kind, path


def _zero_model_state(z: Any, state: dict[str, Any]) -> Any:
    """What `zero_to_fp32.parse_model_states` extracts from one model-states file."""
    buffer_names = state["buffer_names"]
    return z.zero_model_state(
        buffers={k: v.float() if v.is_floating_point() else v for k, v in state["module"].items() if k in buffer_names},
        param_shapes=state["param_shapes"],
        shared_params=[[k, v] for k, v in state["shared_params"].items()],
        ds_version=state.get("ds_version"),
        frozen_param_shapes=state.get("frozen_param_shapes"),
        frozen_param_fragments=state.get("frozen_param_fragments"),
    )


def _zero_optim_states(z: Any, path: Path) -> tuple[int, int, list[dict[str, Any]]]:
    """(stage, world size, every rank's optimizer state) as `parse_optim_states` reads them (the
    tensors stay on disk until used)."""
    files = z.get_optim_files(str(path))
    states = [load_safely(f, mmap=True)["optimizer_state_dict"] for f in files]
    stage, world_size = int(states[0]["zero_stage"]), states[0]["partition_count"]
    world_size = max(world_size) if isinstance(world_size, list) else world_size
    if world_size != len(files):
        raise DamagedCheckpoint(f"{path} holds {len(files)} optimizer partitions, written by {world_size} ranks")
    return stage, world_size, states


def ema_state(path: Path, rank: int) -> dict[str, Any]:
    """Rank `rank`'s EMA partitions of a checkpoint."""
    extra = load_safely(rank_file(path, rank))
    if extra.get("ema") is None:
        raise UserError(f"{path} holds no EMA (trained with `ema_decay` 0); drop `ema`", params=("ema_decay", "ema"))
    return extra["ema"]
