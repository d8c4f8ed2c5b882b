"""What a person sees: the rich console, progress bars, and (later) TensorBoard / JSON-lines logs.

Named `monitor` rather than the design's `logging` so it never shadows the standard library's
`logging` module inside the package.
"""

from __future__ import annotations

import os

from rich.console import Console

#: Tables stay readable when output is piped or captured (rich would assume 80 columns).
MIN_WIDTH = 120


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Global rank 0 prints progress and writes logs; other ranks stay quiet."""
    return global_rank() == 0


def make_console(stderr: bool = False) -> Console:
    width = Console(stderr=stderr).width
    return Console(stderr=stderr, width=max(width, MIN_WIDTH), quiet=not is_main_process())
