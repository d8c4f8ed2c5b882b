"""What every benchmark shares: the machine and its shapes, interleaved timing, peak memory, rows.

Each number is a ratio against a baseline measured in the same process on the same machine:
the cases of one comparison are warmed up, then timed in turns (the order rotates each round,
so drifting machine load hits all of them alike) and each is summarised by its median.

On a CUDA machine the benchmarks use the paper's shapes (224 px, batch 64, bf16); elsewhere
small shapes that run in seconds on a CPU core. On CPU every benchmark runs with one intra-op
thread (`--threads` to change): on a shared machine two threads that wait for each other are
at the mercy of the other jobs (a step measured 120 ms one minute and 6.6 s the next), while one
thread gives stable numbers, and ratios do not depend on the thread count.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# -- the machine and its shapes -----------------------------------------------------------------


def on_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda") if on_cuda() else torch.device("cpu")


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else platform.machine()


def machine() -> dict:
    """What ran the benchmarks, without the host name: the GPU, or the CPU model and core count."""
    cores = os.cpu_count() or 1
    info = {"cpu": cpu_model(), "cores": cores, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if on_cuda():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["name"] = f"{info['gpu']} ×{info['gpus']}" if info["gpus"] > 1 else info["gpu"]
    else:
        info["name"] = f"{info['cpu']}, {cores} cores (CPU only)"
    info["slug"] = re.sub(r"[^a-z0-9]+", "-", info["name"].lower().replace("(r)", "").replace("(tm)", "")).strip("-")
    return info


#: Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), by name part.
GPU_BF16_PEAK_TFLOPS = {"H200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "H100 PCIe": 756, "H100 NVL": 835, "H100": 756,
                        "A100": 312, "L40S": 362, "L40": 181, "L4": 121, "A10G": 70, "A10": 125, "RTX 4090": 165, "RTX 3090": 71}

#: Published training throughput to compare row 1 with on a GPU.
PUBLISHED_ANCHORS = "DeiT-B/16 trains at ≈390 img/s on an RTX 3090 with AMP (timm's benchmark), ≈450 img/s per A100 in fp16 (DeiT)"


def datasheet_peak() -> float | None:
    """The GPU's dense bf16 datasheet peak in FLOP/s, when its name is known."""
    if not on_cuda():
        return None
    name = torch.cuda.get_device_name(0)
    for part, tflops in GPU_BF16_PEAK_TFLOPS.items():
        if part in name:
            return tflops * 1e12
    return None


def configure_threads(threads: int | None = None) -> int:
    """One intra-op thread on CPU unless told otherwise (see the module docstring)."""
    if not on_cuda():
        torch.set_num_threads(threads or int(os.environ.get("VITDEEP_BENCH_THREADS", "1")))
    elif threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@dataclass(frozen=True)
class Shapes:
    """Sizes for one machine. CPU: small and fp32 (bf16 where a row is about bf16); CUDA: the paper's."""

    device: str
    #: rows 1, 2, 4 and 8 (8 with its own model, below): the model, image size, batch and compute
    #: dtype (autocast on CUDA)
    model: str
    img_size: int
    batch: int
    dtype: torch.dtype
    num_classes: int
    #: row 1: image size → batch (vitdeep against timm's twin at each size)
    speed_batches: dict[int, int]
    #: row 3: one attention module (width, heads) and a batch per token count
    attn_dim: int
    attn_heads: int
    attn_batch: dict[int, int]
    #: rows 5 and 6: the depth series (width of `depth_model`)
    depth_model: str
    depth_img_size: int
    depth_batch: int
    depths: tuple[int, ...]
    #: row 6: the 2-rank ZeRO count (CPU ranks) and its model
    zero_model: str
    #: timing: warm-up calls and timed rounds
    warmup: int
    reps: int
    #: row 8: the model (compile time grows with depth: on CUDA a 12-block one keeps `make
    #: gpu-check` in its 5 minutes) and the torch.compile backend (the smoke traces with "eager")
    compile_model: str
    compile_backend: str = "inductor"

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32


