"""The evaluation report: JSON, a markdown table comparing named variants, and PNG plots.

A *variant* is one evaluated model (base, FlexiGPT, ShortGPT, ShortGPT+LoRA, grown, ...): its
perplexity, its zero-shot scores, its stored parameter count and its slot map (which physical
block every slot runs, from the model's plan; a plain model runs block i in slot i).

Plots:

- ``slot_map.png``: one row per variant, one cell per slot, coloured and labelled by block;
  blocks run by several slots are outlined, slots with their own adapters / norms hatched;
- ``block_influence.png``: the per-block importance scores the prune command writes
  (``flexigpt-importance/1`` JSON), removed blocks in red;
- ``base_selection.png``: the block distance matrix of base selection (``flexigpt-selection/1``
  JSON), each removed block's pick marked;
- ``loss_curves.png``: scalars read from the trainer's TensorBoard event files (``train/loss`` and
  ``eval/loss`` by default).

The plots live in ``report_plots``. The prune package's files are read as JSON (``shared`` never
imports ``prune``); their formats are checked by their ``format`` key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexigpt.shared.engine.plan import Plan
from flexigpt.shared.evaluate.perplexity import PerplexityResult
from flexigpt.shared.evaluate.plots import (
    DEFAULT_LOSS_TAGS,
    ReportError,
    plot_importance,
    plot_loss_curves,
    plot_selection,
    plot_slot_maps,
    read_scalars,
)
from flexigpt.shared.evaluate.zeroshot import TASK_LABELS, ZeroShotResult

REPORT_FORMAT = "flexigpt-eval-report/1"
IMPORTANCE_FORMAT = "flexigpt-importance/1"
SELECTION_FORMAT = "flexigpt-selection/1"


# ----------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class SlotInfo:
    """One slot of a variant's slot map."""

    block: int
    """Source block whose weights the slot runs."""
    shared: bool = False
    """The block is run by more than one slot (its weights are stored once)."""
    own_params: bool = False
    """The slot has its own adapters, output norm or norms."""


