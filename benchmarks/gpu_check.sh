#!/usr/bin/env bash
# vitdeep's prepared GPU check: `make gpu-check`, or `bash benchmarks/gpu_check.sh [--cpu-smoke] [--work DIR] [--out DIR]`.
#
# On one CUDA GPU: ≤ 5 minutes; trains deit_small_24 under zero2_bf16, zero2_fp16 (+ an injected
# NaN), zero3_bf16 and zero3_offload, finetunes at 384 px, evaluates, exports, and runs the CUDA
# benchmark rows; writes benchmarks/results/gpu-<card>.json and .md; exits non-zero on any failure.
# The stages, the checks and the time budget: benchmarks/gpu_check.py.
# --cpu-smoke: the CPU-safe subset at tiny shapes on 2 CPU ranks (run by `make test`).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
# This checkout's vitdeep, whatever else the environment has installed.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ " $* " == *" --cpu-smoke "* ]]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}"
fi
exec "$python" benchmarks/gpu_check.py "$@"
