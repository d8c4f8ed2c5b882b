"""`vitdeep ARGS` that, right after resuming, also saves the state it resumed into COPY (a checkpoint
written by the new number of ranks), then trains on as usual; a test compares COPY bitwise with the
checkpoint it resumed from.

Usage: resharded_copy.py COPY ARGS...   (under a launcher, or alone)
"""

import sys
from pathlib import Path

import vitdeep.engine.loop as loop
from vitdeep.cli import run

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
copy, args = Path(args[0]), args[1:]
resume = loop.Trainer.resume


def resume_and_copy(self, path):
    resume(self, path)
    out, saved = self.out, (self._saved_step, self._saved_path)
    self.out = copy
    try:
        self.save()
    finally:
        self.out = out
        self._saved_step, self._saved_path = saved


loop.Trainer.resume = resume_and_copy
run(args)
