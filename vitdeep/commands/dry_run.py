"""`vitdeep train --dry-run` / `finetune --dry-run`: the resolved run, the DeepSpeed config it would
use and its memory per rank, printed; nothing is written and no process group starts."""

from __future__ import annotations

import json

from rich.table import Table

from vitdeep.commands.plan import memory_table
from vitdeep.engine.run_plan import RunPlan
from vitdeep.planner.memory import gb, this_machine_memory
from vitdeep.monitor import make_console


def print_dry_run(plan: RunPlan, command: str = "train") -> None:
    table = Table(title=f"vitdeep {command} --dry-run", show_header=False)
    for key, value in plan.summary().items():
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    console = make_console()
    console.print(table)
    console.print("DeepSpeed config:")
    console.print_json(json.dumps(plan.ds_config))
    estimate, gpu_memory = this_machine_memory(plan)
    console.print(memory_table(estimate, f"memory per rank ({estimate.zero.label}, {plan.world_size} rank(s), `vitdeep plan` for other clusters)"))
    if gpu_memory is not None:
        verdict = "fits" if estimate.total <= gpu_memory else "does not fit"
        console.print(f"{verdict}: {gb(estimate.total):.1f} GB of this GPU's {gb(gpu_memory):.1f} GB")
