"""The slot plan: pure data describing a shared-block model.

A model is a stack of *slots* (depth positions). Every slot runs the weights of one *physical
block*, named by its index in the source model. Several slots may run the same block; the block's
Parameters are then stored once and referenced by each slot. A slot may add its own low-rank
adapters, its own copies of the block's input / post-attention norms, and an output feature norm
(a bias-free LayerNorm on the attention output and on the MLP output, before the residual add).

Plans are computed from a model config and a recipe without touching weights, printed, validated
and saved as ``plan.json`` beside every model and checkpoint. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flexigpt.shared.files import write_text_atomic

PLAN_FORMAT = "flexigpt-plan/1"

# Short names of the linear layers an adapter may target. The architecture layout maps each to a
# module path inside a decoder layer (e.g. "q" -> "self_attn.q_proj").
TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

# How a slot's adapters start:
#   zero  - both factors zero (the adapter adds nothing; gradients start at zero too),
#   lora  - standard LoRA: A Kaiming-uniform, B zero (adds nothing, trains from step one),
#   svd   - the paper's eq. 7-8: the top-`rank` SVD factors of (W_svd_from - W_block), scaled so
#           W_block + scale * B @ A equals W_block + rank-r(W_svd_from - W_block) exactly.
ADAPTER_INITS: tuple[str, ...] = ("zero", "lora", "svd", "svd_randomized")
SVD_INITS: tuple[str, ...] = ("svd", "svd_randomized")
"""The inits that read a source block (``svd_from``): exact or randomized (torch.svd_lowrank) top-r SVD."""


class PlanError(ValueError):
    """A plan is malformed or does not fit the model; the message names the field."""


@dataclass(frozen=True)
class AdapterSpec:
    """Low-rank adapters on some linear layers of one slot."""

    rank: int
    """Adapter rank r (1 <= r <= min(out, in) of every targeted matrix)."""
    targets: tuple[str, ...] = TARGETS
    """Linear layers that get an adapter: any of q, k, v, o, gate, up, down."""
    init: str = "lora"
    """zero | lora | svd | svd_randomized (see ADAPTER_INITS)."""
    alpha: float | None = None
    """LoRA alpha; the adapter output is scaled by alpha / rank. None means alpha = rank (scale 1)."""
    svd_from: int | None = None
    """For init=svd / svd_randomized: the source block i whose weights the adapter approximates (W_i - W_block)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-target rank overrides (as peft's rank_pattern), e.g. {"k": 8, "v": 8} for GQA k/v."""

    def rank_for(self, target: str) -> int:
        """The rank of the adapter on `target`."""
        return self.rank_pattern.get(target, self.rank)

    def scaling_for(self, target: str) -> float:
        """The factor on the adapter output: alpha / rank of that target (1 when alpha is None)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank_for(target)


@dataclass(frozen=True)
class OutNormSpec:
    """Output feature normalisation (paper eq. 6): h -> (h - mean) / std * gamma, no bias."""

    gamma: float = 0.01
    """Initial value of every entry of gamma (hidden-size vector, learnable). 0 silences the slot."""
    eps: float = 1e-5
    """LayerNorm epsilon."""


@dataclass(frozen=True)
class SlotSpec:
    """One depth position of the model."""

    block: int
    """Index (in the source model) of the physical block whose weights this slot runs."""
    adapter: AdapterSpec | None = None
    """Low-rank adapters of this slot, or None."""
    out_norm: OutNormSpec | None = None
    """Output feature norm of this slot, or None."""
    own_norms: bool = False
    """True: the slot has private copies of the input and post-attention norms, initialised from
    block ``adapter.svd_from`` when set (the block the slot replaces), else from ``block``.
    False: it uses the block's own norm Parameters (shared)."""

    @property
    def is_plain(self) -> bool:
        """A plain slot runs its block unchanged (no adapters, no output norm, shared norms)."""
        return self.adapter is None and self.out_norm is None and not self.own_norms


@dataclass(frozen=True)
class BlockShape:
    """Sizes of a physical block that is narrower than the source config says (structured pruning).

    Removed MLP units and attention heads leave a block with fewer of them; its matrices are stored
    at that size. The head dimension and the hidden size never change.
    """

    intermediate_size: int
    """MLP units kept (rows of gate / up, columns of down)."""
    num_attention_heads: int
    """Query heads kept (rows of q, columns of o, in head_dim units)."""
    num_key_value_heads: int
    """Key / value heads kept; num_attention_heads must be a multiple of it."""


@dataclass(frozen=True)
class Plan:
    """The slot stack of a shared-block model."""

    model_type: str
    """transformers model_type of the source model (llama, mistral, qwen2, opt)."""
    num_source_layers: int
    """Number of decoder blocks of the source model."""
    slots: tuple[SlotSpec, ...]
    """The slots, bottom to top."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (how the plan was made: method, scores, ratio, ...). Not interpreted."""
    block_shapes: dict[int, BlockShape] = field(default_factory=dict)
    """Physical blocks stored narrower than the source config (block -> its sizes); absent: full size."""

    # ------------------------------------------------------------------ derived views
    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def physical_blocks(self) -> tuple[int, ...]:
        """Source blocks that are stored (referenced by at least one slot), in source order."""
        return tuple(sorted({s.block for s in self.slots}))

    @property
    def removed_blocks(self) -> tuple[int, ...]:
        """Source blocks that no slot runs (not stored)."""
        used = set(self.physical_blocks)
        return tuple(b for b in range(self.num_source_layers) if b not in used)

    def owner_slot(self, block: int) -> int:
        """The first slot that runs `block`; its module holds the block's Parameters."""
        for i, s in enumerate(self.slots):
            if s.block == block:
                return i
        raise PlanError(f"block {block} is not used by any slot")

    def reusing_slots(self) -> tuple[int, ...]:
        """Slots that run a block some earlier slot already runs."""
        seen: set[int] = set()
        out = []
        for i, s in enumerate(self.slots):
            if s.block in seen:
                out.append(i)
            seen.add(s.block)
        return tuple(out)

    def is_identity(self) -> bool:
        return self.num_slots == self.num_source_layers and all(
            s.block == i and s.is_plain for i, s in enumerate(self.slots)
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, model_type: str, num_layers: int) -> Plan:
        """Every source block in its place, unchanged."""
        return cls(model_type, num_layers, tuple(SlotSpec(block=i) for i in range(num_layers)))

    # ------------------------------------------------------------------ validation
    def validate(self, matrix_shapes: dict[str, tuple[int, int]] | None = None) -> Plan:
        """Check the plan; raise PlanError naming the offending field and what is allowed.

        Args:
            matrix_shapes: optional (out, in) shape of each target linear (short name -> shape),
                used to bound adapter ranks; its keys are the targets the architecture has.

        Returns:
            The plan itself, so calls can be chained.

        Raises:
            PlanError: on the first problem found.
        """
        if self.num_source_layers < 1:
            raise PlanError(f"num_source_layers must be >= 1, got {self.num_source_layers}")
        if not self.slots:
            raise PlanError("slots: a plan needs at least one slot")
        last = self.num_source_layers - 1
        for i, s in enumerate(self.slots):
            where = f"slots[{i}]"
            if not isinstance(s.block, int) or not 0 <= s.block <= last:
                raise PlanError(f"{where}.block={s.block!r} is out of range: allowed 0..{last}")
            if s.adapter is not None:
                _validate_adapter(s.adapter, f"{where}.adapter", last, matrix_shapes)
            if s.out_norm is not None:
                if not s.out_norm.gamma >= 0:
                    raise PlanError(f"{where}.out_norm.gamma={s.out_norm.gamma!r}: must be >= 0")
                if not s.out_norm.eps > 0:
                    raise PlanError(f"{where}.out_norm.eps={s.out_norm.eps!r}: must be > 0")
        for b, shape in self.block_shapes.items():
            where = f"block_shapes[{b}]"
            if b not in self.physical_blocks:
                raise PlanError(
                    f"{where}: block {b} is not run by any slot; allowed {list(self.physical_blocks)}"
                )
            sizes = (shape.intermediate_size, shape.num_attention_heads, shape.num_key_value_heads)
            if not all(isinstance(n, int) and n >= 1 for n in sizes):
                raise PlanError(f"{where}={shape}: every size must be an integer >= 1")
            if shape.num_attention_heads % shape.num_key_value_heads:
                raise PlanError(
                    f"{where}: num_attention_heads={shape.num_attention_heads} is not a multiple of "
                    f"num_key_value_heads={shape.num_key_value_heads}"
                )
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = PLAN_FORMAT
        d["slots"] = list(d["slots"])
        # JSON keys are strings; a plan without narrowed blocks keeps its old form
        shapes = d.pop("block_shapes")
        if shapes:
            d["block_shapes"] = {str(b): v for b, v in sorted(shapes.items())}
        for s in d["slots"]:
            if s["adapter"] is not None:
                s["adapter"]["targets"] = list(s["adapter"]["targets"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        d = dict(d)
        fmt = d.pop("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise PlanError(f"format={fmt!r} is not supported: allowed {PLAN_FORMAT!r}")
        _check_keys(d, {"model_type", "num_source_layers", "slots", "notes", "block_shapes"}, "plan")
        slots = []
        for i, s in enumerate(d.get("slots") or []):
            where = f"slots[{i}]"
            if not isinstance(s, dict):
                raise PlanError(f"{where} must be an object, got {type(s).__name__}")
            _check_keys(s, {"block", "adapter", "out_norm", "own_norms"}, where)
            ad = s.get("adapter")
            if ad is not None:
                _check_keys(
                    ad, {"rank", "targets", "init", "alpha", "svd_from", "rank_pattern"}, f"{where}.adapter"
                )
                ad = AdapterSpec(
                    **{
                        **ad,
                        "targets": tuple(ad.get("targets", TARGETS)),
                        "rank_pattern": dict(ad.get("rank_pattern") or {}),
                    }
                )
            on = s.get("out_norm")
            if on is not None:
                _check_keys(on, {"gamma", "eps"}, f"{where}.out_norm")
                on = OutNormSpec(**on)
            slots.append(
                SlotSpec(block=s["block"], adapter=ad, out_norm=on, own_norms=bool(s.get("own_norms", False)))
            )
        for key in ("model_type", "num_source_layers"):
            if key not in d:
                raise PlanError(f"plan: missing required key {key!r}")
        shapes = {}
        for b, v in (d.get("block_shapes") or {}).items():
            if not isinstance(v, dict):
                raise PlanError(f"block_shapes[{b}] must be an object, got {type(v).__name__}")
            _check_keys(
                v, {"intermediate_size", "num_attention_heads", "num_key_value_heads"}, f"block_shapes[{b}]"
            )
            try:
                shapes[int(b)] = BlockShape(**v)
            except (TypeError, ValueError) as e:
                raise PlanError(f"block_shapes[{b}]: {e}") from None
        return cls(d["model_type"], d["num_source_layers"], tuple(slots), dict(d.get("notes") or {}), shapes)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())

    def summary(self) -> str:
        """A readable one-line-per-slot table of the plan."""
        lines = [
            f"plan: {self.model_type}, {self.num_slots} slots over {len(self.physical_blocks)} physical "
            f"blocks (source has {self.num_source_layers}; removed: {list(self.removed_blocks) or 'none'})"
        ]
        reuse = set(self.reusing_slots())
        for i, s in enumerate(self.slots):
            parts = [f"slot {i:3d} <- block {s.block:3d}", "reuse" if i in reuse else "     "]
            if s.adapter:
                a = s.adapter
                src = f" from {a.svd_from}" if a.svd_from is not None else ""
                pattern = "".join(f" {t}:{r}" for t, r in a.rank_pattern.items())
                parts.append(f"adapter r={a.rank}{pattern} [{','.join(a.targets)}] init={a.init}{src}")
            if s.out_norm:
                parts.append(f"out_norm gamma={s.out_norm.gamma:g}")
            if s.own_norms:
                parts.append("own norms")
            if i == self.owner_slot(s.block) and s.block in self.block_shapes:
                b = self.block_shapes[s.block]
                parts.append(
                    f"narrowed: {b.intermediate_size} MLP units, {b.num_attention_heads} heads "
                    f"({b.num_key_value_heads} kv)"
                )
            lines.append("  " + "  ".join(parts))
        return "\n".join(lines)


def _check_keys(d: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _validate_adapter(
    a: AdapterSpec, where: str, last: int, matrix_shapes: dict[str, tuple[int, int]] | None
) -> None:
    if not isinstance(a.rank, int) or a.rank < 1:
        raise PlanError(f"{where}.rank={a.rank!r}: must be an integer >= 1")
    if not a.targets:
        raise PlanError(f"{where}.targets is empty: allowed any of {list(TARGETS)}")
    for t in a.targets:
        if t not in TARGETS:
            raise PlanError(f"{where}.targets: unknown target {t!r}; allowed: {list(TARGETS)}")
    if len(set(a.targets)) != len(a.targets):
        raise PlanError(f"{where}.targets={list(a.targets)} names a target twice")
    if a.init not in ADAPTER_INITS:
        raise PlanError(f"{where}.init={a.init!r} is unknown; allowed: {list(ADAPTER_INITS)}")
    if a.init in SVD_INITS:
        if a.svd_from is None or not isinstance(a.svd_from, int) or not 0 <= a.svd_from <= last:
            raise PlanError(
                f"{where}.svd_from={a.svd_from!r}: init={a.init} needs a source block in 0..{last}"
            )
    elif a.svd_from is not None:
        raise PlanError(
            f"{where}.svd_from is only allowed with init='svd' or 'svd_randomized' (init={a.init!r})"
        )
    if a.alpha is not None and not a.alpha > 0:
        raise PlanError(f"{where}.alpha={a.alpha!r}: must be > 0 (or null for alpha = rank)")
    for t, r in a.rank_pattern.items():
        if t not in a.targets:
            raise PlanError(
                f"{where}.rank_pattern names {t!r}, which is not a target; targets: {list(a.targets)}"
            )
        if not isinstance(r, int) or r < 1:
            raise PlanError(f"{where}.rank_pattern[{t!r}]={r!r}: must be an integer >= 1")
    if matrix_shapes:
        for t in a.targets:
            if t not in matrix_shapes:  # the architecture has no such linear (OPT has no gate)
                raise PlanError(
                    f"{where}.targets: {t!r} does not exist in this architecture; allowed: {list(matrix_shapes)}"
                )
            out_f, in_f = matrix_shapes[t]
            r = a.rank_for(t)
            if r > min(out_f, in_f):
                field_name = f"rank_pattern[{t!r}]" if t in a.rank_pattern else "rank"
                raise PlanError(
                    f"{where}.{field_name}={r} exceeds the size of target {t!r} ({out_f}x{in_f}): "
                    f"allowed 1..{min(out_f, in_f)}"
                )
