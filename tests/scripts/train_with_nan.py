"""`vitdeep train` with a non-finite loss injected on rank 1 (run under a launcher).

Usage: train_with_nan.py BAD ARGS... where BAD is "k" (micro-batch k only) or "k-" (k onwards).
Only the objective is wrapped; the engine, data and collectives are the real ones.
"""

import os
import sys

import torch

import vitdeep.engine.loop as loop
from vitdeep.cli import run

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
bad, args = args[0], args[1:]
first = int(bad.rstrip("-"))
is_bad = (lambda i: i >= first) if bad.endswith("-") else (lambda i: i == first)


class InjectedObjective(loop.Objective):
    calls = 0

    def __call__(self, *a, **k):
        total, terms = super().__call__(*a, **k)
        index, InjectedObjective.calls = InjectedObjective.calls, InjectedObjective.calls + 1
        if os.environ.get("RANK") == "1" and is_bad(index):
            total = total * torch.tensor(float("nan"))
        return total, terms


loop.Objective = InjectedObjective
run(args)
