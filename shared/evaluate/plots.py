"""PNG plots of the evaluation report, and reading TensorBoard scalars for them.

Figures are drawn with matplotlib's object API on an Agg canvas, never through pyplot, so
plotting works headless and leaves the process-wide backend untouched.

- ``plot_slot_maps``: one row per variant, one cell per slot, coloured and labelled by block;
- ``plot_importance``: importance score per block (the prune command's ``flexigpt-importance/1``);
- ``plot_selection``: the base-selection distance matrix with each pick (``flexigpt-selection/1``);
- ``plot_loss_curves``: scalars from the trainer's TensorBoard logs (``<run>/tb``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

# The trainer (shared/train/trainer.py) logs these; eval/loss only when the recipe has a data.eval stream.
DEFAULT_LOSS_TAGS: tuple[str, ...] = ("train/loss", "eval/loss")


class ReportError(ValueError):
    """An input of the report is missing or malformed; the message names it."""


class SlotLike(Protocol):
    block: int
    shared: bool
    own_params: bool


class VariantLike(Protocol):
    name: str
    slots: Sequence[SlotLike]
    num_source_layers: int


# ---------------------------------------------------------------------------------- tensorboard
def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under `logdir` as ``{tag: [(step, value), ...]}``, sorted by step.

    Each directory under `logdir` (itself included) that holds event files is read with
    TensorBoard's ``EventAccumulator``; points of one tag from several files are merged by step
    (a resumed run appends a new event file; the later value of a step wins).

    Raises:
        ReportError: `logdir` holds no event files.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(logdir)
    dirs = sorted({f.parent for f in root.rglob("events.out.tfevents*")}) if root.is_dir() else []
    if not dirs:
        raise ReportError(f"tensorboard: no event files under {root}")
    merged: dict[str, dict[int, float]] = {}
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            merged.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in merged.items()}


# ---------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def plot_slot_maps(variants: Sequence[VariantLike], path: str | Path) -> Path:
    """One row per variant, one cell per slot, coloured and labelled by the block it runs.

    Blocks run by several slots get a red outline; slots with their own adapters / norms are hatched.

    Args:
        variants: objects with ``name``, ``slots`` and ``num_source_layers`` (``report.Variant``).
        path: PNG file to write.

    Returns:
        The path written.
    """
    width = max(len(v.slots) for v in variants)
    n_blocks = max(max(v.num_source_layers, max(s.block for s in v.slots) + 1) for v in variants)
    fig = _figure(max(6.0, 0.32 * width + 2.5), 0.55 * len(variants) + 1.4)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    for row, v in enumerate(variants):
        for i, s in enumerate(v.slots):
            colour = cmap(s.block / max(n_blocks - 1, 1))
            edge = "red" if s.shared else "white"
            ax.add_patch(
                Rectangle(
                    (i + 0.04, row + 0.08),
                    0.92,
                    0.84,
                    facecolor=colour,
                    edgecolor=edge,
                    linewidth=1.5,
                    hatch="///" if s.own_params else None,
                )
            )
            light = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 0.5
            ax.text(i + 0.5, row + 0.5, str(s.block), ha="center", va="center", fontsize=7,
                    color="black" if light else "white")  # fmt: skip
    step = max(1, width // 24)
    ax.set_xlim(0, width)
    ax.set_ylim(len(variants), 0)
    ax.set_yticks([r + 0.5 for r in range(len(variants))])
    ax.set_yticklabels([v.name for v in variants], fontsize=8)
    ax.set_xticks([i + 0.5 for i in range(0, width, step)])
    ax.set_xticklabels([str(i) for i in range(0, width, step)], fontsize=7)
    ax.set_xlabel("slot (bottom to top); label: the block it runs")
    ax.set_title("slot map (red edge: block run by several slots; hatched: own adapters / norms)", fontsize=9)
    return _save(fig, path)


def plot_importance(importance: Mapping[str, Any], path: str | Path, *, removed: Sequence[int] = ()) -> Path:
    """Bar chart of the importance score of every block, each bar labelled with its value; `removed` in red.

    Scores of one model often span two decades (block 0 near 0.8, the removed blocks near 0.01), so
    positive scores are drawn on a log axis, where the removed blocks are as visible as the rest;
    scores that can be negative (``ppl_drop``) stay on a linear axis.

    Args:
        importance: the prune command's scores JSON (``scores``, ``metric``, ``num_samples``, ...).
        path: PNG file to write.
        removed: blocks to draw in red.

    Returns:
        The path written.
    """
    scores = [math.nan if s is None else float(s) for s in importance["scores"]]
    n = len(scores)
    marked = set(removed)
    fig = _figure(max(6.0, 0.3 * n + 2), 3.8)
    ax = fig.add_subplot()
    bars = ax.bar(range(n), scores, color=["tab:red" if i in marked else "tab:blue" for i in range(n)])
    finite = [x for x in scores if math.isfinite(x)]
    log = bool(finite) and min(finite) > 0
    if log:
        ax.set_yscale("log")
        ax.set_ylim(min(finite) / 2, max(finite) * 4)  # room above the bars for their labels
    else:
        ax.margins(y=0.2)
    labels = [f"{x:.2g}" if math.isfinite(x) else "" for x in scores]
    ax.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
    metric = importance.get("metric", "importance")
    ax.set_xlabel("block")
    ax.set_ylabel(metric + (" (log scale)" if log else ""))
    title = (
        f"{metric} per block ({importance.get('num_samples', '?')} samples, "
        f"{importance.get('num_tokens', '?')} tokens)"
    )
    if marked:
        title += f"; red: removed {sorted(marked)}"
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(0, n, max(1, n // 16)))
    return _save(fig, path)


def plot_selection(selection: Mapping[str, Any], path: str | Path) -> Path:
    """Heatmap of the block distance matrix (blank where not computed); each pick marked with an x.

    Args:
        selection: the prune command's selection JSON (``distances``, ``picks`` with int keys, ...).
        path: PNG file to write.

    Returns:
        The path written.
    """
    d = np.array([[np.nan if x is None else float(x) for x in row] for row in selection["distances"]])
    n = d.shape[0]
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(d), cmap="viridis", origin="upper")
    fig.colorbar(im, ax=ax, label=f"block distance ({selection.get('combine', '?')})")
    for i, j in selection["picks"].items():
        ax.plot(j, i, marker="x", color="red", markersize=7, mew=2)
    ax.set_xlabel("candidate base block j")
    ax.set_ylabel("block i (removed blocks have a pick)")
    ax.set_title(
        f"base selection: {selection.get('metric', '?')} distance, r={selection.get('rank', '?')} (x: pick)",
        fontsize=9,
    )
    ticks = range(0, n, max(1, n // 16))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    return _save(fig, path)


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's start-up correction (no pull towards 0)."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def _tokens_of(scalars: Mapping[str, list[tuple[int, float]]]) -> Any:
    """step -> tokens trained since the run's start, from the trainer's ``train/tokens_seen`` (None: not logged)."""
    pts = scalars.get("train/tokens_seen")
    if not pts or pts[-1][0] <= 0:
        return None
    per_step = pts[-1][1] / pts[-1][0]  # fixed global batch x seq_len: tokens are linear in the step
    return lambda step: step * per_step


def plot_loss_curves(
    logdirs: Mapping[str, str | Path], path: str | Path, tags: Sequence[str] = DEFAULT_LOSS_TAGS
) -> tuple[Path, list[str]]:
    """One panel per tag, one line per variant, against tokens trained since each run's own start.

    A grown or pruned run starts from a trained model, so its step 25 is not the base's step 25:
    each run is drawn against the tokens it trained itself (from its ``train/tokens_seen``; runs
    that did not log it fall back to their step, and the axis says so). Training loss is noisy:
    its exponential moving average is drawn over the raw curve, which stays faint behind it.

    Args:
        logdirs: variant name -> TensorBoard log directory (a run's ``tb/`` or the run directory).
        path: PNG file to write.
        tags: scalar tags to draw. A tag absent from every log is reported back, not drawn.

    Returns:
        The path written, and the tags found in no log.

    Raises:
        ReportError: no tags or logs, a log directory without event files, or none of `tags` found
            in any log (the message lists the tags present).
    """
    if not tags:
        raise ReportError("loss_tags: give at least one scalar tag")
    if not logdirs:
        raise ReportError("tensorboard: give at least one variant name -> log directory")
    logs = {name: read_scalars(d) for name, d in logdirs.items()}
    found = [t for t in tags if any(s.get(t) for s in logs.values())]
    missing = [t for t in tags if t not in found]
    if not found:
        present = sorted({t for s in logs.values() for t in s})
        raise ReportError(
            f"loss_tags: none of {list(tags)} is in the TensorBoard logs; scalar tags present: {present}"
        )
    axis = {name: _tokens_of(s) for name, s in logs.items()}
    by_tokens = all(f is not None for f in axis.values())
    fig = _figure(7.5, 3.4 * len(found) + 0.5)
    colours = colormaps["tab10"]
    for k, tag in enumerate(found):
        ax = fig.add_subplot(len(found), 1, k + 1)
        values: list[float] = []
        for j, (name, scalars) in enumerate(logs.items()):
            pts = scalars.get(tag)
            if not pts:
                continue
            steps, ys = zip(*pts, strict=True)
            tokens = axis[name]
            xs = [tokens(s) for s in steps] if by_tokens and tokens is not None else list(steps)
            values += ys
            c = colours(j % 10)
            if tag.startswith("train/") and len(ys) >= 10:
                weight = min(0.9, 1 - 10 / len(ys))
                ax.plot(xs, ys, color=c, alpha=0.25, linewidth=0.8)
                ax.plot(xs, smooth(ys, weight), color=c, linewidth=1.5, label=f"{name} (EMA {weight:.2f})")
            else:
                ax.plot(xs, ys, color=c, linewidth=1.2, marker="." if len(ys) < 30 else None, label=name)
        finite = [y for y in values if math.isfinite(y) and y > 0]
        if finite and max(finite) / min(finite) > 10:
            ax.set_yscale("log")
        if by_tokens:
            ax.set_xlabel("tokens trained since the run's own start")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("step of each run (train/tokens_seen not logged by every run)")
        ax.set_ylabel(tag)
        what = "tokens trained since each run's own start" if by_tokens else "each run's own step"
        ax.set_title(
            f"{tag} vs {what} (a run that starts from a trained model starts at its loss)", fontsize=8
        )
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path), missing
