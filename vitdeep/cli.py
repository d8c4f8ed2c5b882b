"""The `vitdeep` command line: argument parsing, help text and error → exit-code mapping only.

Every command delegates to the library; errors a user can cause (`UserError`) end in one line on
stderr and exit code 2.
"""

from __future__ import annotations

import atexit
import errno
import os
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import NoReturn, Optional

import typer
import typer.core

from vitdeep.ablate.grid import MAX_CELLS
from vitdeep.architecture import ARCHITECTURE_OPTIONS, DEFAULT_IMG_SIZE, DEFAULT_PATCH_SIZE, EVAL_CROP_RATIO
from vitdeep.cli_options import number_option, with_config_options
from vitdeep.cores import passive_openmp_waits
from vitdeep.config import FINETUNE_RECIPE, DataConfig, ModelFields, OptimConfig, RunConfig
from vitdeep.data.options import DEFAULT_QUALITY, MAX_BAD_FRACTION, MAX_MAX_SIZE, MIN_MAX_SIZE, AugmentConfig, ReadPolicy
from vitdeep.planner.cluster import DEFAULT_GPU_MEMORY, DEFAULT_GPU_TFLOPS, DEFAULT_GPUS_PER_NODE, DEFAULT_MFU, MAX_CORES, MAX_DECODE_RATE, Cluster
from vitdeep.errors import OversmoothingStopped, StoppedBySignal, Terminated, TrainingStopped, UserError, as_flags
from vitdeep.fields import MAX_RANKS, MAX_SAMPLES, MAX_STEPS, MAX_WORKERS, above, at_least, clip, range_of

app = typer.Typer(
    name="vitdeep",
    help="Train deep Vision Transformers (DeiT / CaiT, 24-48 blocks) with the remedies for "
    "over-smoothing, on DeepSpeed and WebDataset.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from vitdeep import __version__

        print(f"vitdeep {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version."),
) -> None:
    """Train deep Vision Transformers with the remedies for over-smoothing."""


@app.command("models")
def models_command(
    names: Optional[list[str]] = typer.Argument(None, help="Model names to show (default: all)."),
    img_size: int = number_option(DEFAULT_IMG_SIZE, "--img-size", range_of(ModelFields, "img_size"), "Input resolution at which FLOPs are counted."),
    patch_size: int = number_option(DEFAULT_PATCH_SIZE, "--patch-size", range_of(ModelFields, "patch_size"), "Patch size."),
) -> None:
    """List the model zoo: depth, width, heads, parameters and GFLOPs."""
    from vitdeep.commands.models import print_model_table

    print_model_table(names, img_size=img_size, patch_size=patch_size)


@app.command("recipes")
def recipes_command() -> None:
    """List the bundled recipes: the published results they reproduce, with their top-1."""
    from vitdeep.commands.recipes import print_recipe_table

    print_recipe_table()


#: The data options of every command that reads shards (timeouts and retries of remote reads).
READ_OPTIONS = ("read_timeout", "read_retries")


def _read_policy(options: dict) -> ReadPolicy:
    """The `ReadPolicy` of the read options given (removed from `options`), defaults for the rest."""
    return ReadPolicy(**{name: options.pop(name) for name in READ_OPTIONS if name in options})


#: `analyze` takes train's flags for the options that shape a model (`--model`, `--depth`, the
#: remedies …); what the checkpoint records wins where they are not given.
ANALYZE_OPTIONS = ("model", *ARCHITECTURE_OPTIONS)
ANALYZE_SHOWN_DEFAULTS = {"model": None, "img_size": "the source's", "patch_size": "the source's", "num_classes": "the source's"}


