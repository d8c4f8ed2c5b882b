"""Run under the deepspeed launcher: `vitdeep plan --measure` (its library path, `run_plan`) for
several models, each under several ds-configs, in one launch, writing OUT/<model>-<ds_config>.json
for each — what `--json` writes, prediction and measurement side by side.

    deepspeed --num_gpus 2 tests/scripts/plan_measure.py IMG_SIZE MICRO_BATCH OUT MODEL=DS_CONFIG[,DS_CONFIG...]...
"""

import sys
from pathlib import Path

from vitdeep.commands.plan import run_plan
from vitdeep.config import resolve_config
from vitdeep.planner.cluster import DEFAULT_GPU_TFLOPS, DEFAULT_MFU

img_size, micro_batch, out, *runs = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
for spec in runs:
    model, _, ds_configs = spec.partition("=")
    for ds_config in ds_configs.split(","):
        options = {"model": model, "img_size": int(img_size), "num_classes": 100, "micro_batch": int(micro_batch), "ds_config": ds_config}
        run_plan(resolve_config(options), None, None, None, DEFAULT_GPU_TFLOPS, DEFAULT_MFU, Path(out) / f"{model}-{ds_config}.json",
                 measure=True)
