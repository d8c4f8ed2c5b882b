"""Is this node input-bound: timed by the run itself, over its first micro-batches, on any device.

`vitdeep plan` predicts whether a node's cores can feed its GPUs; a run measures it. After its
loader workers have started (`SKIP` micro-batches), a rank times `WINDOW` micro-batches: the time
it waited for the next batch against the whole. Waiting more than `BOUND_WAIT` of the time means
the model could take more images than the loaders deliver; the warning says by how much, per rank
and for the node (× its ranks, the launcher's LOCAL_WORLD_SIZE), and what would fix it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Micro-batches left out while the loader workers start and fill their queues, then timed.
SKIP, WINDOW = 4, 32
#: The share of the time spent waiting for data above which the node is called input-bound.
BOUND_WAIT = 0.10


class InputWatch:
    """Times one rank's waits for data over its first micro-batches; `waited` returns the one-line
    warning once, when the window closes on an input-bound node (else None, always)."""

    def __init__(self, ranks_per_node: int, cores: int, reduced_decode: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.ranks_per_node, self.cores, self.reduced_decode, self.clock = ranks_per_node, cores, reduced_decode, clock
        self.batches = 0
        self.waits = 0.0
        self.images = 0
        self.start: float | None = None
        self.closed = False

    def waited(self, seconds: float, images: int) -> str | None:
        """A micro-batch of `images` came after a wait of `seconds` (call right after it came)."""
        if self.closed:
            return None
        self.batches += 1
        if self.batches <= SKIP:
            self.start = self.clock()
            return None
        self.waits += seconds
        self.images += images
        if self.batches < SKIP + WINDOW:
            return None
        self.closed = True
        elapsed = self.clock() - self.start
        if elapsed <= 0 or self.waits <= BOUND_WAIT * elapsed:
            return None
        return self.warning(elapsed)

    def warning(self, elapsed: float) -> str:
        delivered = self.images / elapsed
        could_take = self.images / max(elapsed - self.waits, 1e-9)
        node = self.ranks_per_node
        return (f"input-bound: the rank waited for data {self.waits / elapsed:.0%} of micro-batches {SKIP + 1}-{SKIP + WINDOW}: "
                f"its loader delivered {delivered:,.0f} img/s ({delivered * node:,.0f} for the node's {node} rank(s)), the model "
                f"took {could_take:,.0f} ({could_take * node:,.0f}); fixes: more `--workers` (this node has {self.cores} usable "
                f"cores), capped shards (`vitdeep shards --max-size`){'' if self.reduced_decode else ', `--reduced-decode`'}; "
                "`vitdeep plan --measure-data` prices the input pipeline")
