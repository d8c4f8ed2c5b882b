"""The over-smoothing figure (Gong et al. 2021, Fig. 2 layout): one panel per metric against
depth, one line per model. Built on matplotlib's Agg canvas without pyplot, so it never touches
a global backend or figure registry (safe in servers, tests and training loops)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from vitdeep.analysis import OversmoothingMetrics

#: (metric, panel title, y label, x label) of each panel.
PANELS = (
    ("cossim", "Patch cosine similarity", "mean cosine between patch tokens", "layer (0 = patch + position embedding)"),
    ("attn_std", "Attention standard deviation", "std of attention rows", "block"),
    ("hf_ratio", "High-frequency energy ratio", "‖h − mean(h)‖² / ‖h‖²", "layer (0 = patch + position embedding)"),
)


def oversmoothing_figure(results: Mapping[str, OversmoothingMetrics], title: str = "Over-smoothing across depth") -> Figure:
    """Three panels (CosSim, attention std, high-frequency ratio) against layer, one line per label."""
    if not results:
        raise ValueError("nothing to plot: no metrics given")
    figure = Figure(figsize=(15, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(PANELS))
    for ax, (name, panel_title, y_label, x_label) in zip(axes, PANELS):
        for label, metrics in results.items():
            ax.plot(metrics.layers(name), getattr(metrics, name), marker="o", markersize=3, label=label)
        ax.set_title(panel_title)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    sizes = sorted({metrics.num_images for metrics in results.values()})
    figure.suptitle(f"{title} ({'/'.join(map(str, sizes))} images)")
    return figure