@dataclass
class Variant:
    """One evaluated model and everything the report shows about it."""

    name: str
    path: str | None
    stored_params: int
    """Parameters stored (a shared block counted once)."""
    slots: list[SlotInfo]
    num_source_layers: int
    perplexity: PerplexityResult | None = None
    zeroshot: ZeroShotResult | None = None
    plan: dict[str, Any] | None = None
    """The model's plan (None for a plain model)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def physical_blocks(self) -> int:
        return len({s.block for s in self.slots})

    @property
    def removed_blocks(self) -> list[int]:
        used = {s.block for s in self.slots}
        return [b for b in range(self.num_source_layers) if b not in used]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "stored_params": self.stored_params,
            "num_slots": len(self.slots),
            "physical_blocks": self.physical_blocks,
            "num_source_layers": self.num_source_layers,
            "removed_blocks": self.removed_blocks,
            "slot_map": slot_map_text(self.slots),
            "slots": [vars(s) for s in self.slots],
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "zeroshot": self.zeroshot.to_dict() if self.zeroshot else None,
            "plan": self.plan,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Variant:
        return cls(
            name=d["name"],
            path=d["path"],
            stored_params=int(d["stored_params"]),
            slots=[SlotInfo(**s) for s in d["slots"]],
            num_source_layers=int(d["num_source_layers"]),
            perplexity=PerplexityResult.from_dict(d["perplexity"]) if d.get("perplexity") else None,
            zeroshot=ZeroShotResult.from_dict(d["zeroshot"]) if d.get("zeroshot") else None,
            plan=d.get("plan"),
            extra=dict(d.get("extra") or {}),
        )


def slots_from_plan(plan: Plan) -> list[SlotInfo]:
    """The slot map of a plan."""
    uses: dict[int, int] = {}
    for s in plan.slots:
        uses[s.block] = uses.get(s.block, 0) + 1
    return [SlotInfo(s.block, uses[s.block] > 1, not s.is_plain) for s in plan.slots]


def describe_model(model: Any) -> tuple[int, list[SlotInfo], int, dict[str, Any] | None]:
    """Stored parameters, slot map, source layer count and plan dict of a loaded model.

    A shared model (with ``.plan``) reports its plan. A plain export of a pruned model (ShortGPT)
    says in its config which source block each layer is (``flexigpt_source_blocks``); any other
    model is taken as plain (slot i runs block i).
    """
    # model.parameters() yields a shared Parameter once, so this is the stored count.
    stored = sum(p.numel() for p in model.parameters())
    plan: Plan | None = getattr(model, "plan", None)
    if plan is not None:
        return stored, slots_from_plan(plan), plan.num_source_layers, plan.to_dict()
    n = int(model.config.num_hidden_layers)
    blocks = getattr(model.config, "flexigpt_source_blocks", None)
    if blocks is not None and len(blocks) == n:
        return stored, [SlotInfo(int(b)) for b in blocks], int(model.config.flexigpt_source_layers), None
    return stored, [SlotInfo(i) for i in range(n)], n, None


def slot_map_text(slots: Sequence[SlotInfo]) -> str:
    """Slots as block numbers: ``*`` marks a block run by several slots, ``+`` a slot with own parameters."""
    return " ".join(f"{s.block}{'*' if s.shared else ''}{'+' if s.own_params else ''}" for s in slots)


# ------------------------------------------------------------------------------- JSON + table
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _ppl(x: float | None) -> str:
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


def markdown_table(variants: Sequence[Variant]) -> str:
    """The comparison table: slots, stored parameters (and vs the first variant), PPL, each task, average."""
    tasks: list[str] = []
    for v in variants:
        for t in v.zeroshot.scores if v.zeroshot else ():
            if t not in tasks:
                tasks.append(t)
    head = ["Variant", "Slots", "Blocks stored", "Stored params", "vs first", "PPL"]
    head += [TASK_LABELS.get(t, t) for t in tasks] + (["Average"] if tasks else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = variants[0].stored_params if variants else 0
    for v in variants:
        row = [
            v.name,
            str(len(v.slots)),
            str(v.physical_blocks),
            f"{v.stored_params:,}",
            f"{100 * v.stored_params / ref:.1f}%" if ref else "n/a",
            _ppl(v.perplexity.ppl if v.perplexity else None),
        ]
        zs = v.zeroshot
        row += [_pct(zs.scores[t].value if zs and t in zs.scores else None) for t in tasks]
        if tasks:
            complete = zs is not None and all(t in zs.scores for t in tasks)
            row.append(_pct(zs.mean if complete else None))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_report(variants: Sequence[Variant], plots: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    """The whole markdown report: table, settings, slot maps and plot links."""
    out = ["# Evaluation report", "", markdown_table(variants), ""]
    ppl_settings = {
        (
            v.perplexity.context_len,
            v.perplexity.stride,
            v.perplexity.tokens,
            v.extra.get("perplexity_text", {}).get("described"),
        )
        for v in variants
        if v.perplexity
    }
    for v in variants:
        if v.perplexity:
            text = v.extra.get("perplexity_text", {}).get("described")
            out.append(f"- {v.name}: {v.perplexity.summary()}" + (f" on {text}" if text else ""))
    if len(ppl_settings) > 1:
        out.append("- note: the variants' perplexities were measured with different settings or token counts")
    metrics = {(t, s.metric) for v in variants if v.zeroshot for t, s in v.zeroshot.scores.items()}
    if metrics:
        listed = ", ".join(f"{TASK_LABELS.get(t, t)}: {m}" for t, m in sorted(metrics))
        limits = {v.zeroshot.limit for v in variants if v.zeroshot}
        out.append(
            f"- zero-shot metrics (lm-eval, 0-shot, %): {listed}; limit per task: {sorted(limits, key=str)}"
        )
    out += [f"- {n}" for n in notes]
    out += [
        "",
        "## Slot maps",
        "",
        "Block run by each slot, bottom to top; `*`: the block is run by several "
        "slots (stored once); `+`: the slot has its own adapters / norms.",
        "",
    ]
    for v in variants:
        removed = v.removed_blocks
        out.append(
            f"- **{v.name}** ({len(v.slots)} slots over {v.physical_blocks} blocks"
            + (f", removed {removed}" if removed else "")
            + f"): `{slot_map_text(v.slots)}`"
        )
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{name}]({Path(p).name})" for name, p in plots.items()]
    return "\n".join(out) + "\n"


def write_report(
    variants: Sequence[Variant],
    out_dir: str | Path,
    *,
    importance: str | Path | None = None,
    selection: str | Path | None = None,
    tensorboard: Mapping[str, str | Path] | None = None,
    loss_tags: Sequence[str] = DEFAULT_LOSS_TAGS,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the plots into `out_dir`.

    Args:
        variants: evaluated models, in table order (the first is the reference of "vs first").
        out_dir: output directory (created).
        importance: Block Influence scores JSON from the prune command (optional).
        selection: base-selection JSON from the prune command (optional).
        tensorboard: variant name -> TensorBoard log directory, for the loss curves (optional).
        loss_tags: scalar tags to plot.
        notes: extra lines for the markdown report.

    Returns:
        The report as written to ``report.json``.

    Raises:
        ReportError: no variants, duplicate names, or an unreadable input file or tag.
    """
    if not variants:
        raise ReportError("variants: the report needs at least one evaluated model")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ReportError(f"variants: names must be unique, got {names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {"slot map": str(plot_slot_maps(variants, out / "slot_map.png"))}
    imp = read_importance(importance) if importance else None
    sel = read_selection(selection) if selection else None
    if imp is not None:
        removed = sel["removed"] if sel else _removed_of_first_pruned(variants, len(imp["scores"]))
        plots["block influence"] = str(plot_importance(imp, out / "block_influence.png", removed=removed))
    if sel is not None:
        plots["base selection"] = str(plot_selection(sel, out / "base_selection.png"))
    notes = list(notes)
    if tensorboard:
        curves, missing = plot_loss_curves(tensorboard, out / "loss_curves.png", loss_tags)
        plots["loss curves"] = str(curves)
        notes += [f"loss curves: tag {t!r} is in no TensorBoard log" for t in missing]
    report = {
        "format": REPORT_FORMAT,
        "variants": [v.to_dict() for v in variants],
        "inputs": {
            "importance": str(importance) if importance else None,
            "selection": str(selection) if selection else None,
            "tensorboard": {k: str(v) for k, v in (tensorboard or {}).items()},
            "loss_tags": list(loss_tags),
        },
        "plots": {k: Path(v).name for k, v in plots.items()},
        "notes": list(notes),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown_report(variants, plots, notes))
    return report


def read_report(path: str | Path) -> list[Variant]:
    """The variants of a ``report.json``."""
    d = _read_json(path, REPORT_FORMAT)
    return [Variant.from_dict(v) for v in d["variants"]]


def _removed_of_first_pruned(variants: Sequence[Variant], n: int) -> list[int]:
    for v in variants:
        if v.num_source_layers == n and v.removed_blocks:
            return v.removed_blocks
    return []


# --------------------------------------------------------------------------------- inputs
def _read_json(path: str | Path, fmt: str) -> dict[str, Any]:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {p}: {e}") from e
    if not isinstance(d, dict) or d.get("format") != fmt:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ReportError(f"{p}: format={got!r}, expected {fmt!r}")
    return d


def read_importance(path: str | Path) -> dict[str, Any]:
    """Block importance scores written by the prune command (``flexigpt-importance/1``).

    Raises:
        ReportError: unreadable, another format, or no list of scores.
    """
    d = _read_json(path, IMPORTANCE_FORMAT)
    if not isinstance(d.get("scores"), list) or not d["scores"]:
        raise ReportError(f"{path}: 'scores' must be a non-empty list (one score per block)")
    return d


def read_selection(path: str | Path) -> dict[str, Any]:
    """Base-selection distances and picks written by the prune command (``flexigpt-selection/1``).

    Raises:
        ReportError: unreadable, another format, or a distance matrix that is not square.
    """
    d = _read_json(path, SELECTION_FORMAT)
    dist = d.get("distances")
    if not isinstance(dist, list) or not dist or any(len(r) != len(dist) for r in dist):
        raise ReportError(f"{path}: 'distances' must be a square L x L matrix")
    d["picks"] = {int(k): int(v) for k, v in (d.get("picks") or {}).items()}
    d["removed"] = [int(b) for b in d.get("removed") or d["picks"]]
    return d


__all__ = [
    "DEFAULT_LOSS_TAGS",
    "ReportError",
    "SlotInfo",
    "Variant",
    "describe_model",
    "markdown_report",
    "markdown_table",
    "read_importance",
    "read_report",
    "read_scalars",
    "read_selection",
    "slot_map_text",
    "slots_from_plan",
    "write_report",
]
