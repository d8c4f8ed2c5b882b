"""The CPU cores this process may use: its affinity mask (as a batch scheduler or `taskset` sets
it) and its cgroup's CPU quota (a container's `--cpus`, Slurm's cgroup), whichever is smaller;
and how torch's OpenMP threads wait on them.

`os.cpu_count()` counts the machine's cores, not this process's share: a run that starts one
thread per machine core inside a 4-core slice of a 64-core node oversubscribes it 16-fold. Free
of torch, so the planner and the launch checks read it without importing it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: cgroup v2's limit (`QUOTA PERIOD`, or `max PERIOD` for none) and cgroup v1's pair of files.
CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by its cgroup's CPU quota
    (rounded up: a quota of 2.5 cores keeps 3 threads busy part of the time); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def workers_for_cores(most: int, local_ranks: int) -> int:
    """Loader workers per rank when none are asked for: `most`, or the usable cores each of this
    machine's `local_ranks` has when those are fewer (at least 1). More workers than cores only
    contend for them, and torch warns about it."""
    return max(1, min(most, usable_cores() // max(1, local_ranks)))


def cgroup_cpu_quota() -> float | None:
    """The cgroup's CPU quota in cores (quota / period), or None without one; an unreadable or
    malformed file counts as none."""
    try:
        if CGROUP_V2_MAX.is_file():
            quota, period = CGROUP_V2_MAX.read_text().split()[:2]
        else:
            quota, period = (path.read_text().strip() for path in CGROUP_V1)
        if quota in ("max", "-1"):
            return None
        cores = int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return cores if math.isfinite(cores) and cores > 0 else None


#: The variables that say how OpenMP threads wait (libgomp, which torch's Linux wheels use).
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def passive_openmp_waits() -> None:
    """Let torch's OpenMP threads sleep while they wait, unless the environment says how they wait.

    libgomp's threads spin at every barrier; when another process holds one of the cores, each
    parallel region then waits for a descheduled thread. One training process on 2 cores beside
    one busy core measured 25–53 img/s spinning, 79 with passive waits and 98 on one thread; on
    quiet cores 164, 113 and 104 (`benchmarks/cpu_threads.py`). On a GPU node the threads sleep
    instead of taking cycles from the data loader's workers. libgomp reads the variable once, when
    torch loads it: the `vitdeep` command sets it first thing. `OMP_WAIT_POLICY=ACTIVE` restores
    spinning for dedicated cores.
    """
    if not any(name in os.environ for name in OPENMP_WAIT_VARIABLES):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
