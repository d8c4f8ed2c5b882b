"""`vitdeep fit-world`: the largest part of an allocation that the run in OUT can go on on.

A run in the lane order resumes on any number of ranks its lanes fit (`vitdeep.data.lanes`); the
launch scripts ask here, after a requeue onto other nodes, how many nodes and ranks per node to start.
"""

from __future__ import annotations

from pathlib import Path

from vitdeep.data.lane_layout import LaneLayout
from vitdeep.engine.markers import complete_checkpoints, read_marker
from vitdeep.errors import UserError


def fitting_world_sizes(out: Path) -> tuple[list[int] | None, str]:
    """(the world sizes the newest checkpoint in `out` resumes on, what decides them); None: any
    (no checkpoint yet: a new run chooses its lanes for the world it starts on)."""
    found = complete_checkpoints(out)
    if not found:
        return None, f"{out} holds no checkpoint yet"
    marker = read_marker(found[-1])
    stream = marker.get("stream")
    if stream is None:
        return [marker["world_size"]], f"{found[-1]} is in the per-rank order of runs before the lanes"
    layout = LaneLayout(stream["lanes"], stream["global_batch"], bool(stream.get("paired", True)))
    return layout.world_sizes(), f"{found[-1].name} orders its samples in {layout.lanes} lanes"


def fit_world(out: Path, nodes: int, gpus_per_node: int) -> tuple[int, int, str | None]:
    """(nodes, ranks per node, one line saying why, None for a new run): the most ranks the run
    resumes on within `nodes` × `gpus_per_node`, on as few nodes as hold them."""
    if nodes < 1 or gpus_per_node < 1:
        raise UserError(f"`nodes` and `gpus_per_node` must be >= 1, got {nodes} and {gpus_per_node}", params=("nodes", "gpus_per_node"))
    sizes, why = fitting_world_sizes(out)
    if sizes is None:
        return nodes, gpus_per_node, None
    options = [(n * g, -n, n, g) for n in range(1, nodes + 1) for g in range(1, gpus_per_node + 1) if n * g in sizes]
    if not options:
        raise UserError(f"{why} and resumes on {', '.join(map(str, sizes))} ranks: {nodes} node(s) × {gpus_per_node} GPU(s) "
                        "hold none of them", params=("nodes", "gpus_per_node"))
    ranks, _, n, g = max(options)
    used = "all of" if (n, g) == (nodes, gpus_per_node) else "of"
    return n, g, f"{why} ({', '.join(map(str, sizes))} ranks fit): resuming on {ranks} ranks, {n} node(s) × {g}, {used} the {nodes} × {gpus_per_node} allocated"
