"""The README's `vitdeep plan` table: DeiT-B/24 and CaiT-M48 on 2 nodes × 8 GPUs of 80 GB.

For each model and resolution, the planner's largest micro-batch at the default global batch
(1024) with the default ds-config (ZeRO-2 bf16), without activation checkpointing and, where that
needs gradient accumulation, with it; GB per GPU at that micro-batch; hours for 300 and 400
epochs of ImageNet-1k at 40 % MFU of an H100's dense bf16 peak; the images per second each node's
data pipeline must deliver, and the CPU cores that takes at the committed decode rate of
`benchmarks/data_throughput.py`. No GPU or data needed:

    .venv/bin/python benchmarks/plan_table.py
"""

from __future__ import annotations

from vitdeep.config import resolve_config
from vitdeep.commands.plan import plan_for_cluster
from vitdeep.planner.cluster import Cluster
from vitdeep.planner.memory import MemoryModel, largest_fitting, micro_batch_options
from vitdeep.planner.timing import estimate_time

ROWS = [("deit_base_24", 224), ("deit_base_24", 384), ("deit_base_24", 512), ("cait_m48", 224), ("cait_m48", 448)]
CLUSTER = Cluster(nodes=2, gpus_per_node=8, mfu=0.4)


def rows() -> list[str]:
    lines = []
    for name, img_size in ROWS:
        plan, _ = plan_for_cluster(resolve_config({"model": name, "img_size": img_size}), CLUSTER.world_size)
        model = MemoryModel(plan, CLUSTER)
        sizes = micro_batch_options(plan, CLUSTER.world_size)
        for checkpointing in (False, True):
            fit = largest_fitting(model, plan.ds_config, checkpointing, sizes, CLUSTER.gpu_memory)
            time = estimate_time(plan, CLUSTER, checkpointing)
            micro = f"{fit.micro_batch} (accumulation {plan.batch.global_batch // (fit.micro_batch * CLUSTER.world_size)})" if fit else "none fits"
            memory = f"{fit.total / 1e9:.1f}" if fit else "—"
            cores = f"{time.images_per_second_node:,.0f} ({time.cores_per_node:.0f})" if time.decode else f"{time.images_per_second_node:,.0f}"
            lines.append(f"| {name} | {img_size} | {fit.zero.label if fit else plan.zero_stage} | {'yes' if checkpointing else 'no'} | "
                         f"{micro} | {memory} | {time.hours_for(300):.1f} | {time.hours_for(400):.1f} | {cores} |")
            if fit and fit.micro_batch == sizes[-1]:
                break  # no accumulation without checkpointing: checkpointing would only cost time
    return lines


if __name__ == "__main__":
    print("| model | px | ZeRO | checkpointing | largest micro-batch | GB per GPU | hours, 300 epochs | hours, 400 epochs "
          "| images/s per node (CPU cores to decode them) |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows()))
