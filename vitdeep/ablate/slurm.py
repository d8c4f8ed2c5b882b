"""`--emit slurm`: the grid as a Slurm job array, one cell per task, each task a multi-node run
through `launch/slurm.sbatch` (which starts torchrun or the DeepSpeed launcher on every node).

The array takes its resources (`#SBATCH` lines) from `launch/slurm.sbatch`, so the two never
disagree; `sbatch --nodes=4 DIR/ablate.sbatch` overrides them as usual. Every task passes
`--resume auto`, so a requeued or resubmitted task goes on from its cell's newest checkpoint.
Once the array is done, `vitdeep ablate --collect DIR` evaluates, analyses and tabulates the cells.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from vitdeep.ablate.grid import common_options
from vitdeep.ablate.cells import Ablation
from vitdeep.errors import UserError
from vitdeep.launcher import option_flags
from vitdeep.paths import follow_umask

LAUNCH_DIR = Path(__file__).resolve().parent.parent.parent / "launch"
SBATCH_NAME = "ablate.sbatch"
#: `#SBATCH` options of launch/slurm.sbatch that the array sets itself.
OWN_OPTIONS = ("--job-name", "--output", "--array")


def slurm_template() -> Path:
    path = LAUNCH_DIR / "slurm.sbatch"
    if not path.is_file():
        raise UserError(f"--emit slurm needs launch/slurm.sbatch of the vitdeep checkout; not found at {path}")
    return path


def sbatch_script(ablation: Ablation) -> str:
    """The job array's script: one `case` branch per cell, shell-quoted."""
    template = slurm_template()
    resources = [line for line in template.read_text().splitlines()
                 if line.startswith("#SBATCH") and not line.split()[1].startswith(OWN_OPTIONS)]
    out = ablation.out.resolve()
    runs = ablation.runs
    q = shlex.quote
    common = common_options([run.options for run in runs])
    shared = " ".join(q(flag) for flag in option_flags(common))
    branches = []
    for index, run in enumerate(runs):
        own = option_flags({name: value for name, value in run.options.items() if name not in common})
        branches.append(f"    {index}) CELL={q(run.name)}; CELL_ARGS=({' '.join(q(flag) for flag in own)}) ;;")
    return "\n".join([
        "#!/usr/bin/env bash",
        f"# vitdeep ablate {ablation.grid.name}: {len(runs)} cells, one per task of this Slurm job array; each task",
        "# trains its cell on every node of its allocation through launch/slurm.sbatch, with --resume auto",
        "# (a requeued task goes on from the cell's newest checkpoint). Submit it with",
        f"#   sbatch {out / SBATCH_NAME}",
        "# and once every task is done, evaluate, analyse and tabulate the cells with",
        f"#   vitdeep ablate --collect {out}",
        f"#SBATCH --job-name=ablate-{ablation.grid.name}",
        f"#SBATCH --array=0-{len(runs) - 1}",
        *resources,
        f"#SBATCH --output={out}/logs/%x-%A_%a.out",
        "set -euo pipefail",
        "",
        'if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then',
        f'    echo "error: {SBATCH_NAME} is a Slurm job array: submit it with sbatch" >&2',
        "    exit 2",
        "fi",
        'case "$SLURM_ARRAY_TASK_ID" in',
        *branches,
        f'    *) echo "error: no cell for array task $SLURM_ARRAY_TASK_ID (0-{len(runs) - 1})" >&2; exit 2 ;;',
        "esac",
        f"export LAUNCH_DIR={q(str(LAUNCH_DIR))}",
        f"export DATA={q(_absolute(ablation.data))} VAL={q(_absolute(ablation.val))} OUT={q(str(out / 'cells'))}/\"$CELL\"",
        f'echo "{SBATCH_NAME}: array task $SLURM_ARRAY_TASK_ID: cell $CELL -> $OUT"',
        f'exec bash "$LAUNCH_DIR/slurm.sbatch" {shared} ${{CELL_ARGS[@]+"${{CELL_ARGS[@]}}"}} --resume auto',
        "",
    ])


def _absolute(source: str) -> str:
    """A local shard path made absolute (the job may start elsewhere); URLs and pipe: stay."""
    return source if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", source) else os.path.abspath(source)


def write_sbatch(out: Path, script: str) -> Path:
    """Write OUT/ablate.sbatch (and OUT/logs/ for its output); runs nothing."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / SBATCH_NAME
    path.write_text(script)
    follow_umask(path, executable=True)
    return path
