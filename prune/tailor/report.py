"""The search report: every trial's scores against its budget, the best-so-far curve, the layer map.

``trials.jsonl`` holds one line per finished trial (number, state, warm-start label, plan, scores
per budget, seconds); three PNGs show them: ``search_scores.png`` (mean accuracy against budget,
one line per trial), ``search_best.png`` (best mean accuracy at the top budget so far, against trial
number) and ``layer_map.png`` (for the chosen plans, which source each base layer takes, which are
removed, and merge scales).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexigpt.prune.tailor.search import finished, mean_at
from flexigpt.prune.tailor.stitch import StitchPlan


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One plain dict per finished trial, in trial order."""
    rows = []
    for t in sorted(finished(study), key=lambda t: t.number):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "label": t.user_attrs.get("label", "sampler"),
                "scores": t.user_attrs.get("scores", {}),
                "seconds": t.user_attrs.get("seconds"),
                "plan": t.user_attrs.get("plan"),
            }
        )
    return rows


def write_trials(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plot_search(
    rows: Sequence[dict[str, Any]], top_budget: int, out_dir: Path, chosen: int | None
) -> list[Path]:
    """Scores-vs-budget and best-so-far plots. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        pts = sorted((int(b), 100 * sum(s.values()) / len(s)) for b, s in r["scores"].items())
        if not pts:
            continue
        mine = r["number"] == chosen
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            "-o",
            color="C3" if mine else ("C0" if r["label"] != "sampler" else "0.6"),
            alpha=1.0 if mine else 0.5,
            ms=4 if mine else 2.5,
            lw=2 if mine else 0.8,
            zorder=3 if mine else 1,
        )
    ax.set_xscale("log")
    budgets = sorted({int(b) for r in rows for b in r["scores"]})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("budget (documents per task, lm-eval limit)")
    ax.set_ylabel("mean accuracy (%)")
    ax.set_title("every trial (blue: warm starts, grey: sampler, red: chosen)")
    fig.tight_layout()
    paths.append(out_dir / "search_scores.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    xs, best, ys = [], [], []
    cur = None
    for r in rows:
        s = r["scores"].get(str(top_budget))
        if s is not None:
            v = 100 * sum(s.values()) / len(s)
            ys.append((r["number"], v))
            cur = v if cur is None else max(cur, v)
        if cur is not None:
            xs.append(r["number"])
            best.append(cur)
    ax.scatter([p[0] for p in ys], [p[1] for p in ys], s=10, color="0.6", label="trial at the top budget")
    ax.step(xs, best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"mean accuracy at budget {top_budget} (%)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "search_best.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def plot_layer_map(plans: Sequence[tuple[str, StitchPlan]], sources: Sequence[str], path: Path) -> Path:
    """One row per plan, one column per base layer: the source's colour, merges hatched with their scale,
    removed layers crossed out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    colours = {s: f"C{i}" for i, s in enumerate(sources)}
    L = plans[0][1].base_layers
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * L + 2.5), 0.6 * len(plans) + 1.4))
    for row, (_, plan) in enumerate(plans):
        y = len(plans) - 1 - row
        by_layer = {p.layer: p for p in plan.positions}
        for i in range(L):
            p = by_layer.get(i)
            if p is None:
                ax.add_patch(Rectangle((i, y), 1, 1, facecolor="white", edgecolor="0.5"))
                ax.plot([i + 0.15, i + 0.85], [y + 0.15, y + 0.85], color="0.4", lw=1)
                ax.plot([i + 0.15, i + 0.85], [y + 0.85, y + 0.15], color="0.4", lw=1)
            elif p.merge is None:
                ax.add_patch(
                    Rectangle((i, y), 1, 1, facecolor=colours.get(p.source, "0.8"), edgecolor="white")
                )
            else:
                vs = p.merge.variants
                for k, v in enumerate(vs):  # stripes: one per merged variant
                    ax.add_patch(
                        Rectangle(
                            (i + k / len(vs), y),
                            1 / len(vs),
                            1,
                            facecolor=colours.get(v, "0.8"),
                            edgecolor="none",
                        )
                    )
                ax.add_patch(Rectangle((i, y), 1, 1, fill=False, hatch="//", edgecolor="white"))
                ax.text(i + 0.5, y + 0.5, f"{p.merge.scale:.2f}", ha="center", va="center", fontsize=7)
            if p is not None and p.output_scale is not None:
                ax.text(i + 0.5, y + 0.12, f"x{p.output_scale:.2f}", ha="center", va="bottom", fontsize=6)
    ax.set_xlim(0, L)
    ax.set_ylim(0, len(plans))
    ax.set_xticks([i + 0.5 for i in range(L)], [str(i) for i in range(L)], fontsize=7)
    ax.set_yticks([len(plans) - 0.5 - r for r in range(len(plans))], [lab for lab, _ in plans], fontsize=8)
    ax.set_xlabel("base layer (crossed: removed; striped: merge of the variants, with its scale)")
    handles = [Patch(color=c, label=s) for s, c in colours.items()]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12 - 0.6 / len(plans)),
        ncol=len(handles),
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["mean_at", "plot_layer_map", "plot_search", "trial_rows", "write_trials"]