@app.command("analyze", context_settings={"max_content_width": 120})
@with_config_options(overrides=ANALYZE_SHOWN_DEFAULTS, only=(*ANALYZE_OPTIONS, *READ_OPTIONS))
def analyze_command(
    options: dict,
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A vitdeep run / checkpoint / export, or a timm / DeiT / CaiT state dict (then name --model)."),
    data: Optional[str] = typer.Option(None, "--data", help="Shards to read the images from (the val split of a folder with several)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Or a folder of images / an ImageFolder tree."),
    out: Path = typer.Option(..., "--out", help="Output folder: metrics.json, oversmoothing.png, tb/."),
    compare: Optional[list[str]] = typer.Option(
        None, "--compare", help="Overlay another source, [LABEL=]CHECKPOINT or [LABEL=]MODEL (random init, "
        "with the analysed run's image size, patch and classes; its whole architecture when MODEL is its own). Repeatable."
    ),
    ema: bool = typer.Option(False, "--ema", help="Use the EMA weights of vitdeep checkpoints."),
    num_images: int = number_option(1000, "--num-images", at_least(1, MAX_SAMPLES), "Images to average over."),
    batch_size: int = number_option(32, "--batch-size", range_of(OptimConfig, "micro_batch"), "Images per forward pass (each layer is reduced as it runs)."),
    crop_ratio: Optional[float] = number_option(None, "--crop-ratio", range_of(AugmentConfig, "crop_ratio"), f"Centre-crop ratio of the resize (default: the run's own, as it validated; {EVAL_CROP_RATIO} for other sources)."),
    model_option: Optional[list[str]] = typer.Option(
        None, "--model-option", "-O", help="A model option no flag sets, as KEY=VALUE, e.g. -O distilled=true -O patch_head=true. Repeatable."
    ),
    seed: int = number_option(0, "--seed", range_of(RunConfig, "seed"), "Seed of the random init and of the image sample."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device (default: cuda when available, else cpu)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace metrics.json, oversmoothing.png and tb/ when --out holds them."),
) -> None:
    """Per-layer over-smoothing metrics (patch CosSim, attention std, high-frequency energy) of
    one or more models: metrics.json, a PNG and TensorBoard events. The model flags set the
    architecture of a random init or a plain state dict, or override a checkpoint's (e.g. --img-size)."""
    from vitdeep.commands.analyze import parse_model_options, run_analyze
    from vitdeep.engine.signals import stop_at_once

    model = options.pop("model", None)
    reads = _read_policy(options)
    with stop_at_once():
        run_analyze(
            model=model, checkpoint=checkpoint, images=images, data=data, out=out, ema=ema, compare=compare or (),
            num_images=num_images, batch_size=batch_size, options={**options, **parse_model_options(model_option or ())},
            seed=seed, device=device, crop_ratio=crop_ratio, overwrite=overwrite, reads=reads,
        )


@app.command("shards")
def shards_command(
    src: Optional[str] = typer.Argument(
        None, metavar="SRC", help="ImageFolder root: class sub-folders, or train/ val/ … folders of class sub-folders."
    ),
    out: Optional[str] = typer.Argument(None, metavar="OUT", help="Folder for the shards and _info.json."),
    demo: bool = typer.Option(False, "--demo", help="Write the built-in demo set (digits as real PNGs); give only OUT."),
    split: Optional[list[str]] = typer.Option(
        None, "--split", help="Split folder(s) of SRC to write; SRC itself when it holds class folders. Default: all found."
    ),
    shard_size: Optional[str] = typer.Option(
        None, "--shard-size", help="Samples per shard (e.g. 1000) or bytes per shard (256MB, 1GiB). Default 1000, demo 50."
    ),
    seed: int = number_option(0, "--seed", range_of(RunConfig, "seed"), "Seed of the one-off shuffle of the file list."),
    workers: int = number_option(8, "--workers", at_least(1, MAX_WORKERS), "Threads reading image files in parallel."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards of the same split already in OUT."),
    max_size: Optional[int] = number_option(None, "--max-size", at_least(MIN_MAX_SIZE, MAX_MAX_SIZE), "Cap the shorter side at N pixels: larger images are resized and re-encoded as JPEG (as FFCV's max_resolution does); default: every file stored as it came."),
    quality: Optional[int] = number_option(None, "--quality", at_least(1, 100), f"JPEG quality of the images --max-size re-encodes (default {DEFAULT_QUALITY})."),
) -> None:
    """Pack an ImageFolder tree into WebDataset tar shards (KEY.jpg|png|webp + KEY.cls) with _info.json."""
    from vitdeep.commands.shards import run_demo_shards, run_shards
    from vitdeep.data.shards import DEFAULT_SHARD_SIZE, DEMO_SHARD_SIZE

    if demo:
        if src is None or out is not None:
            raise UserError("--demo takes exactly one folder: vitdeep shards --demo OUT")
        if max_size is not None or quality is not None:
            raise UserError("--demo writes the digits as they are: no --max-size or --quality")
        run_demo_shards(src, shard_size=shard_size or DEMO_SHARD_SIZE, overwrite=overwrite)
        return
    if src is None or out is None:
        raise UserError("give SRC and OUT (or --demo OUT): vitdeep shards SRC OUT")
    run_shards(src, out, splits=split, shard_size=shard_size or DEFAULT_SHARD_SIZE, seed=seed, workers=workers,
                 overwrite=overwrite, max_size=max_size, quality=quality)


@app.command("train", context_settings={"max_content_width": 120})
@with_config_options()
def train_command(
    options: dict,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML / JSON file of options, or a bundled recipe's name (`vitdeep recipes`); flags override it."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved run (model, batch arithmetic, schedule, DeepSpeed config) and exit."),
) -> None:
    """Train a model with DeepSpeed: one process, or every rank under deepspeed / torchrun / SLURM."""
    from vitdeep.commands.train import run_training

    run_training(options, config, dry_run)


@app.command("finetune", context_settings={"max_content_width": 120})
@with_config_options(overrides=FINETUNE_RECIPE)
def finetune_command(
    options: dict,
    source: str = typer.Option(..., "--from", help="Weights to start from: a vitdeep checkpoint or export, or a timm / DeiT / CaiT state dict (then name --model)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML / JSON file of options, or a bundled recipe's name (`vitdeep recipes`); flags override it."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved run and exit."),
) -> None:
    """Finetune from a checkpoint, e.g. at 384 or 512 px.

    Takes train's options, with DeiT's finetuning recipe and the source's architecture as
    defaults; position embeddings are resampled to the new grid.
    """
    from vitdeep.commands.train import run_training

    run_training({**options, "init_from": source}, config, dry_run, source=source, command="finetune")


@app.command("plan", context_settings={"max_content_width": 120})
@with_config_options()
def plan_command(
    options: dict,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML / JSON file of options (flags override it)."),
    source: Optional[str] = typer.Option(None, "--from", help="Plan `vitdeep finetune --from SRC`: the source's architecture and DeiT's finetuning recipe."),
    nodes: Optional[int] = number_option(None, "--nodes", range_of(Cluster, "nodes"), "Nodes (default 1; with --measure, this launch's)."),
    gpus_per_node: Optional[int] = number_option(None, "--gpus-per-node", range_of(Cluster, "gpus_per_node"), f"GPUs per node (default {DEFAULT_GPUS_PER_NODE}; with --measure, this launch's ranks)."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help=f"Memory of one GPU, e.g. 80GB (10⁹ bytes) or 79GiB (default {DEFAULT_GPU_MEMORY}; with --measure on a GPU, its own)."),
    gpu_tflops: float = number_option(DEFAULT_GPU_TFLOPS, "--gpu-tflops", range_of(Cluster, "gpu_tflops"), "Peak TFLOP/s of one GPU at the run's precision (default: H100 SXM dense bf16; A100: 312)."),
    mfu: float = number_option(DEFAULT_MFU, "--mfu", range_of(Cluster, "mfu"), "Model FLOPs utilisation: the share of the peak the run achieves."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers to this JSON file."),
    measure: bool = typer.Option(False, "--measure", help="Also run one real training step here at the planned settings and print predicted vs measured memory (under `deepspeed --num_gpus N` for N ranks)."),
    check: bool = typer.Option(False, "--check", help="Exit 1 when the run as asked does not fit (for scripts and CI)."),
    measure_data: bool = typer.Option(False, "--measure-data", help="Measure here the images/s one CPU core decodes and augments for this run (its image size and augmentation, on its --data shards or sample photos); cached per machine and input."),
    decode_rate: Optional[float] = number_option(None, "--decode-rate", above(0, MAX_DECODE_RATE), "Images/s one CPU core decodes and augments, measured elsewhere (e.g. `plan --measure-data` on a compute node). Default: the committed benchmark's, named in the output."),
    cores_per_node: Optional[int] = number_option(None, "--cores-per-node", at_least(1, MAX_CORES), "CPU cores of one node for the input verdict (default: this machine's usable cores)."),
) -> None:
    """Will this run fit, and how long will it take: per-GPU memory (model states, EMA, traced
    activations), verdict, largest micro-batch, the cheapest change that fits, and time. Takes
    train's options; no data needed (ImageNet-1k's size is assumed without --data)."""
    from vitdeep.commands.plan import run_plan
    from vitdeep.commands.train import resolve_run_config

    record = run_plan(resolve_run_config(options, config, source), nodes, gpus_per_node, gpu_memory, gpu_tflops, mfu, json_path,
                      measure, config=config, measure_data=measure_data, decode_rate=decode_rate, cores_per_node=cores_per_node)
    if check and record and not record["fits"]:
        raise typer.Exit(code=1)


@app.command("fit-world")
def fit_world_command(
    out: Path = typer.Argument(..., metavar="OUT", help="The run directory."),
    nodes: int = number_option(..., "--nodes", at_least(1, MAX_RANKS), "Nodes allocated."),
    gpus_per_node: int = number_option(..., "--gpus-per-node", at_least(1, MAX_RANKS), "GPUs (ranks) each node can run."),
) -> None:
    """Print `NODES RANKS_PER_NODE`: the most ranks of an allocation that the run in OUT goes on on
    (its lanes fit them), on as few nodes as hold them, and why on stderr; all of it for a new run.
    The launch/ scripts ask it before they start, e.g. after a requeue onto other nodes."""
    from vitdeep.commands.fit_world import fit_world

    used_nodes, ranks_per_node, why = fit_world(out, nodes, gpus_per_node)
    if why is not None:
        print(why, file=sys.stderr)
    print(used_nodes, ranks_per_node)


@app.command("eval")
@with_config_options(only=READ_OPTIONS)
def eval_command(
    options: dict,
    checkpoint: str = typer.Option(..., "--checkpoint", help="A vitdeep checkpoint (run dir, checkpoints/ or step dir), an export, or a timm / DeiT / CaiT state dict (then name --model)."),
    data: str = typer.Option(..., "--data", help="Shards to evaluate on (each sample exactly once over all ranks)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name, for plain state dicts."),
    img_size: Optional[int] = number_option(None, "--img-size", range_of(ModelFields, "img_size"), "Evaluation resolution (default: the model's; otherwise the position embedding is resampled)."),
    crop_ratio: Optional[float] = number_option(None, "--crop-ratio", range_of(AugmentConfig, "crop_ratio"), f"Centre-crop ratio of the resize (default: the run's own, as it validated; {EVAL_CROP_RATIO} for other sources)."),
    ema: bool = typer.Option(False, "--ema", help="Evaluate the EMA weights."),
    batch_size: int = number_option(128, "--batch-size", range_of(OptimConfig, "micro_batch"), "Images per forward pass per rank."),
    workers: Optional[int] = number_option(None, "--workers", range_of(DataConfig, "workers"), "Data-loader workers per rank (default: 4, or fewer where this process's usable cores, shared by the ranks on the machine, are fewer)."),
    split: str = typer.Option("val", "--split", help="Split to read when --data names a folder with several."),
    num_samples: Optional[int] = number_option(None, "--num-samples", range_of(DataConfig, "num_samples"), "Sample count when the shards carry no _info.json."),
    max_bad_fraction: float = number_option(
        MAX_BAD_FRACTION, "--max-bad-fraction", range_of(DataConfig, "max_bad_fraction"),
        "Fail when more than this fraction of the samples listed is bad or missing (over all ranks).",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", show_default="RUN/eval.json",
        help="JSON file for the results (with per-class accuracy, the sample accounting and the checkpoint evaluated). "
        "Default: in the run's folder, RUN/eval.json (RUN/eval_ema.json with --ema); beside a file SRC, SRC_STEM.eval.json.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out when it exists."),
    reduced_decode: bool = typer.Option(False, "--reduced-decode", help="Decode JPEGs at 1/2-1/8 scale when the shorter side is at least twice the resize (off: numbers comparable with published ones)."),
) -> None:
    """Exact top-1 / top-5 / loss over a sharded set, on one process or many ranks."""
    from vitdeep.commands.eval import run_eval
    from vitdeep.engine.signals import stop_at_once

    reads = _read_policy(options)
    with stop_at_once():
        run_eval(
            checkpoint, data, out=out, model_name=model, img_size=img_size, crop_ratio=crop_ratio, ema=ema,
            batch_size=batch_size, workers=workers, split=split, num_samples=num_samples,
            max_bad_fraction=max_bad_fraction, overwrite=overwrite, reads=reads, reduced_decode=reduced_decode, leave=True,
        )


@app.command("export")
def export_command(
    source: str = typer.Argument(..., metavar="SRC", help="A vitdeep checkpoint (run dir, checkpoints/ or step dir) or export."),
    out: Path = typer.Argument(..., metavar="OUT.safetensors", help="The consolidated state dict to write (a .json with the options is written beside it)."),
    ema: bool = typer.Option(False, "--ema", help="Export the EMA weights."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT.safetensors and OUT.json when they exist."),
) -> None:
    """Write one consolidated state dict (safetensors) that vitdeep and timm load.

    timm: `timm.create_model("vitdeep_<name>", pretrained=True, pretrained_cfg_overlay=dict(file=OUT))`
    after `import vitdeep.models`.
    """
    from vitdeep.commands.export import run_export

    run_export(source, out, ema=ema, dtype=dtype, overwrite=overwrite)


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder: shards/, baseline/, remedies/, summary.json, oversmoothing.png."),
    ranks: int = number_option(2, "--ranks", at_least(1, MAX_RANKS), "DeepSpeed ranks per run (CPU processes without a GPU)."),
    steps: Optional[int] = number_option(None, "--steps", range_of(OptimConfig, "steps"), "Optimizer steps per run instead of the recipe's epochs (a quick look)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out holds under the demo's names when the demo did not write it."),
) -> None:
    """The main job end to end on the built-in digits: shards, two DeepSpeed runs of a 24-block ViT
    (CE only vs the over-smoothing remedies), evaluation, over-smoothing comparison, summary."""
    from vitdeep.commands.demo import run_demo

    run_demo(out, ranks=ranks, extra=["--steps", str(steps)] if steps else [], overwrite=overwrite)


@app.command("ablate", context_settings={"max_content_width": 120})
@with_config_options()
def ablate_command(
    options: dict,
    grid: Optional[str] = typer.Argument(None, metavar="GRID", help="A bundled grid (see --list) or a grid YAML file."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML / JSON file of train options, or a bundled recipe's name, for every cell (over the grid's shared options; flags and the cells' own options override it)."),
    ranks: Optional[int] = number_option(None, "--ranks", at_least(1, MAX_RANKS), "DeepSpeed ranks per cell (default: every GPU, else 2 CPU ranks)."),
    emit: Optional[str] = typer.Option(None, "--emit", help="'slurm': write OUT/ablate.sbatch, a job array of one cell per task, and run nothing."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells and their commands; run nothing."),
    demo: bool = typer.Option(False, "--demo", help="Run the cells on the built-in digits with the demo's recipe (recipes/demo_digits.yaml)."),
    collect: Optional[Path] = typer.Option(None, "--collect", metavar="DIR", help="(Re)build DIR's results.json / .md / .png from the cells that finished."),
    list_grids: bool = typer.Option(False, "--list", help="Print the bundled grids and their cells."),
    max_cells: int = number_option(MAX_CELLS, "--max-cells", at_least(1, MAX_STEPS), "Refuse a grid of more cells than this (counted before any is built)."),
    seeds: int = number_option(1, "--seeds", at_least(1, MAX_STEPS), "Run every cell with this many seeds (the run's --seed and those after it); the table and figure show mean ± std over them."),
) -> None:
    """Run an ablation grid: every cell a vitdeep training run in OUT/cells/<name>/ (same seed,
    budget, data and DeepSpeed config; only the grid's options change), resumable, evaluated and
    analysed, then tabulated in OUT/results.json, results.md and results.png. Train options given
    here, as flags or in --config, apply to every cell."""
    from vitdeep.commands.ablate import run_command

    run_command(grid, options, ranks=ranks, emit=emit, dry_run=dry_run, demo=demo, collect=collect, list_grids=list_grids,
                max_cells=max_cells, seeds=seeds, config=config)


@app.command("train-cells", hidden=True)
def train_cells_command(
    launch: Path = typer.Argument(..., metavar="LAUNCH.json", help="The cells `vitdeep ablate` wrote for this launch."),
) -> None:
    """The ranks' side of `vitdeep ablate` on one machine: train, evaluate and analyse a grid's
    cells one after another in one DeepSpeed launch."""
    from vitdeep.ablate.launch import train_cells

    train_cells(launch)


def _strip_launcher_args(args: list[str]) -> list[str]:
    """Drop the `--local_rank=N` the deepspeed launcher appends; the rank comes from the env."""
    kept, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip_next = True
            continue
        kept.append(arg)
    return kept


#: The most bytes of one error line: a message that names an input never floods the terminal or a log.
MAX_LINE_BYTES = 900


def _line(message: str) -> str:
    """`message` as one line of at most `MAX_LINE_BYTES` (the last defence: messages cap what they
    repeat of the input themselves)."""
    text = " ".join(message.splitlines())  # also \r, \v, \x1c-\x1e, \u2028 …: whatever a reader may take for a line break
    raw = text.encode("utf-8", "replace")
    if len(raw) <= MAX_LINE_BYTES:
        return text
    return raw[: MAX_LINE_BYTES - 40].decode("utf-8", "ignore") + f"… ({len(raw):,} bytes in all)"


def _report(message: str, error: BaseException | None = None) -> None:
    """One line on stderr. With several ranks, rank 0 reports an error they all share (or met
    before the process group formed); any other error is reported by the rank that met it, which
    also leaves it for the others to report instead of "lost contact" (`announce_failure`)."""
    import torch.distributed as dist

    from vitdeep.monitor import global_rank

    rank = global_rank()
    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if rank != 0 and (not grouped or getattr(error, "shared", False)):
        return  # before the group forms, every rank repeats rank 0's checks
    print(_line(f"error{f' (rank {rank})' if grouped and rank else ''}: {message}"), file=sys.stderr)
    if grouped and not getattr(error, "shared", False):
        from vitdeep.engine.deepspeed import announce_failure

        announce_failure(message)


@lru_cache(maxsize=1)
def _command() -> typer.core.TyperGroup:
    """The click command of `app`, built once per process. Calling `app` builds it anew each time
    (about 40 ms from its signatures), a cost every in-process call paid: a test's, an ablate
    launch's cells. Typer's own wrapper adds nothing here, its pretty tracebacks being off."""
    return typer.main.get_command(app)


def run(argv: list[str] | None = None) -> NoReturn:
    """The `vitdeep` program (its console script, `python -m vitdeep`, every rank a launcher
    starts, and the end of a wrapper script): `main(argv)`, then an exit without Python's teardown
    of every module and object.

    That teardown took 1-1.3 s after a command that loaded torch, DeepSpeed and timm, paid again
    by every rank of every launch, and it is where C++ destructors of a finished process group
    could still abort a rank. Everything an exit must do still happens: the exit functions run
    (loggers flushed, loader workers stopped, temporary folders removed), then the streams are
    flushed. A thread that is still working gets Python's ordinary exit, which waits for it."""
    try:
        main(argv)
        code: object = 0
    except SystemExit as done:
        code = done.code
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate() if thread is not threading.main_thread()):
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what SystemExit does with a message
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say there
            pass
    os._exit(code or 0)


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the command line), run the command, and raise `SystemExit` with its
    exit code; `run` is the program around it."""
    args = _strip_launcher_args(sys.argv[1:] if argv is None else argv)
    passive_openmp_waits()
    try:
        code = _command()(args=args, prog_name="vitdeep", standalone_mode=False)
    except typer.TyperException as usage:  # click's usage errors: one line, not click's box
        message = usage.format_message()
        shows_help = type(usage).__name__ == "NoArgsIsHelpError"  # a command given nothing: its help
        print(message if shows_help else _line(f"error: {message} (see --help)"), file=sys.stderr)
        sys.exit(usage.exit_code)
    except typer.Abort:
        sys.exit(130)
    except UserError as error:
        _report(as_flags(error), error)
        sys.exit(2)
    except StoppedBySignal as stopped:
        from vitdeep.engine.signals import EXIT_STOPPED
        from vitdeep.monitor import global_rank

        if global_rank() == 0:
            print(_line(str(stopped)), file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except Terminated as stopped:  # eval, analyze: nothing to keep, so no checkpoint either
        from vitdeep.engine.signals import EXIT_STOPPED

        print(f"error: {stopped}", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except TrainingStopped as error:
        _report(as_flags(error), error)
        sys.exit(1)
    except OversmoothingStopped as error:
        from vitdeep.engine.alarm import EXIT_OVERSMOOTHED

        _report(as_flags(error), error)
        sys.exit(EXIT_OVERSMOOTHED)
    except Exception as error:
        if isinstance(error, OSError) and error.errno == errno.ENAMETOOLONG:  # a path the user gave, wherever it was first used
            print(_line(f"error: a file name is too long for the file system: {clip(str(error.filename), 120)}"), file=sys.stderr)
            sys.exit(2)
        # A lost node / collective timeout (gloo, NCCL, the rendezvous): one line, exit 1.
        from vitdeep.engine.deepspeed import lost_peer_message, lost_peer_reason

        reason = lost_peer_reason(error)
        if reason is None:
            from vitdeep.engine.deepspeed import announce_failure

            announce_failure(f"{type(error).__name__}: {error}".splitlines()[0])
            raise
        print(_line(f"error: {lost_peer_message(reason)}"), file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # as click's standalone mode does
