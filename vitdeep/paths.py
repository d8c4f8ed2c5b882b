"""Checks that an output path can be written, made before any work starts, so that a long job
never fails at its end (or half-way through a save) for a path it could have refused at once."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vitdeep.errors import UserError


def check_output_dir(path: str | Path, flag: str) -> None:
    """`path` is, or can be created as, a folder we may write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    _check_writable(path, flag)


def check_output_file(path: str | Path, flag: str, example: str) -> None:
    """`path` names a file we may write (its folder is created when missing)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file name, e.g. {path / example}")
    _check_writable(path.parent, flag, shown=path)


def _check_writable(folder: Path, flag: str, shown: Path | None = None) -> None:
    """The nearest existing ancestor of `folder` must be a folder in which a file can be created
    (tried for real: permission bits say nothing to root, nor about a read-only mount)."""
    shown = shown or folder
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {shown}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".vitdeep-write-check-"):
            pass
    except OSError as error:
        raise UserError(f"{flag} {shown}: cannot write in {existing} ({os.strerror(error.errno) if error.errno else error})") from None
