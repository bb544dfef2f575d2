"""PNG plots of pruning decisions: importance per block, and the block distance heatmap (Fig. 4).

Figures are drawn with matplotlib's object API on an Agg canvas, never through pyplot, so
plotting works headless and leaves the process-wide backend untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flexigpt.prune.depth.importance import ImportanceResult
from flexigpt.prune.depth.selection import SelectionResult
from flexigpt.shared.evaluate.plots import plot_importance as report_plot_importance


def plot_importance(result: ImportanceResult, path: str | Path, *, removed: Sequence[int] = ()) -> Path:
    """Bar chart of one score per block, labelled with its value, on a log axis for positive scores.

    The report draws the same picture (``shared.evaluate.plots.plot_importance``); this is it for an
    ``ImportanceResult``.

    Args:
        result: scores from ``compute_importance``.
        path: PNG file to write.
        removed: blocks to highlight (e.g. ``result.least_important(n)``).

    Returns:
        The path written.
    """
    return report_plot_importance(result.to_dict(), path, removed=removed)


def plot_distances(selection: SelectionResult, path: str | Path) -> Path:
    """Heatmap of the block distance matrix; each removed block's pick is marked with an x.

    Pairs that were not computed (and the diagonal) are left blank.

    Args:
        selection: result of ``select_bases``.
        path: PNG file to write.

    Returns:
        The path written.
    """
    d = selection.distance_tensor().numpy()
    n = d.shape[0]
    fig = Figure(figsize=(6.5, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(d), cmap="viridis", origin="upper")
    fig.colorbar(im, ax=ax, label=f"block distance ({selection.combine})")
    for i, j in selection.picks.items():
        ax.plot(j, i, marker="x", color="red", markersize=7, mew=2)
    ax.set_xlabel("candidate block j")
    ax.set_ylabel("block i")
    ax.set_title(
        f"{selection.metric} distance, r={selection.rank} (x: pick of each removed block)", fontsize=9
    )
    ticks = range(0, n, max(1, n // 16))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out
