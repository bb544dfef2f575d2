"""Expansion strategies: where the new depth positions go and what they start as. Pure data.

Growing a model of ``L`` blocks picks a *span* of source blocks (``start..end`` inclusive, every
``stride``-th block) and adds ``repeat`` copies of each block of the span. Two orders exist (the paper's
§3.5; docs/method.md, section 2):

- **block**: each block of the span is followed by its copies (3, 3', 4, 4', ...);
- **sequential**: the whole span is repeated as a unit after its last block (3..k, 3'..k').

Four strategies are registered by name in ``STRATEGIES``:

- ``block`` / ``sequential`` (FlexiGPT): the copies are *slots* of a shared-block ``Plan``. A copy
  runs its source block's Parameters (stored once) through its own adapters, its own norms and an
  output feature norm; the first occurrence of every block stays the original block, unchanged.
- ``llama_pro`` / ``stack`` (dense baselines): the copies are private deep copies of the source
  block in a plain model (``DensePlan``). LLaMA-Pro zeroes o_proj and down_proj of each copy, so a
  copy is an identity map at init, and trains only the copies; ``stack`` is mergekit's
  passthrough (copies as they are, everything trains). Their ``placement`` picks the block or
  sequential order (LLaMA-Pro's own layout, a copy after every k-th block, is ``placement=block``
  with ``stride=k``).

A strategy is a function ``(model_type, num_layers, options) -> Plan | DensePlan``; nothing here
touches weights or imports torch, so every plan is testable from a config alone.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, PlanError, SlotSpec
from flexigpt.shared.files import write_text_atomic

DENSE_PLAN_FORMAT = "flexigpt-dense-plan/1"
PLACEMENTS: tuple[str, ...] = ("block", "sequential")
# How the inserted copies of a dense plan start: `zero_out` zeroes o_proj and down_proj (weights
# and biases: the copy adds nothing to the residual stream, LLaMA-Pro), `copy` keeps them as is.
DENSE_INITS: tuple[str, ...] = ("zero_out", "copy")
# What trains in a dense grown model: `inserted` = the inserted copies only (LLaMA-Pro freezes the
# original blocks, embeddings, final norm and head), `all` = every parameter.
DENSE_TRAINABLE: tuple[str, ...] = ("inserted", "all")


class GrowError(PlanError):
    """Growth options that do not fit the model; the message names the recipe key (``grow.*``)."""


@dataclass(frozen=True)
class GrowOptions:
    """Everything a strategy needs besides the source depth (the ``grow:`` recipe section, resolved)."""

    start: int = 3
    """First block of the span (0-based)."""
    end: int | None = 16
    """Last block of the span, inclusive; None: derived from ``target_layers``."""
    stride: int = 1
    """Every ``stride``-th block of start..end is repeated."""
    repeat: int = 1
    """Copies added per repeated block."""
    target_layers: int | None = None
    """Depth the result must have; checked when given (needed when ``end`` is None)."""
    adapter: AdapterSpec | None = None
    """Adapters of every copy (shared strategies)."""
    out_norm: OutNormSpec | None = None
    """Output feature norm of every copy (shared strategies)."""
    own_norms: bool = True
    """Copies own their input / post-attention norms (shared strategies)."""
    placement: str = "block"
    """block | sequential: where the copies go (dense strategies)."""


@dataclass(frozen=True)
class DensePlan:
    """A grown plain model: every layer a private copy of a source block."""

    model_type: str
    """transformers model_type of the source model."""
    num_source_layers: int
    """Blocks of the source model."""
    order: tuple[int, ...]
    """Source block of every layer, bottom to top."""
    inserted: tuple[int, ...]
    """Layer positions that are inserted copies (the other layers are the source blocks themselves)."""
    init: str = "copy"
    """How inserted copies start (see DENSE_INITS)."""
    trainable: str = "all"
    """What trains (see DENSE_TRAINABLE)."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (strategy, span, ...)."""

    @property
    def num_layers(self) -> int:
        return len(self.order)

    def validate(self) -> DensePlan:
        """Check the plan; raise GrowError naming the field and what is allowed."""
        last = self.num_source_layers - 1
        bad = [b for b in self.order if not 0 <= b <= last]
        if bad:
            raise GrowError(f"order: blocks {bad} are out of range: allowed 0..{last}")
        originals = [b for i, b in enumerate(self.order) if i not in set(self.inserted)]
        if originals != list(range(self.num_source_layers)):
            raise GrowError(
                f"order/inserted: the non-inserted layers must be the source blocks 0..{last} in order, "
                f"got {originals}"
            )
        if self.init not in DENSE_INITS:
            raise GrowError(f"init={self.init!r} is unknown; allowed: {list(DENSE_INITS)}")
        if self.trainable not in DENSE_TRAINABLE:
            raise GrowError(f"trainable={self.trainable!r} is unknown; allowed: {list(DENSE_TRAINABLE)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(format=DENSE_PLAN_FORMAT, order=list(self.order), inserted=list(self.inserted))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DensePlan:
        d = dict(d)
        fmt = d.pop("format", None)
        if fmt != DENSE_PLAN_FORMAT:
            raise GrowError(f"format={fmt!r} is not a dense plan: allowed {DENSE_PLAN_FORMAT!r}")
        allowed = {"model_type", "num_source_layers", "order", "inserted", "init", "trainable", "notes"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise GrowError(f"dense plan: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        d["order"], d["inserted"] = tuple(d["order"]), tuple(d["inserted"])
        return cls(**d).validate()

    @classmethod
    def load(cls, path: str | Path) -> DensePlan:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        """A readable one-line-per-layer table."""
        ins = set(self.inserted)
        lines = [
            f"dense plan: {self.model_type}, {self.num_layers} layers from {self.num_source_layers} "
            f"(+{len(self.inserted)} copies, init={self.init}, trainable={self.trainable})"
        ]
        for i, b in enumerate(self.order):
            tag = f"copy ({self.init})" if i in ins else ""
            lines.append(f"  layer {i:3d} <- block {b:3d}  {tag}".rstrip())
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the span and the two orders
# ---------------------------------------------------------------------------------------------
def resolve_span(num_layers: int, opts: GrowOptions) -> tuple[int, ...]:
    """The source blocks that get copies, after checking start / end / stride / repeat / target.

    Args:
        num_layers: blocks of the source model.
        opts: the growth options.

    Returns:
        The repeated blocks, ascending.

    Raises:
        GrowError: a bad value; the message names the ``grow.*`` key and what is allowed.
    """
    last = num_layers - 1
    if opts.repeat < 1:
        raise GrowError(f"grow.repeat={opts.repeat}: must be >= 1")
    if opts.stride < 1:
        raise GrowError(f"grow.stride={opts.stride}: must be >= 1")
    if not 0 <= opts.start <= last:
        raise GrowError(
            f"grow.start={opts.start} is out of range: allowed 0..{last} (the source has {num_layers})"
        )
    end = opts.end
    if end is None:
        if opts.target_layers is None:
            raise GrowError(
                "grow.end is null: set grow.end or grow.target_layers (the span is derived from it)"
            )
        new = opts.target_layers - num_layers
        if new < 1 or new % opts.repeat:
            raise GrowError(
                f"grow.target_layers={opts.target_layers}: needs a positive multiple of grow.repeat={opts.repeat} "
                f"new layers over the source's {num_layers}, got {new}"
            )
        end = opts.start + (new // opts.repeat - 1) * opts.stride
    if not opts.start <= end <= last:
        raise GrowError(
            f"grow.end={end} is out of range: allowed {opts.start}..{last} (grow.start..last block)"
        )
    span = tuple(range(opts.start, end + 1, opts.stride))
    depth = num_layers + len(span) * opts.repeat
    if opts.target_layers is not None and depth != opts.target_layers:
        raise GrowError(
            f"grow.target_layers={opts.target_layers}, but span {opts.start}..{end} (stride {opts.stride}: "
            f"{len(span)} blocks) x repeat {opts.repeat} gives {num_layers} + {len(span) * opts.repeat} = {depth} "
            f"layers; for {opts.target_layers} set grow.end={opts.start + ((opts.target_layers - num_layers) // opts.repeat - 1) * opts.stride} "
            "(when that divides) or grow.end=null"
        )
    return span


def grown_order(
    num_layers: int, span: tuple[int, ...], repeat: int, pattern: str
) -> tuple[tuple[int, int], ...]:
    """(source block, copy number) of every layer; copy 0 is the original block.

    Args:
        num_layers: blocks of the source model.
        span: the repeated blocks (ascending).
        repeat: copies per repeated block.
        pattern: ``block`` (each block followed by its copies) or ``sequential`` (the span, then its
            copies as a unit after the span's last block, ``repeat`` times).

    Returns:
        One (block, copy) pair per layer of the grown model, bottom to top.
    """
    if pattern not in PLACEMENTS:
        raise GrowError(f"pattern {pattern!r} is unknown; allowed: {list(PLACEMENTS)}")
    reps = set(span)
    out: list[tuple[int, int]] = []
    for b in range(num_layers):
        out.append((b, 0))
        if pattern == "block" and b in reps:
            out.extend((b, c) for c in range(1, repeat + 1))
        if pattern == "sequential" and span and b == span[-1]:
            for c in range(1, repeat + 1):
                out.extend((s, c) for s in span)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
Strategy = Callable[[str, int, GrowOptions], "Plan | DensePlan"]


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy: its function and whether it builds a shared or a dense model."""

    fn: Strategy
    kind: str
    """``shared`` (returns a Plan) or ``dense`` (returns a DensePlan)."""
    doc: str


STRATEGIES: dict[str, StrategyInfo] = {}
_SIGNATURE = ("model_type", "num_layers", "opts")


def register_strategy(name: str, kind: str) -> Callable[[Strategy], Strategy]:
    """Register an expansion strategy under `name` (decorator); checks the signature.

    Args:
        name: the value of ``grow.strategy`` that selects it.
        kind: ``shared`` or ``dense``.

    Raises:
        GrowError: the name is taken, the kind is unknown or the function's parameters are not
            ``(model_type, num_layers, opts)``.
    """
    if kind not in ("shared", "dense"):
        raise GrowError(f"strategy kind {kind!r} is unknown; allowed: ['shared', 'dense']")

    def deco(fn: Strategy) -> Strategy:
        params = tuple(inspect.signature(fn).parameters)
        if params != _SIGNATURE:
            raise GrowError(f"strategy {name!r}: parameters must be {_SIGNATURE}, got {params}")
        if name in STRATEGIES and STRATEGIES[name].fn is not fn:
            raise GrowError(f"strategy {name!r} is already registered")
        STRATEGIES[name] = StrategyInfo(fn, kind, inspect.getdoc(fn) or "")
        return fn

    return deco


def get_strategy(name: str) -> StrategyInfo:
    """The strategy registered as `name`; an unknown name lists the valid ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise GrowError(f"grow.strategy={name!r} is unknown; allowed: {sorted(STRATEGIES)}") from None


def build_plan(name: str, model_type: str, num_layers: int, opts: GrowOptions) -> Plan | DensePlan:
    """Run strategy `name` and check that the result has the target depth.

    Args:
        name: a registered strategy.
        model_type: transformers model_type of the source.
        num_layers: blocks of the source.
        opts: the growth options.

    Returns:
        A validated Plan (shared strategies) or DensePlan (dense ones).
    """
    plan = get_strategy(name).fn(model_type, num_layers, opts)
    depth = plan.num_slots if isinstance(plan, Plan) else plan.num_layers
    if opts.target_layers is not None and depth != opts.target_layers:
        raise GrowError(f"grow.target_layers={opts.target_layers}: strategy {name!r} built {depth} layers")
    return plan


def _notes(name: str, num_layers: int, opts: GrowOptions, span: tuple[int, ...]) -> dict[str, Any]:
    return {
        "method": "grow",
        "strategy": name,
        "span": list(span),
        "start": opts.start,
        "end": span[-1],
        "stride": opts.stride,
        "repeat": opts.repeat,
        "source_layers": num_layers,
    }


def _shared(name: str, pattern: str, model_type: str, num_layers: int, opts: GrowOptions) -> Plan:
    span = resolve_span(num_layers, opts)
    slots = tuple(
        SlotSpec(b)
        if c == 0
        else SlotSpec(b, adapter=opts.adapter, out_norm=opts.out_norm, own_norms=opts.own_norms)
        for b, c in grown_order(num_layers, span, opts.repeat, pattern)
    )
    return Plan(model_type, num_layers, slots, _notes(name, num_layers, opts, span)).validate()


def _dense(
    name: str, init: str, trainable: str, model_type: str, num_layers: int, opts: GrowOptions
) -> DensePlan:
    span = resolve_span(num_layers, opts)
    order = grown_order(num_layers, span, opts.repeat, opts.placement)
    notes = {**_notes(name, num_layers, opts, span), "placement": opts.placement}
    return DensePlan(
        model_type,
        num_layers,
        tuple(b for b, _ in order),
        tuple(i for i, (_, c) in enumerate(order) if c > 0),
        init,
        trainable,
        notes,
    ).validate()


@register_strategy("block", "shared")
def block(model_type: str, num_layers: int, opts: GrowOptions) -> Plan:
    """FlexiGPT Block pattern: each span block followed by its shared copies (3, 3', 4, 4', ...)."""
    return _shared("block", "block", model_type, num_layers, opts)


@register_strategy("sequential", "shared")
def sequential(model_type: str, num_layers: int, opts: GrowOptions) -> Plan:
    """FlexiGPT Sequential pattern: the span, then its shared copies as a unit (3..k, 3'..k')."""
    return _shared("sequential", "sequential", model_type, num_layers, opts)


@register_strategy("llama_pro", "dense")
def llama_pro(model_type: str, num_layers: int, opts: GrowOptions) -> DensePlan:
    """LLaMA-Pro: dense copies with o_proj / down_proj zeroed (identity at init); only copies train."""
    return _dense("llama_pro", "zero_out", "inserted", model_type, num_layers, opts)


@register_strategy("stack", "dense")
def stack(model_type: str, num_layers: int, opts: GrowOptions) -> DensePlan:
    """Plain stacking (mergekit passthrough): dense copies as they are; everything trains."""
    return _dense("stack", "copy", "all", model_type, num_layers, opts)


def solar_options(num_layers: int, opts: GrowOptions) -> GrowOptions:
    """The span of SOLAR depth up-scaling: two copies of an ``n``-block model, the last ``m`` blocks of
    the first and the first ``m`` of the second dropped, concatenated. That is blocks ``m .. n-1-m``
    repeated once as a unit after block ``n-1-m`` (the sequential order), ``2n - 2m`` layers.

    ``m`` comes from ``grow.target_layers`` (``m = (2n - target) / 2``) or else from ``grow.start``.

    Raises:
        GrowError: the values do not describe a SOLAR map; the message gives the ones that do.
    """
    if opts.stride != 1 or opts.repeat != 1:
        raise GrowError(f"grow.stride={opts.stride}, grow.repeat={opts.repeat}: SOLAR takes 1 and 1")
    if opts.target_layers is not None:
        extra = opts.target_layers - num_layers
        if not 0 < extra < num_layers or (num_layers - extra) % 2:
            raise GrowError(
                f"grow.target_layers={opts.target_layers}: SOLAR makes 2n - 2m layers from n={num_layers}, an "
                f"even number in {num_layers + 1}..{2 * num_layers - 2} whose excess over n has n's parity"
            )
        m = (num_layers - extra) // 2
    else:
        m = opts.start
    end = num_layers - 1 - m
    if not 1 <= m < end + 1:
        raise GrowError(
            f"grow.start={m}: SOLAR's m must be 1..{(num_layers - 1) // 2} for {num_layers} blocks"
        )
    if opts.end is not None and (opts.start, opts.end) != (m, end):
        raise GrowError(
            f"grow.start={opts.start}, grow.end={opts.end}: SOLAR with m={m} repeats blocks {m}..{end}; set "
            f"grow.start={m} grow.end={end}, or grow.end=null with grow.target_layers"
        )
    return GrowOptions(
        start=m,
        end=end,
        adapter=opts.adapter,
        out_norm=opts.out_norm,
        own_norms=opts.own_norms,
        placement="sequential",
    )


@register_strategy("solar", "dense")
def solar(model_type: str, num_layers: int, opts: GrowOptions) -> DensePlan:
    """SOLAR depth up-scaling: two dense copies joined at a seam, m blocks dropped from each side."""
    plan = _dense("solar", "copy", "all", model_type, num_layers, solar_options(num_layers, opts))
    plan.notes["m"] = plan.notes["start"]
    return plan


@register_strategy("solar_shared", "shared")
def solar_shared(model_type: str, num_layers: int, opts: GrowOptions) -> Plan:
    """SOLAR's map through the engine: the second copy's blocks are slots over the first's (stored once)."""
    resolved = solar_options(num_layers, opts)
    if resolved.out_norm is not None:
        raise GrowError(
            "grow.out_norm: SOLAR's copies start as exact copies, which an output norm would damp; set "
            "grow.out_norm=null (the damped variant of this span is strategy=sequential)"
        )
    plan = _shared("solar_shared", "sequential", model_type, num_layers, resolved)
    plan.notes["m"] = resolved.start
    return plan
