"""Run under the deepspeed launcher: `vitdeep plan --measure` (its library path, `run_plan`) for
one model under several ds-configs in one launch, writing OUT/<ds_config>.json for each — what
`--json` writes, prediction and measurement side by side.

    deepspeed --num_gpus 2 tests/scripts/plan_measure.py MODEL IMG_SIZE MICRO_BATCH OUT DS_CONFIG...
"""

import sys
from pathlib import Path

from vitdeep.config import resolve_config
from vitdeep.planner.cluster import DEFAULT_GPU_TFLOPS, DEFAULT_MFU
from vitdeep.commands.plan import run_plan

model, img_size, micro_batch, out, *ds_configs = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
for ds_config in ds_configs:
    options = {"model": model, "img_size": int(img_size), "num_classes": 100, "micro_batch": int(micro_batch), "ds_config": ds_config}
    run_plan(resolve_config(options), None, None, None, DEFAULT_GPU_TFLOPS, DEFAULT_MFU, Path(out) / f"{ds_config}.json", measure=True)
