"""The search space (GPTailor's, as its released code encodes it) and the heuristic warm starts.

A configuration is, per Optuna trial:

- ``remove_idx_k`` (k < n): the base layers removed, integers in [0, L); a duplicate is moved to
  the next free layer upward (GPTailor forbids duplicates with SMAC clauses, which Optuna lacks);
- where each kept layer i comes from, in one of two encodings (``encoding``):
  ``flags`` (GPTailor's): ``layer_i_candidate_j`` in {0, 1} for every variant j; none selected takes
  the base layer, one takes that variant's layer, several merge them onto the base layer.
  ``source`` (the default): one categorical ``layer_i_source`` over ``base``, each variant, and each
  set of two or more variants (``colour+home``: merged). Both encode the same configurations, but
  TPE models a categorical as one distribution over its values, so "layer 0 from colour" is one
  value it can learn; with flags it is a pair of flags, and a good pair is spread over the
  densities of both, next to the merge that sets both;
- ``layer_i_merge_scale`` in the scale range (and ``layer_i_merge_method`` when several methods
  are allowed), only where several variants are selected;
- ``layer_i_output_scale`` in [0, 2], only when the option is on.

That conditional space (``conditional=True``) is GPTailor's, made for SMAC's random forest. TPE
models the parameters that every trial shares jointly and splits the rest into groups seen in
fewer trials, so the default is a flat space: every parameter is drawn in every trial and ignored
where it does not apply (the candidates of a removed layer, the scale of a layer that merges
nothing). Both encode the same configurations.

On the tiny setting of the tests the source encoding is what lets TPE leave a deceptive plateau
and beat random search (docs/tailor.md, "Measured on the tiny setting").
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flexigpt.prune.tailor.stitch import MergeSpec, Position, StitchPlan


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of the search."""

    num_layers: int
    n_remove: int
    variants: tuple[str, ...]
    methods: tuple[str, ...] = ("task_arithmetic",)
    scale_range: tuple[float, float] = (0.0, 1.0)
    output_scale: bool = False
    conditional: bool = False
    """GPTailor's conditional parameters (True) or the flat space (False, see the module docstring)."""
    encoding: str = "source"
    """``flags``: GPTailor's one {0, 1} flag per variant and position; ``source``: one categorical per
    position over base, each variant and each merged set of variants (see the module docstring)."""

    def choices(self) -> list[str]:
        """The values of ``layer_i_source``: base, each variant, each set of two or more variants."""
        sets = [c for r in range(2, len(self.variants) + 1) for c in itertools.combinations(self.variants, r)]
        return ["base", *self.variants, *("+".join(c) for c in sets)]

    def _chosen(self, trial: Any, i: int) -> tuple[str, ...]:
        if self.encoding == "source":
            c = trial.suggest_categorical(f"layer_{i}_source", self.choices())
            return () if c == "base" else tuple(c.split("+"))
        return tuple(
            v
            for j, v in enumerate(self.variants)
            if trial.suggest_categorical(f"layer_{i}_candidate_{j}", [0, 1])
        )

    def suggest(self, trial: Any) -> StitchPlan:
        """The plan of an Optuna trial (define-by-run: conditional parameters only where they apply)."""
        removed: list[int] = []
        for k in range(self.n_remove):
            r = trial.suggest_int(f"remove_idx_{k}", 0, self.num_layers - 1)
            while r in removed:  # repair a duplicate deterministically: the next free layer upward
                r = (r + 1) % self.num_layers
            removed.append(r)
        positions = []
        flat = not self.conditional
        for i in range(self.num_layers):
            if i in removed and not flat:
                continue
            chosen = self._chosen(trial, i)
            out = trial.suggest_float(f"layer_{i}_output_scale", 0.0, 2.0) if self.output_scale else None
            method, scale = self.methods[0], None
            if len(chosen) > 1 or flat:
                if len(self.methods) > 1:
                    method = trial.suggest_categorical(f"layer_{i}_merge_method", list(self.methods))
                scale = trial.suggest_float(f"layer_{i}_merge_scale", *self.scale_range)
            if i in removed:
                continue
            if not chosen:
                positions.append(Position(i, "base", None, out))
            elif len(chosen) == 1:
                positions.append(Position(i, chosen[0], None, out))
            else:
                assert scale is not None
                positions.append(Position(i, "merge", MergeSpec(method, chosen, scale), out))
        return StitchPlan(self.num_layers, tuple(positions))

    def params(self, plan: StitchPlan) -> dict[str, Any]:
        """The trial parameters that `suggest` turns into `plan` (for enqueueing a configuration)."""
        p: dict[str, Any] = {f"remove_idx_{k}": r for k, r in enumerate(plan.removed)}
        if not self.conditional:  # the flat space draws every parameter: neutral values where unused
            lo, hi = self.scale_range
            for i in range(self.num_layers):
                if self.encoding == "source":
                    p[f"layer_{i}_source"] = "base"
                for j in range(len(self.variants) if self.encoding == "flags" else 0):
                    p[f"layer_{i}_candidate_{j}"] = 0
                if len(self.methods) > 1:
                    p[f"layer_{i}_merge_method"] = self.methods[0]
                p[f"layer_{i}_merge_scale"] = (lo + hi) / 2
                if self.output_scale:
                    p[f"layer_{i}_output_scale"] = 1.0
        for pos in plan.positions:
            i = pos.layer
            chosen = pos.merge.variants if pos.merge else (() if pos.source == "base" else (pos.source,))
            if self.encoding == "source":
                p[f"layer_{i}_source"] = "+".join(v for v in self.variants if v in chosen) or "base"
            for j, v in enumerate(self.variants if self.encoding == "flags" else ()):
                p[f"layer_{i}_candidate_{j}"] = int(v in chosen)
            if pos.merge is not None:
                if len(self.methods) > 1:
                    p[f"layer_{i}_merge_method"] = pos.merge.method
                p[f"layer_{i}_merge_scale"] = pos.merge.scale
            if self.output_scale:
                p[f"layer_{i}_output_scale"] = 1.0 if pos.output_scale is None else pos.output_scale
        return p


