"""Output paths, checked before any work starts: a long job must never fail at its end (or half-way
through a save) for a path it could have refused at once, and no command may destroy what it did
not write.

The rules every command that writes follows (README, "Outputs and foreign input"):

- an output is never one of the command's inputs, never inside a folder it reads (a shards
  folder, an image tree, a run's checkpoints) and never a folder holding an input: refused even
  with `--overwrite` (`claim_outputs`);
- a file or folder that exists before the command starts was not written by it in this run, so
  it is replaced only with `--overwrite`. Commands that recognise their own earlier output for
  the same target replace it themselves (a resumed run, reruns of `demo` and `ablate`);
- outputs follow the umask, including files a library creates with a private mode
  (`follow_umask`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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


def claim_outputs(outputs: Sequence[str | Path], inputs: Iterable[str | Path], *, flag: str, overwrite: bool | None) -> None:
    """Refuse the `outputs` a command is about to write (files, or folders it fills as a whole)
    when one is, lies inside or holds one of its `inputs` (files or folders it reads), and, unless
    `overwrite`, when one already exists (`overwrite=None`: the command has no such option).
    Checked together, before anything is written."""
    outputs = [Path(output) for output in outputs]
    sources = [(Path(source), Path(source).resolve()) for source in inputs]
    for output in outputs:
        resolved = output.resolve()
        for source, resolved_source in sources:
            clash = _overlap(output, resolved, source, resolved_source)
            if clash:
                raise UserError(f"{flag} {output} {clash} {source}: write elsewhere")
    if overwrite:
        return
    existing = next((output for output in outputs if os.path.lexists(output)), None)
    if existing is None:
        return
    if overwrite is None:
        raise UserError(f"{flag}: {existing} already exists and this command did not write it: write elsewhere")
    raise UserError(f"{flag}: {existing} already exists and this command did not write it: pass `overwrite` to replace "
                    "it, or write elsewhere", params=("overwrite",))


def data_folders(data: str | os.PathLike | Sequence[str] | None) -> list[Path]:
    """The local folders a shard argument reads (its shards, and the `_info.json` beside them),
    from the argument alone: a folder itself, else the folder of a path or pattern. Remote URLs
    and `pipe:` commands read nothing here that an output could overwrite."""
    if not data:
        return []
    from urllib.parse import urlparse

    from vitdeep.data.info import _split_parts
    from vitdeep.data.samples import is_local

    folders = []
    for part in _split_parts(data):
        if not is_local(part):
            continue  # https://, gs://, pipe:
        path = urlparse(part).path if part.startswith("file:") else part
        if not os.path.lexists(path) and not any(char in path for char in "{*?["):
            continue  # nothing there to overwrite; reading it fails with its own message
        folders.append(Path(path) if os.path.isdir(path) else Path(os.path.dirname(path) or "."))
    return folders


def checkpoint_inputs(source: str | Path | None) -> list[Path]:
    """What reading a checkpoint argument reads: a file itself; a run folder's `checkpoints/`
    (its other files, e.g. `eval.json` or an `analysis/` folder, may be outputs of later commands);
    any other folder as a whole."""
    if source is None:
        return []
    from vitdeep.engine.markers import CHECKPOINTS

    path = Path(source)
    return [path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path]


def follow_umask(path: str | Path, executable: bool = False) -> None:
    """Give a file the mode a plain `open()` would have (0666 less the umask; 0777 for a script):
    some writers (safetensors, `tempfile`) create files readable by their owner only."""
    os.chmod(path, (0o777 if executable else 0o666) & ~_umask())


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (`os.umask` sets it,
    which would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _overlap(output: Path, out: Path, source: Path, src: Path) -> str | None:
    """How `output` (resolved: `out`) collides with the input `source` (resolved: `src`): the same
    file, through links too; inside it; holding it; or None."""
    if out == src:
        return "is the input"
    if out.is_relative_to(src):
        return "lies inside the input folder"
    if src.is_relative_to(out):
        return "holds the input"
    try:
        same = output.exists() and source.exists() and os.path.samefile(output, source)
    except OSError:
        same = False
    return "is the input" if same else None


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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to a temporary name in the same folder, then rename it into place
    (atomic on POSIX): a reader, or a run killed mid-write, sees the old file or the new one,
    never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
