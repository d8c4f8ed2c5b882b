"""The over-smoothing figure (Gong et al. 2021, Fig. 2 layout): one panel per metric against
depth, one line per model. Built on matplotlib's Agg canvas without pyplot, so it never touches
a global backend or figure registry (safe in servers, tests and training loops)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from vitdeep.analysis import OversmoothingMetrics

#: (attribute, panel title, y label, first layer index) of each panel.
PANELS = (
    ("cossim", "Patch cosine similarity", "mean cosine between patch tokens", 0),
    ("attn_std", "Attention standard deviation", "std of attention rows", 1),
    ("hf_ratio", "High-frequency energy ratio", "‖h − mean(h)‖² / ‖h‖²", 0),
)
X_LABELS = {0: "layer (0 = patch + position embedding)", 1: "block"}


def oversmoothing_figure(results: Mapping[str, OversmoothingMetrics], title: str = "Over-smoothing across depth") -> Figure:
    """Three panels (CosSim, attention std, high-frequency ratio) against layer, one line per label."""
    if not results:
        raise ValueError("nothing to plot: no metrics given")
    figure = Figure(figsize=(15, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(PANELS))
    for ax, (attribute, panel_title, y_label, first_layer) in zip(axes, PANELS):
        for label, metrics in results.items():
            values = getattr(metrics, attribute)
            ax.plot(range(first_layer, first_layer + len(values)), values, marker="o", markersize=3, label=label)
        ax.set_title(panel_title)
        ax.set_xlabel(X_LABELS[first_layer])
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    sizes = sorted({metrics.num_images for metrics in results.values()})
    figure.suptitle(f"{title} ({'/'.join(map(str, sizes))} images)")
    return figure


def save_oversmoothing_plot(
    results: Mapping[str, OversmoothingMetrics], path: str | Path, title: str = "Over-smoothing across depth"
) -> Path:
    """Write `oversmoothing_figure` as a PNG (the file `vitdeep analyze` and the demo produce)."""
    path = Path(path)
    oversmoothing_figure(results, title).savefig(path, dpi=120)
    return path
