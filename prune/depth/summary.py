"""The prune command's summary: removed blocks, picks, and per variant its size and start perplexity.

Written to ``output_dir/summary.json`` (format ``flexigpt-prune-summary/1``) and printed as a table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from flexigpt.prune.depth.importance import ImportanceResult
from flexigpt.shared.engine.apply import expected_trainable
from flexigpt.shared.engine.plan import Plan
from flexigpt.shared.files import write_text_atomic

SUMMARY_FORMAT = "flexigpt-prune-summary/1"


@dataclass
class PruneSummary:
    """What the pruning step produced."""

    removed: list[int]
    """Source blocks removed (the lowest importance)."""
    picks: dict[int, int]
    """Removed block -> base block (flexigpt variant; empty without it)."""
    plans: dict[str, Plan]
    """Every variant's plan."""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per variant: directories, slots, stored parameters, start perplexity (``variant_entry``)."""
    source: dict[str, Any] = field(default_factory=dict)
    """The unpruned model: path, layers, start perplexity."""
    peak_rss_mib: float = 0.0
    """Peak resident memory of the process up to the end of the pruning step (ru_maxrss)."""
    texts: dict[str, Any] = field(default_factory=dict)
    """The text rule and which text each figure came from (importance, gamma, start perplexity)."""
    wall_s: float = 0.0
    """Wall time of the pruning step, in seconds."""


def variant_entry(
    config: PretrainedConfig, plan: Plan, vdir: Path, plain: str | None, start_ppl: float, trained: bool
) -> dict[str, Any]:
    """One variant's line of the summary; parameter counts come from the plan (the build checked them)."""
    stored = expected_trainable(plan, config, "all")
    source = expected_trainable(Plan.identity(config.model_type, config.num_hidden_layers), config, "all")
    return {
        "dir": str(vdir),
        "initial": str(vdir / "initial"),
        "plain": str(vdir / plain) if plain else None,
        "slots": plan.num_slots,
        "physical_blocks": len(plan.physical_blocks),
        "stored_params": stored,
        "source_params": source,
        "stored_vs_source": stored / source,
        "start_ppl": start_ppl,
        "trained": trained,
    }


def write_summary(path: Path, imp: ImportanceResult, s: PruneSummary) -> None:
    """Write ``summary.json``."""
    d = {
        "format": SUMMARY_FORMAT,
        "source": s.source,
        "removed": s.removed,
        "picks": {str(k): v for k, v in s.picks.items()},
        "importance": {"metric": imp.metric, "scores": imp.scores, "samples": imp.num_samples},
        "texts": s.texts,
        "variants": s.variants,
        "peak_rss_mib": round(s.peak_rss_mib, 1),
        "peak_rss_note": "ru_maxrss of the process that ran this pruning step, up to its end (before training)",
        "wall_s": round(s.wall_s, 2),
    }
    write_text_atomic(path, json.dumps(d, indent=1) + "\n")


def summary_table(s: PruneSummary) -> str:
    """The summary as a fixed-width table (the unpruned model first)."""
    head = (
        f"{'variant':<14} {'slots':>5} {'blocks':>6} {'stored params':>15} {'vs source':>9} {'start ppl':>10}"
    )
    lines = [head]
    source_params = None
    for name, v in s.variants.items():
        source_params = v["source_params"]
        lines.append(
            f"{name:<14} {v['slots']:>5} {v['physical_blocks']:>6} {v['stored_params']:>15,} "
            f"{v['stored_vs_source']:>9.2%} {v['start_ppl']:>10.2f}"
        )
    n = s.source["layers"]
    src = f"{source_params:>15,}" if source_params else f"{'':>15}"
    lines.insert(1, f"{'unpruned':<14} {n:>5} {n:>6} {src} {'100.00%':>9} {s.source['start_ppl']:>10.2f}")
    lines += [f"{k}: {v}" for k, v in s.texts.items() if isinstance(v, str)]
    lines.append(
        f"peak resident memory of the pruning step: {s.peak_rss_mib:,.0f} MiB; wall time {s.wall_s:,.1f} s"
    )
    return "\n".join(lines)