def shapes(quick: bool = False, smoke: bool = False) -> Shapes:
    """The shapes of this machine; `quick` shortens the timing (CUDA: enough rounds to still
    give a ratio); `smoke` is tiny shapes on the CPU that only check the code runs
    (`benchmarks/gpu_check.sh --cpu-smoke`)."""
    if smoke:
        return Shapes(
            device="cpu", model="deit_tiny_12", img_size=32, batch=4, dtype=torch.float32, num_classes=10,
            speed_batches={32: 4}, attn_dim=64, attn_heads=2, attn_batch={17: 2, 65: 1},
            depth_model="deit_tiny_12", depth_img_size=32, depth_batch=4, depths=(2, 4),
            zero_model="deit_tiny_12", warmup=1, reps=2, compile_model="deit_tiny_12", compile_backend="eager",
        )
    if on_cuda():
        s = Shapes(
            device="cuda", model="deit_base_24", img_size=224, batch=64, dtype=torch.bfloat16, num_classes=1000,
            speed_batches={224: 64, 384: 32}, attn_dim=768, attn_heads=12, attn_batch={577: 16, 1025: 8},
            depth_model="deit_small_12", depth_img_size=224, depth_batch=64, depths=(12, 24, 48),
            zero_model="deit_base_12", warmup=5, reps=20, compile_model="deit_base_12",
        )
    else:
        s = Shapes(
            device="cpu", model="deit_small_12", img_size=64, batch=16, dtype=torch.float32, num_classes=100,
            speed_batches={64: 16}, attn_dim=384, attn_heads=6, attn_batch={197: 4, 577: 1},
            depth_model="deit_tiny_12", depth_img_size=64, depth_batch=16, depths=(12, 24, 48),
            zero_model="deit_small_12", warmup=2, reps=9, compile_model="deit_small_12",
        )
    if quick:
        s = replace(s, warmup=3, reps=8) if s.device == "cuda" else replace(s, warmup=1, reps=3)
    return s


def asdict_shallow(obj) -> dict:
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}


def describe(s: Shapes, img_size: int | None = None, batch: int | None = None) -> str:
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[s.dtype]
    return f"{img_size or s.img_size} px, batch {batch or s.batch}, {dtype}"


# -- timing ---------------------------------------------------------------------------------------


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Seconds per call: the median of the timed rounds, and every sample."""

    median: float
    samples: list[float]

    @property
    def spread(self) -> float:
        """Inter-quartile range over the median (a noise gauge)."""
        if len(self.samples) < 4:
            return 0.0
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / self.median


def time_interleaved(cases: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, Timing]:
    """Warm each case up, then time one call of each per round, rotating the order every round."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_ in range(reps):
            order = names[round_ % len(names):] + names[: round_ % len(names)]
            for name in order:
                sync()
                start = time.perf_counter()
                cases[name]()
                sync()
                samples[name].append(time.perf_counter() - start)
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing(statistics.median(values), values) for name, values in samples.items()}


# -- memory ---------------------------------------------------------------------------------------


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated by `fn` above what was live when it started, on the
    benchmark's device (`vitdeep.planner.measure.peak_above_start`: on a CPU, tensor storage as the
    profiler's allocation events add up; oneDNN scratch space and the Python heap are not counted)."""
    from vitdeep.planner.measure import peak_above_start

    return peak_above_start(fn, torch.device("cuda" if on_cuda() else "cpu"))


def storages(tensors: Iterable[torch.Tensor | None]) -> dict[tuple[int, str], int]:
    """The distinct storages behind `tensors` (None and meta tensors skipped): (address, device) → bytes."""
    out = {}
    for t in tensors:
        if torch.is_tensor(t) and t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.nbytes():
                out[(storage.data_ptr(), t.device.type)] = storage.nbytes()
    return out


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    return sum(storages(tensors).values())


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes held between steps: parameters, gradients and the optimizer's state."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return tensor_bytes(tensors)


def mb(nbytes: float) -> float:
    return nbytes / 2**20


# -- training steps -------------------------------------------------------------------------------


