"""How a global batch is cut into lanes, and which ranks, workers and micro-batches a layout fits.

The arithmetic of the lane order (`vitdeep.data.lanes`), free of torch: `--dry-run`, `vitdeep plan`
and `vitdeep fit-world` (the launch scripts' question after a requeue) answer with it at no cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitdeep.errors import UserError

#: The stream format a checkpoint's marker names (`stream`); markers without it used the
#: per-rank stream of `vitdeep.data.streams.TrainStream`.
STREAM_FORMAT = "lanes-1"
#: `lanes` 0 picks the largest that fits the starting world and divides the global batch, up to
#: this or `GROWTH` × the starting ranks: so a run can go on on 4 times as many ranks (8 with pairs
#: of lanes), while a rank that takes many lanes on few workers holds few shuffle buffers.
AUTO_LANES_MAX, GROWTH = 64, 8
#: Samples held by the shuffle buffers of all lanes together (each lane holds 1/lanes of it, at least
#: `MIN_LANE_BUFFER`): with many lanes on few workers the memory stays bounded.
SHUFFLE_SAMPLES = 16384
MIN_LANE_BUFFER = 64


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def lane_shuffle_buffer(lanes: int) -> int:
    return max(MIN_LANE_BUFFER, SHUFFLE_SAMPLES // lanes)


@dataclass(frozen=True)
class LaneLayout:
    """How a global batch is cut into lanes, and which ranks, workers and micro-batches fit.

    `paired`: batches are mixed (Mixup / CutMix pair lanes `2p, 2p+1`), so every rank must own whole
    pairs and every micro-batch hold whole pairs.
    """

    lanes: int
    global_batch: int
    paired: bool

    def __post_init__(self) -> None:
        if self.lanes < 1 or self.global_batch % self.lanes:
            raise UserError(f"`lanes` {self.lanes} must divide the global batch {self.global_batch}", params=("lanes",))
        if self.paired and self.lanes % 2:
            raise UserError(f"`lanes` {self.lanes} must be even when batches are mixed (Mixup / CutMix pair lanes)", params=("lanes",))

    @property
    def per_lane(self) -> int:
        """Entries each lane gives to one global batch."""
        return self.global_batch // self.lanes

    def world_sizes(self) -> list[int]:
        """Every number of ranks this layout runs on."""
        step = 2 if self.paired else 1
        return [r for r in divisors(self.lanes) if (self.lanes // r) % step == 0]

    def worker_counts(self, world_size: int) -> list[int]:
        """Data-loader workers per rank that each read at least one of its lanes (0: read in the
        rank); they share the lanes round robin, evenly when their number divides the lanes."""
        return list(range(self.lanes // world_size + 1))

    def micro_batches(self, world_size: int) -> list[int]:
        share = self.global_batch // world_size
        return [m for m in divisors(share) if not (self.paired and m % 2)]

    def problem(self, world_size: int, workers: int, micro_batch: int) -> str | None:
        """Why (world size, workers, micro-batch) does not fit, in one line naming what does; None if it fits."""
        sizes = self.world_sizes()
        if world_size not in sizes:
            return (f"a run with {self.lanes} lanes (global batch {self.global_batch}) runs on {', '.join(map(str, sizes))} "
                    f"ranks, not {world_size}")
        counts = self.worker_counts(world_size)
        if workers not in counts:
            return (f"on {world_size} ranks each rank reads {counts[-1]} of the {self.lanes} lanes: at most {counts[-1]} "
                    f"`workers` per rank, not {workers}")
        micro = self.micro_batches(world_size)
        if micro_batch not in micro:
            return (f"on {world_size} ranks the `micro_batch` must be one of {', '.join(map(str, micro))} "
                    f"(global batch {self.global_batch}{', pairs kept whole' if self.paired else ''}), not {micro_batch}")
        return None

    def check(self, world_size: int, workers: int, micro_batch: int) -> None:
        problem = self.problem(world_size, workers, micro_batch)
        if problem is not None:
            raise UserError(problem, params=("lanes", "workers", "micro_batch"))


def choose_lanes(global_batch: int, world_size: int, workers: int, paired: bool) -> int:
    """The lanes of a new run: the largest divisor of the global batch up to `AUTO_LANES_MAX` (or
    `GROWTH` × the ranks) that the starting world fits (every rank owns whole pairs, and at least a lane per worker), else the
    smallest that does."""
    step = world_size * (2 if paired else 1)
    fitting = [lanes for lanes in divisors(global_batch) if lanes % step == 0 and lanes // world_size >= max(workers, 1)]
    if not fitting:
        raise UserError(
            f"no number of lanes fits a global batch of {global_batch} on {world_size} ranks × {workers} workers"
            f"{' with whole mixing pairs' if paired else ''}: use a global batch that is a multiple of {step} "
            f"with at least {max(workers, 1)} lanes per rank, or fewer `workers`", params=("global_batch", "workers"))
    small = [lanes for lanes in fitting if lanes <= max(AUTO_LANES_MAX, GROWTH * world_size)]
    return max(small) if small else min(fitting)
