"""Run under the deepspeed launcher: the partitioned EMA is exact under every ZeRO stage.

decay 1 must keep the initial weights, decay 0 must follow the current ones, and leaving
`applied()` must restore the trained weights; compared through the model's outputs. Every ds_config
named on the command line gets its own model and engine in the one process group (one launch).
"""

import json
import os
import sys

import deepspeed
import torch

from vitdeep.engine.deepspeed import build_optimizer, engine_dtype, fill_ds_config, init_distributed, load_ds_config, precision
from vitdeep.engine.ema import PartitionedEma
from vitdeep.models import create_model

init_distributed(timeout_minutes=10)


def check(ds_name: str) -> None:
    torch.manual_seed(0)
    model = create_model("deit_tiny_12", img_size=16, patch_size=4, num_classes=10, embed_dim=64, num_heads=4, depth=4)
    options = {"global_batch": 8, "micro_batch": 4, "clip_grad": 0.0}
    config, _, _ = fill_ds_config(load_ds_config(ds_name), options, frozenset(), 2, sum(p.numel() for p in model.parameters()))
    dtype = engine_dtype(config)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        initial = model.eval()(x)
    model.train()
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, 0.05, None, 1e-2), config=config)
    keep_initial = PartitionedEma(engine, decay=1.0, warmup=False)
    follow = PartitionedEma(engine, decay=0.0, warmup=False)
    for _ in range(3):
        loss = engine(x.to(dtype)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        keep_initial.update()
        follow.update()
    engine.module.eval()
    with torch.no_grad():
        trained = engine(x.to(dtype)).float()
        with keep_initial.applied():
            with_initial = engine(x.to(dtype)).float()
        after_initial = engine(x.to(dtype)).float()  # before `follow` (decay 0) rewrites the weights anyway
        with follow.applied():
            with_current = engine(x.to(dtype)).float()
        after = engine(x.to(dtype)).float()
    tolerance = 0.02 if "bf16" in precision(config) else 1e-5  # bf16 weights or bf16 autocast
    result = {
        "initial": (with_initial - initial).abs().max().item(),
        "trained_moved": (trained - initial).abs().max().item(),
        "current": (with_current - trained).abs().max().item(),
        "restored": max((after_initial - trained).abs().max().item(), (after - trained).abs().max().item()),
        "tolerance": tolerance,
    }
    if os.environ["RANK"] == "0":
        print(f"EMA_CHECK {ds_name} " + json.dumps(result), flush=True)


for name in (arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")):  # the launcher adds --local_rank=N
    check(name)
