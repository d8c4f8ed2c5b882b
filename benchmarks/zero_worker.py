"""Run under `deepspeed --num_gpus 2` by `memory.py`: what each rank holds under ZeRO stages 0-3.

For each stage, a fresh model goes through `deepspeed.initialize` with vitdeep's bundled bf16
config (stage 0: the ZeRO-1 config with ZeRO off, i.e. plain data parallelism), takes one
training step, and the tensors the rank then holds are sorted by storage into:

- parameters: the model's bf16 weights on this rank (ZeRO-3: its partition, `ds_tensor`);
- optimizer state: what the inner AdamW holds — its fp32 master weights and both moments;
- gradients and buffers: every other tensor the DeepSpeed optimizer wrapper keeps (gradient
  partitions, flat gradient copies, reduction buckets), plus `.grad` of the parameters.

Storages are counted once, at their full size (a view of a flat buffer counts the buffer), on
the CPU ranks this runs on; the same objects are allocated on a GPU. Rank 0 prints one line
`ZERO_MEMORY {json}` with every rank's numbers.

    deepspeed --num_gpus 2 --master_port PORT benchmarks/zero_worker.py MODEL [BUCKET_SIZE]

BUCKET_SIZE replaces the configs' reduce / allgather bucket sizes (elements), to price them.
"""

from __future__ import annotations

import json
import resource
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import peak_memory, storages
from torch import nn

from vitdeep.engine.deepspeed import build_optimizer, fill_ds_config, init_distributed, initialize, load_ds_config
from vitdeep.models import count_parameters, create_model

IMG_SIZE, MICRO_BATCH, CLASSES = 32, 2, 100
#: ZeRO stage → the bundled bf16 config it runs with (stage 0: the ZeRO-1 config with ZeRO off).
ZERO_CONFIGS = {0: "zero1_bf16", 1: "zero1_bf16", 2: "zero2_bf16", 3: "zero3_bf16"}


def config_for(stage: int, world_size: int, num_parameters: int, bucket: int | None = None) -> dict:
    config = load_ds_config(ZERO_CONFIGS[stage])  # a fresh dict from the file
    if stage == 0:
        config["zero_optimization"] = {"stage": 0}
    elif bucket:
        zero = config["zero_optimization"]
        zero.update({k: bucket for k in ("reduce_bucket_size", "allgather_bucket_size") if k in zero})
    options = {"global_batch": MICRO_BATCH * world_size, "micro_batch": MICRO_BATCH, "clip_grad": 1.0}
    return fill_ds_config(config, options, frozenset(), world_size, num_parameters)[0]


def walk(obj, seen: set[int], depth: int = 0):
    """Tensors reachable from a DeepSpeed optimizer through containers and DeepSpeed objects
    (not through modules: the model's parameters are counted on their own)."""
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        yield obj
        if isinstance(obj, nn.Parameter) and obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from walk(value, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from walk(value, seen, depth + 1)
    elif isinstance(obj, nn.Module):
        return
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from walk(value, seen, depth + 1)


def measure(stage: int, model_name: str, world_size: int, bucket: int | None = None) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, img_size=IMG_SIZE, num_classes=CLASSES)
    n_params = count_parameters(model)
    # vitdeep's AdamW (weight-decay groups; not fused: the ranks run on the CPU)
    engine = initialize(model, build_optimizer(model, 0.05, None, 1e-4), config_for(stage, world_size, n_params, bucket))
    x = torch.randn(MICRO_BATCH, 3, IMG_SIZE, IMG_SIZE, dtype=torch.bfloat16)
    y = torch.randint(0, CLASSES, (MICRO_BATCH,))

    def step() -> None:
        engine.backward(F.cross_entropy(engine(x).float(), y))
        engine.step()

    step()
    step_peak = peak_memory(step)

    params = storages(getattr(p, "ds_tensor", p) for p in engine.module.parameters())
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    # ZeRO-3 hands its fp32 partitions to the inner AdamW only during `step`: take them from the state's keys too
    masters = [p for group in inner.param_groups for p in group["params"]] + [p for p in inner.state if torch.is_tensor(p)]
    moments = [v for state in inner.state.values() for v in state.values()]
    optim = {k: v for k, v in storages(masters + moments).items() if k not in params}
    held = list(walk(engine.optimizer, set())) + [p.grad for p in engine.module.parameters()] + [p.grad for p in masters]
    other = {k: v for k, v in storages(held).items() if k not in params and k not in optim}
    result = {
        "stage": stage, "optimizer": type(engine.optimizer).__name__, "parameters": n_params,
        "param_bytes": sum(params.values()), "optimizer_bytes": sum(optim.values()), "grad_buffer_bytes": sum(other.values()),
        "largest_buffer_bytes": max(other.values(), default=0), "step_peak_bytes": step_peak,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if hasattr(engine, "destroy"):
        engine.destroy()
    return result


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    model_name = args[0] if args else "deit_small_12"
    bucket = int(float(args[1])) if len(args) > 1 else None  # override the configs' bucket sizes
    torch.set_num_threads(1)
    init_distributed(timeout_minutes=10)
    world_size = dist.get_world_size()
    results = []
    for stage in ZERO_CONFIGS:
        mine = measure(stage, model_name, world_size, bucket)
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
        results.append(everyone)
        dist.barrier()
    if dist.get_rank() == 0:
        print("ZERO_MEMORY " + json.dumps({"model": model_name, "world_size": world_size, "bucket": bucket, "stages": results}),
              flush=True)


if __name__ == "__main__":
    main()
