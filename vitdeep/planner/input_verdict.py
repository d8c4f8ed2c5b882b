"""Is a node input-bound: can its CPU cores decode and augment the images its GPUs train on?

`vitdeep plan` knows the images per second a node's ranks consume (the global batch over the
nodes, at the planned step time) and, from `vitdeep.data.decode_rate`, what one core decodes and
augments. The node's cores (`--cores-per-node`) times that rate is what its loaders can deliver;
less than the GPUs consume and the run is input-bound by the ratio, whatever the GPUs could do.
The fixes it names, cheapest first: capped shards (`vitdeep shards --max-size`), reduced
decoding (when the run turned it off), more cores, and augmentation on the GPU (NVIDIA DALI),
which vitdeep does not do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vitdeep.data.decode_rate import DecodeRate
from vitdeep.errors import UserError

#: The shorter side the verdict suggests capping shards at for a run of `img_size`: 256 for 224 px
#: (DeiT's evaluation resize), the same 8/7 above larger sizes.
CAP_OVER_IMG_SIZE = 256 / 224


def choose_decode_rate(measure_data: bool, decode_rate: float | None, measure: Any, assumed: Any) -> DecodeRate | None:
    """The rate to plan with: `measure()` with --measure-data, the given --decode-rate, else
    `assumed()` (the committed benchmark's). Both flags at once are refused."""
    if measure_data and decode_rate is not None:
        raise UserError("`measure_data` measures the decoding rate here and `decode_rate` gives one measured elsewhere: "
                        "pass one of them", params=("measure_data", "decode_rate"))
    if decode_rate is not None:
        return DecodeRate(decode_rate, "--decode-rate", "measured elsewhere, as given")
    return measure() if measure_data else assumed()


@dataclass(frozen=True)
class InputVerdict:
    """The input pipeline of one node against what its ranks consume."""

    #: Images per second the node's ranks train on (per node, not over the world).
    needed: float
    rate: DecodeRate
    cores: int
    ranks_per_node: int
    img_size: int
    reduced_decode: bool

    @property
    def supply(self) -> float:
        """Images per second the node's cores decode and augment."""
        return self.rate.per_core * self.cores

    @property
    def bound(self) -> bool:
        return self.needed > self.supply

    @property
    def factor(self) -> float:
        """How many times what the cores deliver the GPUs would take (> 1: input-bound)."""
        return self.needed / self.supply

    @property
    def cores_needed(self) -> int:
        return math.ceil(self.needed / self.rate.per_core)

    def fixes(self) -> list[str]:
        """What would feed the GPUs, cheapest first (empty when nothing needs fixing)."""
        if not self.bound:
            return []
        cap = round(self.img_size * CAP_OVER_IMG_SIZE)
        fixes = [f"capped shards (`vitdeep shards --max-size {cap}`), measured again with `plan --measure-data --data` on them"]
        if not self.reduced_decode:
            fixes.append("reduced JPEG decoding (`--reduced-decode`, on by default)")
        fixes.append(f"{self.cores_needed} cores per node at this rate")
        fixes.append("augmentation on the GPU (e.g. NVIDIA DALI; vitdeep does not do this)")
        return fixes

    def lines(self) -> list[str]:
        lines = [f"input: the node's {self.ranks_per_node} ranks train on {self.needed:,.0f} img/s; its {self.cores} cores decode "
                 f"and augment {self.supply:,.0f} at {self.rate.per_core:,.0f} img/s per core ({self.rate.source})"]
        if self.bound:
            lines.append(f"input-bound: the GPUs would take {self.factor:.2f}× what the cores deliver; fixes: " + "; ".join(self.fixes()))
        else:
            lines.append(f"not input-bound: the cores deliver {1 / self.factor:.2f}× what the GPUs take ({self.cores_needed} cores would do)")
        if self.rate.source == "assumed":
            lines.append(f"the decoding rate is assumed, from {self.rate.detail}: `--measure-data` measures this run's here, "
                         "`--decode-rate N` takes one measured elsewhere")
        else:
            lines.append(f"the decoding rate: {self.rate.detail}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "decode_rate": self.rate.to_dict(),
            "cores_per_node": self.cores,
            "ranks_per_node": self.ranks_per_node,
            "images_per_second_per_node": self.needed,
            "images_per_second_the_cores_deliver": self.supply,
            "input_bound": self.bound,
            "gpus_over_cores": self.factor,
            "cores_needed": self.cores_needed,
            "fixes": self.fixes(),
            "verdict": self.lines(),
        }
