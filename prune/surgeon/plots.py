"""The per-layer sparsity the global threshold chose, as a block x linear heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402


def plot_sparsity(sparsity: dict[str, float], targets: list[str], path: str | Path, title: str) -> Path:
    """Heatmap of each decoder linear's fraction of zero weights (``<block>.<target>`` keys).

    Args:
        sparsity: ``<block>.<target>`` -> fraction of zero weights.
        targets: the linear short names, in column order.
        path: PNG to write.
        title: figure title.
    """
    blocks = sorted({int(k.split(".")[0]) for k in sparsity})
    grid = np.array([[sparsity.get(f"{b}.{t}", np.nan) for t in targets] for b in blocks])
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(targets), 1.2 + 0.28 * len(blocks)))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(targets)), targets)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_xlabel("linear")
    ax.set_ylabel("block")
    if len(blocks) <= 40:
        for i in range(len(blocks)):
            for j in range(len(targets)):
                v = grid[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v > 0.5 else "k")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of weights zero")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