def batch_for(s: Shapes, img_size: int | None = None, batch: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img_size, batch = img_size or s.img_size, batch or s.batch
    x = torch.randn(batch, 3, img_size, img_size, generator=g)
    y = torch.randint(0, s.num_classes, (batch,), generator=g)
    return x.to(s.device), y.to(s.device)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The same optimizer for every side of a comparison: fused, as vitdeep's own."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)


def autocast(s: Shapes):
    return torch.autocast(device_type=s.device, dtype=s.dtype, enabled=s.autocast)


def train_step(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor], s: Shapes,
               optimizer: torch.optim.Optimizer | None = None) -> Callable[[], None]:
    """One training step: forward (autocast where the shapes say so), loss, backward, AdamW."""
    optimizer = optimizer or adamw(model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(s):
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


# -- rows -----------------------------------------------------------------------------------------

GOAL_TEXT = {">=": "≥", "<=": "≤"}


@dataclass
class Row:
    """One comparison: the baseline's and vitdeep's numbers and `ratio = ours / baseline`.

    `name` says what is compared ("ours vs baseline"); the tables print the two numbers under it.

    `goal` is (">=" or "<=", threshold) on the ratio, or None where the row only reports. `band`
    is the inter-quartile range of the ratio over the timed rounds (each round times both sides
    back to back): a goal missed by less than that is reported as "within noise", not as met.
    """

    group: str
    name: str
    baseline_label: str
    baseline: float
    ours_label: str
    ours: float
    unit: str
    goal: tuple[str, float] | None = None
    note: str = ""
    band: tuple[float, float] | None = None
    extra: dict = field(default_factory=dict)
    ratio: float = field(init=False)
    met: bool | None = field(init=False)
    status: str = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.ours / self.baseline if self.baseline else float("nan")
        if self.goal is None:
            self.met, self.status = None, ""
            return
        op, threshold = self.goal
        self.met = bool(self.ratio >= threshold) if op == ">=" else bool(self.ratio <= threshold)
        if self.met:
            self.status = "met"
        elif self.band is not None and self.band[0] <= threshold <= self.band[1]:
            self.status = "within noise"
        else:
            self.status = "NOT met"

    @property
    def goal_text(self) -> str:
        return f"{GOAL_TEXT[self.goal[0]]} {self.goal[1]:.2f}" if self.goal else "—"

    @property
    def ratio_text(self) -> str:
        if self.band is None:
            return f"{self.ratio:.3f}"
        return f"{self.ratio:.3f} ({self.band[0]:.2f}–{self.band[1]:.2f})"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["goal"] = self.goal_text if self.goal else None
        return d


def quartile_band(ratios: list[float]) -> tuple[float, float]:
    """First and third quartile of per-round ratios (min and max when there are fewer than 4)."""
    if len(ratios) < 4:
        return min(ratios), max(ratios)
    q = statistics.quantiles(ratios, n=4)
    return q[0], q[2]


def ratio_band(baseline: Timing, ours: Timing, higher_is_better: bool) -> tuple[float, float]:
    """IQR of the per-round ratio ours/baseline of a rate (higher_is_better: baseline_t / ours_t)
    or of a time (ours_t / baseline_t)."""
    pairs = zip(baseline.samples, ours.samples)
    return quartile_band([b / o if higher_is_better else o / b for b, o in pairs])


def fmt(value: float, unit: str) -> str:
    if unit in ("img/s",):
        return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    if unit == "ms":
        return f"{value:,.2f} ms" if value < 10 else f"{value:,.1f} ms"
    if unit == "MB":
        return f"{value:,.1f} MB" if value < 100 else f"{value:,.0f} MB"
    if unit == "GFLOP/s":
        return f"{value:,.1f} GFLOP/s" if value < 1000 else f"{value / 1000:,.1f} TFLOP/s"
    return f"{value:,.3g} {unit}"


def console():
    """A console wide enough for the table (rich would fold it at 80 or 120 columns)."""
    from rich.console import Console

    from vitdeep.monitor import is_main_process

    return Console(width=max(Console().width, 160), quiet=not is_main_process())


def print_rows(rows: list[Row], title: str, out=None) -> None:
    from rich.table import Table

    out = out or console()
    table = Table(title=title)
    for column, justify in (("#", "left"), ("measurement", "left"), ("baseline", "right"), ("vitdeep", "right"),
                            ("ratio (IQR)", "right"), ("goal", "right"), ("", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    group = None
    for row in rows:
        if group is not None and row.group != group:
            table.add_section()
        label = row.group.split()[0] if row.group != group else ""
        group = row.group
        status = {"met": "[green]met", "within noise": "[yellow]within noise", "NOT met": "[red]NOT met"}.get(row.status, "")
        table.add_row(label, row.name, fmt(row.baseline, row.unit), fmt(row.ours, row.unit), row.ratio_text, row.goal_text, status)
    out.print(table)
    for row in rows:
        if row.note:
            out.print(f"  [dim]{row.group.split()[0]} {row.name}: {row.note}", overflow="fold")


def standalone(run: Callable[..., list[Row]], title: str) -> None:
    """`python benchmarks/<group>.py [--quick] [--threads N]`: run one group and print its rows."""
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--quick", action="store_true", help="fewer timed rounds (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads on CPU (default 1)")
    args = parser.parse_args()
    configure_threads(args.threads)
    start = time.perf_counter()
    rows = run(shapes(args.quick))
    print_rows(rows, f"{title} — {machine()['name']} ({time.perf_counter() - start:.0f} s)")
