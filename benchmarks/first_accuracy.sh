#!/usr/bin/env bash
# From `git clone` to the first printed accuracy of the README's "your own images in three
# commands", on scikit-learn's digits written as an image folder (32 px PNG, 1,500 train / 297 val):
# clone this repository, `make setup`, then `vitdeep shards`, `vitdeep train --config demo_digits`,
# `vitdeep eval`. Prints the time of each step.
#
#     bash benchmarks/first_accuracy.sh [WORK_DIR]        (needs scikit-learn in the python3 on PATH)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work"
python3 - "$work/src" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
digits = load_digits()
for i, (image, label) in enumerate(zip(digits.images, digits.target)):
    folder = Path(sys.argv[1]) / ("train" if i < 1500 else "val") / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
PY
now() { date +%s.%N; }
t0=$(now)
git clone -q "$repo" "$work/vitdeep"
cd "$work/vitdeep"
make setup > "$work/setup.log" 2>&1
t1=$(now)
.venv/bin/vitdeep shards "$work/src" "$work/shards" > "$work/shards.log" 2>&1
t2=$(now)
.venv/bin/vitdeep train --config demo_digits --data "$work/shards" --val "$work/shards" --out "$work/runs/mine" "${@:2}" 2>&1 |
  while IFS= read -r line; do printf '%s %s\n' "$(now)" "$line"; done > "$work/train.log"
t3=$(now)
.venv/bin/vitdeep eval --checkpoint "$work/runs/mine" --data "$work/shards" > "$work/eval.log" 2>&1
t4=$(now)
first=$(grep -m1 "): top1" "$work/train.log" | cut -d' ' -f1)
python3 -c "print(f'clone + make setup {$t1-$t0:.0f} s, shards {$t2-$t1:.0f} s, train {$t3-$t2:.0f} s, eval {$t4-$t3:.0f} s; '
                  f'first accuracy printed {$first-$t0:.0f} s after git clone, the three commands done {$t4-$t0:.0f} s after it')"
grep -m1 "): top1" "$work/train.log" | cut -d' ' -f2-
grep -A4 "top-1 %" "$work/eval.log" | tail -2
