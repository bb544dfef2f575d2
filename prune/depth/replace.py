"""Replacement plans: what a pruned model is made of, as a ``Plan`` (pure data).

Three kinds are registered by name in ``REPLACEMENTS`` (recipes refer to them by string):

- ``flexigpt``: every removed block i becomes a slot *at position i* that runs the weights of its
  base block (``SelectionResult.picks``), with rank-r adapters initialised from the SVD of
  ``W_i - W_base`` (eq. 7-8) and an output feature norm with a small gamma (eq. 6).
- ``shortgpt``: removed blocks are dropped (ShortGPT), kept blocks unchanged.
- ``shortgpt_lora``: ShortGPT, then a LoRA adapter on every kept block (the paper's stronger
  baseline "ShortGPT + LoRA").

The paper's ablations (Table 4) are switches of ``ReplacementOptions``, each changing exactly
what it names: ``svd_init`` (off: standard LoRA init), ``out_norm`` (off: no output norm) and
``low_rank_metric`` (off: bases chosen by the plain Frobenius distance; it only changes which
block each slot runs).

The output-norm gamma's other readings (measured from the slots' outputs, calibrated) live in
``flexigpt.prune.depth.gamma``; ``GammaCalibration`` and ``calibrate_gamma`` are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from flexigpt.prune.depth.gamma import GammaCalibration as GammaCalibration
from flexigpt.prune.depth.gamma import calibrate_gamma as calibrate_gamma
from flexigpt.prune.depth.selection import COMBINES, SVDS, BlockSource, SelectionResult, select_bases
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import TARGETS, AdapterSpec, OutNormSpec, Plan, PlanError, SlotSpec


@dataclass(frozen=True)
class ReplacementOptions:
    """How removed blocks are replaced; defaults are the paper's full method (see docs/pruning.md)."""

    rank: int = 256
    """Adapter rank of every replacement slot (paper: 256)."""
    targets: tuple[str, ...] = TARGETS
    """Linears that get adapters (paper's lost footnote; default all seven projections)."""
    alpha: float | None = None
    """LoRA alpha; None means alpha = rank (scale 1), so the SVD init is exact."""
    svd_init: bool = True
    """Ablation switch. On: adapters start as the top-r SVD of W_i - W_base (eq. 7-8).
    Off: they start as `init_without_svd` (the paper's "standard LoRA init" ablation)."""
    init_without_svd: str = "lora"
    """Adapter init when svd_init is off: lora (A random, B zero) or zero."""
    svd_init_method: str = "exact"
    """The SVD of the adapter init: exact (``torch.linalg.svd``) or randomized (``torch.svd_lowrank``)."""
    out_norm: bool = True
    """Ablation switch: an output feature norm on the attention and MLP outputs of every replacement slot."""
    gamma: float = 0.01
    """Initial gamma of the output norm (not reported by the paper; see calibrate_gamma)."""
    out_norm_eps: float = 1e-5
    """Output norm epsilon (not given by the paper)."""
    own_norms: bool = False
    """Replacement slots get private copies of the base block's input / post-attention norms
    (False: they share the base block's norm weights, ambiguity 15's reading)."""
    low_rank_metric: bool = True
    """Ablation switch. On: bases chosen by the low-rank metric (eq. 2). Off: plain Frobenius distance."""
    metric_rank: int = 256
    """r of the low-rank metric (paper: 256; clamped to each matrix's size)."""
    combine: str = "sum"
    """How per-matrix distances add up to a block distance: sum or sum_sq."""
    svd: str = "exact"
    """Factors of the metric: exact truncated SVD or randomized (torch.svd_lowrank)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise PlanError(f"rank={self.rank!r}: must be an integer >= 1")
        if not isinstance(self.metric_rank, int) or self.metric_rank < 1:
            raise PlanError(f"metric_rank={self.metric_rank!r}: must be an integer >= 1")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise PlanError(f"targets={list(self.targets)}: allowed a non-empty subset of {list(TARGETS)}")
        if self.init_without_svd not in ("lora", "zero"):
            raise PlanError(
                f"init_without_svd={self.init_without_svd!r} is unknown; allowed: ['lora', 'zero']"
            )
        if not self.gamma >= 0:
            raise PlanError(f"gamma={self.gamma!r}: must be >= 0")
        if not self.out_norm_eps > 0:
            raise PlanError(f"out_norm_eps={self.out_norm_eps!r}: must be > 0")
        if self.combine not in COMBINES:
            raise PlanError(f"combine={self.combine!r} is unknown; allowed: {list(COMBINES)}")
        if self.svd not in SVDS:
            raise PlanError(f"svd={self.svd!r} is unknown; allowed: {list(SVDS)}")
        if self.svd_init_method not in SVDS:
            raise PlanError(f"svd_init_method={self.svd_init_method!r} is unknown; allowed: {list(SVDS)}")


def choose_bases(
    source: BlockSource,
    removed: Sequence[int],
    options: ReplacementOptions,
    *,
    all_pairs: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SelectionResult:
    """Base selection as the options say (the ``low_rank_metric`` switch lives here).

    Args:
        source: block weights, read one block at a time.
        removed: blocks to replace.
        options: uses low_rank_metric, metric_rank, combine and svd.
        all_pairs: compute every pair (for a full heatmap).
        device: where the linear algebra runs.
        progress: tqdm bars.

    Returns:
        The selection result; ``picks`` feeds ``flexigpt_plan``.
    """
    return select_bases(
        source,
        removed,
        rank=options.metric_rank,
        metric="low_rank" if options.low_rank_metric else "frobenius",
        combine=options.combine,
        svd=options.svd,
        all_pairs=all_pairs,
        device=device,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------- plans


def flexigpt_plan(
    model_type: str,
    num_layers: int,
    picks: Mapping[int, int],
    options: ReplacementOptions | None = None,
    *,
    matrix_shapes: Mapping[str, tuple[int, int]] | None = None,
    notes: Mapping[str, Any] | None = None,
) -> Plan:
    """The FlexiGPT plan: slot i runs block picks[i] plus adapters and output norm, if i was removed.

    Args:
        model_type: source model_type (llama, mistral, qwen2).
        num_layers: source block count L; the plan keeps L slots.
        picks: removed block -> kept base block.
        options: replacement options (defaults: the paper's full method).
        matrix_shapes: (out, in) of each target (``get_layout(config).matrix_shapes(config)``);
            when given, the rank of a target smaller than it (GQA k/v of small models) is clamped
            to its size through ``rank_pattern``.
        notes: extra provenance stored in ``plan.notes``.

    Returns:
        A validated plan.

    Raises:
        PlanError: a pick names a removed block or a block out of range.
    """
    options = options or ReplacementOptions()
    removed = _check_removed(picks.keys(), num_layers)
    for i, j in picks.items():
        if j in removed or not 0 <= j < num_layers:
            raise PlanError(
                f"picks[{i}]={j}: a base must be a kept block in 0..{num_layers - 1}, not {sorted(removed)}"
            )
    svd = "svd" if options.svd_init_method == "exact" else "svd_randomized"
    init = svd if options.svd_init else options.init_without_svd
    slots = []
    for i in range(num_layers):
        if i not in removed:
            slots.append(SlotSpec(block=i))
            continue
        adapter = AdapterSpec(
            rank=options.rank,
            targets=tuple(options.targets),
            init=init,
            alpha=options.alpha,
            svd_from=i if options.svd_init else None,
            rank_pattern=_clamped_ranks(options.rank, options.targets, matrix_shapes),
        )
        norm = OutNormSpec(gamma=options.gamma, eps=options.out_norm_eps) if options.out_norm else None
        slots.append(SlotSpec(block=picks[i], adapter=adapter, out_norm=norm, own_norms=options.own_norms))
    meta = {
        "method": "flexigpt",
        "removed": sorted(removed),
        "picks": {str(i): picks[i] for i in sorted(picks)},
        "options": _options_dict(options),
        **dict(notes or {}),
    }
    return Plan(model_type, num_layers, tuple(slots), meta).validate()


def shortgpt_plan(
    model_type: str, num_layers: int, removed: Sequence[int], *, notes: Mapping[str, Any] | None = None
) -> Plan:
    """The ShortGPT plan: the removed blocks are simply dropped.

    Raises:
        PlanError: bad removed blocks.
    """
    gone = _check_removed(removed, num_layers)
    slots = tuple(SlotSpec(block=i) for i in range(num_layers) if i not in gone)
    return Plan(
        model_type, num_layers, slots, {"method": "shortgpt", "removed": sorted(gone), **dict(notes or {})}
    )


def shortgpt_lora_plan(
    model_type: str,
    num_layers: int,
    removed: Sequence[int],
    *,
    rank: int = 256,
    targets: Sequence[str] = TARGETS,
    alpha: float | None = None,
    init: str = "lora",
    matrix_shapes: Mapping[str, tuple[int, int]] | None = None,
    notes: Mapping[str, Any] | None = None,
) -> Plan:
    """ShortGPT + LoRA: the removed blocks are dropped and every kept block gets a LoRA adapter.

    Args:
        model_type: source model_type.
        num_layers: source block count.
        removed: blocks to drop.
        rank: LoRA rank (the paper does not give it; default the FlexiGPT rank).
        targets: adapted linears.
        alpha: LoRA alpha (None: alpha = rank).
        init: lora or zero (adapters start at zero either way, so the model starts as ShortGPT).
        matrix_shapes: target shapes; clamps the rank of smaller targets (see flexigpt_plan).
        notes: extra provenance stored in ``plan.notes``.

    Raises:
        PlanError: bad removed blocks, rank, targets or init.
    """
    if init not in ("lora", "zero"):
        raise PlanError(f"init={init!r} is unknown for shortgpt_lora; allowed: ['lora', 'zero']")
    gone = _check_removed(removed, num_layers)
    pattern = _clamped_ranks(rank, targets, matrix_shapes)
    adapter = AdapterSpec(rank=rank, targets=tuple(targets), init=init, alpha=alpha, rank_pattern=pattern)
    slots = tuple(SlotSpec(block=i, adapter=adapter) for i in range(num_layers) if i not in gone)
    meta = {"method": "shortgpt_lora", "removed": sorted(gone), **dict(notes or {})}
    return Plan(model_type, num_layers, slots, meta).validate()


# A builder: (source config, removed blocks or a selection, options) -> plan.
PlanBuilder = Callable[[Any, SelectionResult | Sequence[int], ReplacementOptions], Plan]


def _build_flexigpt(config: Any, chosen: Any, options: ReplacementOptions) -> Plan:
    if not isinstance(chosen, SelectionResult):
        raise PlanError("replacement 'flexigpt' needs a SelectionResult (run choose_bases first)")
    notes = {"selection": {"metric": chosen.metric, "rank": chosen.rank, "combine": chosen.combine}}
    return flexigpt_plan(
        config.model_type,
        config.num_hidden_layers,
        chosen.picks,
        options,
        matrix_shapes=get_layout(config).matrix_shapes(config),
        notes=notes,
    )


def _build_shortgpt(config: Any, chosen: Any, options: ReplacementOptions) -> Plan:
    return shortgpt_plan(config.model_type, config.num_hidden_layers, _removed_of(chosen))


def _build_shortgpt_lora(config: Any, chosen: Any, options: ReplacementOptions) -> Plan:
    return shortgpt_lora_plan(
        config.model_type,
        config.num_hidden_layers,
        _removed_of(chosen),
        rank=options.rank,
        targets=options.targets,
        alpha=options.alpha,
        init=options.init_without_svd,
        matrix_shapes=get_layout(config).matrix_shapes(config),
    )


def _removed_of(chosen: Any) -> list[int]:
    return list(chosen.removed) if isinstance(chosen, SelectionResult) else list(chosen)


REPLACEMENTS: dict[str, PlanBuilder] = {
    "flexigpt": _build_flexigpt,
    "shortgpt": _build_shortgpt,
    "shortgpt_lora": _build_shortgpt_lora,
}


def build_plan(
    kind: str,
    config: Any,
    chosen: SelectionResult | Sequence[int],
    options: ReplacementOptions | None = None,
) -> Plan:
    """Build a replacement plan by registered name, from the source config alone (no weights).

    Args:
        kind: flexigpt, shortgpt or shortgpt_lora.
        config: the source model's transformers config (model_type, layer count, matrix shapes).
        chosen: a SelectionResult (flexigpt needs one) or just the removed blocks (baselines).
        options: replacement options (the baselines use rank, targets, alpha, init_without_svd).

    Returns:
        The validated plan; adapter ranks above a target's size are clamped per target.

    Raises:
        PlanError: unknown kind (the message lists the registered ones) or bad input.
    """
    if kind not in REPLACEMENTS:
        raise PlanError(f"replacement={kind!r} is unknown; allowed: {list(REPLACEMENTS)}")
    return REPLACEMENTS[kind](config, chosen, options or ReplacementOptions())


def _check_removed(removed: Any, num_layers: int) -> set[int]:
    gone = set(removed)
    if (
        not gone
        or len(gone) >= num_layers
        or any(not isinstance(b, int) or not 0 <= b < num_layers for b in gone)
    ):
        raise PlanError(
            f"removed={sorted(gone, key=str)}: need 1..{num_layers - 1} distinct blocks in 0..{num_layers - 1}"
        )
    return gone


def _clamped_ranks(
    rank: int, targets: Sequence[str], shapes: Mapping[str, tuple[int, int]] | None
) -> dict[str, int]:
    # A rank above min(out, in) adds nothing (the SVD has no more components), so clamp per target.
    return {t: min(shapes[t]) for t in targets if shapes and rank > min(shapes[t])}


def _options_dict(options: ReplacementOptions) -> dict[str, Any]:
    d = asdict(options)
    d["targets"] = list(d["targets"])
    return d
