"""The overlap report as a PNG: a bar per layer, the guarded layers highlighted, the thresholds and chance drawn."""

from __future__ import annotations

import os

from .overlap import OverlapReport

__all__ = ["plot_overlap"]


def plot_overlap(report: OverlapReport, path: str | os.PathLike, title: str | None = None) -> str:
    """Writes a PNG bar chart of the overlap by layer, guarded layers highlighted, thresholds and chance drawn.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib`` or ``pip install 'orthoreg[plot]'``).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ImportError(
            "plotting the overlap needs matplotlib: `pip install matplotlib` (or `pip install 'orthoreg[plot]'`)"
        ) from err

    # The object-oriented API with the Agg canvas: no pyplot state, no change to the user's global backend.
    fig = Figure(figsize=(max(5.0, 0.3 * len(report.per_layer) + 1.5) + 2.4, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    layers = list(report.per_layer)
    scores = [report.per_layer[i] for i in layers]
    guarded = set(report.guarded_layers)
    colors = ["#c0392b" if i in guarded else "#7f8c8d" for i in layers]
    ax.bar(layers, scores, color=colors, width=0.8)
    for i in layers:
        if i in guarded:
            ax.axvspan(i - 0.5, i + 0.5, color="#c0392b", alpha=0.08, lw=0)
    low, high = report.thresholds
    ax.axhline(low, color="#e67e22", ls="--", lw=1, zorder=3, label=f"elevated ≥ {low:g}")
    ax.axhline(high, color="#c0392b", ls="--", lw=1, zorder=3, label=f"high ≥ {high:g}")
    ax.axhline(report.chance, color="#34495e", ls=":", lw=1, zorder=3, label=f"chance √(k/d) = {report.chance:.3f}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("overlap ‖U t̂‖")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    ax.set_title(title or f"overlap by layer ({report.mode}) — {report.verdict.upper()} ({report.overall:.2f})",
                 fontsize=10)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color="#c0392b", label="guarded by the penalty"), Patch(color="#7f8c8d", label="not guarded")]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png")
    return path
