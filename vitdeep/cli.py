"""The `vitdeep` command line: argument parsing, help text and error → exit-code mapping only.

Every command delegates to the library; errors a user can cause (`UserError`) end in one line on
stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from vitdeep.errors import UserError

app = typer.Typer(
    name="vitdeep",
    help="Train deep Vision Transformers (DeiT / CaiT, 24-48 blocks) with the remedies for "
    "over-smoothing, on DeepSpeed and WebDataset.",
    no_args_is_help=True,
    add_completion=False,
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
    img_size: int = typer.Option(224, help="Input resolution at which FLOPs are counted."),
    patch_size: int = typer.Option(16, help="Patch size."),
) -> None:
    """List the model zoo: depth, width, heads, parameters and GFLOPs."""
    from vitdeep.models.registry import print_model_table

    print_model_table(names, img_size=img_size, patch_size=patch_size)


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
    seed: int = typer.Option(0, help="Seed of the one-off shuffle of the file list."),
    workers: int = typer.Option(8, help="Threads reading image files in parallel."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards of the same split already in OUT."),
) -> None:
    """Pack an ImageFolder tree into WebDataset tar shards (KEY.jpg|png|webp + KEY.cls) with _info.json."""
    from vitdeep.data.shards import DEFAULT_SHARD_SIZE, DEMO_SHARD_SIZE, write_demo_shards, write_shards

    if demo:
        if src is None or out is not None:
            raise UserError("--demo takes exactly one folder: vitdeep shards --demo OUT")
        write_demo_shards(src, shard_size=shard_size or DEMO_SHARD_SIZE, overwrite=overwrite)
        return
    if src is None or out is None:
        raise UserError("give SRC and OUT (or --demo OUT): vitdeep shards SRC OUT")
    write_shards(src, out, splits=split, shard_size=shard_size or DEFAULT_SHARD_SIZE, seed=seed, workers=workers,
                 overwrite=overwrite)


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


def _report_user_error(error: UserError) -> None:
    """One line on stderr; ranks other than 0 stay quiet while they only repeat rank 0's checks."""
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"error: {error}", file=sys.stderr)
    elif dist.is_available() and dist.is_initialized():
        print(f"error (rank {rank}): {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (also `python -m vitdeep`)."""
    args = _strip_launcher_args(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="vitdeep")
    except UserError as error:
        _report_user_error(error)
        sys.exit(2)