# --------------------------------------------------------------------------------- removal orders
def removal_order(name: str, num_layers: int, scores: Sequence[float] | None = None) -> list[int]:
    """Base layers in the order a heuristic removes them.

    - top: the highest layers first, the last layer kept (it maps to the vocabulary);
    - middle: from the middle outward (mid, mid + 1, mid - 1, ...), first and last kept;
    - alternating: high and low in turn (L - 2, 1, L - 3, 2, ...), first and last kept;
    - block_influence: lowest Block Influence first (ShortGPT), from `scores`.
    """
    L = num_layers
    if name == "top":
        return list(range(L - 2, -1, -1)) + [L - 1]
    if name == "middle":
        mid = (L - 1) // 2
        order = [mid]
        for d in range(1, L):
            order += [x for x in (mid + d, mid - d) if 0 < x < L - 1]
        return order + [0, L - 1]
    if name == "alternating":
        lo, hi, order = 1, L - 2, []
        while lo <= hi:
            order.append(hi)
            if lo != hi:
                order.append(lo)
            lo, hi = lo + 1, hi - 1
        return order + [0, L - 1]
    if name == "block_influence":
        if scores is None or len(scores) != L:
            raise ValueError("block_influence: needs one score per layer")
        return sorted(range(L), key=lambda i: (scores[i], i))
    raise ValueError(f"heuristic {name!r} is unknown; allowed: top, middle, alternating, block_influence")


def removal_plan(space: SearchSpace, removed: Sequence[int], fill: str = "base") -> StitchPlan:
    """Every layer but `removed` kept, all from `fill`."""
    gone = set(removed)
    pos = tuple(Position(i, fill) for i in range(space.num_layers) if i not in gone)
    return StitchPlan(space.num_layers, pos)


def warm_starts(
    space: SearchSpace, orders: dict[str, list[int]], merge_scales: Sequence[float]
) -> list[tuple[str, StitchPlan]]:
    """GPTailor's warm start: for each removal order, all-base, each single variant everywhere, and
    each multi-variant pattern merged everywhere (with the first merge method) at each scale.

    Returns:
        (label, plan) pairs, duplicates dropped, in a fixed order.
    """
    out: list[tuple[str, StitchPlan]] = []
    seen: set[Any] = set()
    patterns = [
        c for r in range(2, len(space.variants) + 1) for c in itertools.combinations(space.variants, r)
    ]

    def add(label: str, plan: StitchPlan) -> None:
        key = (plan.positions, plan.top)
        if key not in seen:
            seen.add(key)
            out.append((label, plan))

    for name, order in orders.items():
        removed = sorted(order[: space.n_remove])
        base = removal_plan(space, removed)
        add(f"{name}/base", base)
        for v in space.variants:
            add(f"{name}/{v}", removal_plan(space, removed, v))
        for pattern in patterns:
            for s in merge_scales:
                lo, hi = space.scale_range
                s = min(max(s, lo), hi)
                m = MergeSpec(space.methods[0], pattern, float(s))
                pos = tuple(Position(p.layer, "merge", m) for p in base.positions)
                add(f"{name}/{'+'.join(pattern)}@{s:g}", StitchPlan(space.num_layers, pos))
    return out
