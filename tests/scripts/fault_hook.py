"""`vitdeep ARGS` with one fault injected at an exact point (run under a launcher, or alone).

Usage: fault_hook.py FAULT ARGS...  where FAULT is one of

  signal:RANK:MICRO:SIG[+SIG...]   rank RANK sends itself SIG (e.g. TERM, INT+INT) during micro-batch MICRO
  raise:RANK:MICRO                 rank RANK raises RuntimeError("injected failure") during micro-batch MICRO
  enospc:RANK:STEP                 every file rank RANK writes for the checkpoint of STEP fails with ENOSPC
  die-after-partition:RANK:STEP    rank RANK writes its DeepSpeed partition of STEP's checkpoint, then is
                                   SIGKILLed (before its own file and the marker)

Micro-batches count the objective's calls on that rank from 0. Only the objective, `torch.save`
or the checkpoint call is wrapped; the engine, data and collectives are the real ones.
"""

import errno
import os
import signal
import sys

import torch

import vitdeep.engine.loop as loop
from vitdeep.cli import run
from vitdeep.engine.checkpoint import CHECKPOINTS, tag_for

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
kind, *fields = args[0].split(":")
args = args[1:]
rank = int(os.environ.get("RANK", "0"))
target = int(fields[0])

if kind in ("signal", "raise"):
    micro = int(fields[1])

    class FaultyObjective(loop.Objective):
        calls = 0

        def __call__(self, *a, **k):
            index, FaultyObjective.calls = FaultyObjective.calls, FaultyObjective.calls + 1
            if rank == target and index == micro:
                if kind == "raise":
                    raise RuntimeError("injected failure")
                for name in fields[2].split("+"):
                    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
            return super().__call__(*a, **k)

    loop.Objective = FaultyObjective
elif kind == "enospc":
    tag, real_save = tag_for(int(fields[1])), torch.save

    def full_disk_save(obj, f, *a, **k):
        if rank == target and tag in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **k)

    torch.save = full_disk_save
elif kind == "die-after-partition":
    step, real_checkpoint = int(fields[1]), loop.save_checkpoint

    def dying_save(engine, out, *, rank, step: int, **kwargs):
        if rank == target and step == int(fields[1]):
            import torch.distributed as dist

            dist.barrier()  # as the real save does first
            engine.save_checkpoint(os.path.join(out, CHECKPOINTS), tag=tag_for(step), save_latest=False)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_checkpoint(engine, out, rank=rank, step=step, **kwargs)

    loop.save_checkpoint = dying_save
else:
    raise SystemExit(f"unknown fault {kind!r}")

run(args)
