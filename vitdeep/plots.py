"""The figures: over-smoothing (Gong et al. 2021, Fig. 2 layout: one panel per metric against
depth, one line per model) and an ablation grid's results. Built on matplotlib's Agg canvas
without pyplot, so they never touch a global backend or figure registry (safe in servers, tests
and training loops)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def ablation_figure(top1: Mapping[str, float | None], cossim: Mapping[str, Sequence[float]], title: str,
                    top1_std: Mapping[str, float | None] | None = None,
                    cossim_std: Mapping[str, Sequence[float]] | None = None) -> Figure:
    """An ablation grid at a glance: top-1 per cell (bars), and the patch CosSim of each cell
    against depth (one line per cell, the first panel of the over-smoothing figure). With seeds,
    `top1_std` / `cossim_std` draw ± one standard deviation (error bars, a band)."""
    if not top1:
        raise ValueError("nothing to plot: no cells given")
    figure = Figure(figsize=(13, max(4.5, 0.35 * len(top1) + 1.5)), layout="constrained")
    FigureCanvasAgg(figure)
    bars, curves = figure.subplots(1, 2, width_ratios=(2, 3))
    names = list(top1)[::-1]  # first cell on top
    values = [top1[name] if top1[name] is not None else 0.0 for name in names]
    spread = [(top1_std or {}).get(name) or 0.0 for name in names]
    bars.barh(names, values, xerr=spread if top1_std else None, capsize=3,
              color=["C0" if top1[name] is not None else "lightgray" for name in names])
    for y, name in enumerate(names):
        label = "–" if top1[name] is None else f"{top1[name]:.1f}" + (f" ± {spread[y]:.1f}" if top1_std else "")
        bars.annotate(label, (values[y] + spread[y], y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    bars.set_xlim(0, max(max(v + s for v, s in zip(values, spread)), 1.0) * 1.18)  # room for the labels
    bars.set_xlabel("top-1 % (validation)")
    bars.set_title("Top-1 per cell")
    bars.grid(True, axis="x", alpha=0.3)
    _, panel_title, y_label, x_label = PANELS[0]
    for name, values in cossim.items():
        line, = curves.plot(range(len(values)), values, marker="o", markersize=3, label=name)
        band = (cossim_std or {}).get(name)
        if band:
            low, high = [v - s for v, s in zip(values, band)], [v + s for v, s in zip(values, band)]
            curves.fill_between(range(len(values)), low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    curves.set_title(panel_title)
    curves.set_xlabel(x_label)
    curves.set_ylabel(y_label)
    curves.grid(True, alpha=0.3)
    if cossim:
        curves.legend(fontsize=8, loc="best")
    figure.suptitle(title)
    return figure
