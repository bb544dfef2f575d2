"""The stitch plan: which base layers a tailored model keeps and where each kept position comes from.

Plain data, readable and editable like a mergekit config, saved as YAML (or JSON)::

    format: flexigpt-stitch/1
    base_layers: 8
    top: base                # embeddings, final norm and lm_head come from this source
    positions:
      - {layer: 0, source: base}
      - {layer: 1, source: colour}
      - {layer: 3, merge: {method: task_arithmetic, variants: [colour, home], scale: 0.6}}
      - {layer: 4, source: home, output_scale: 0.9}
    removed: [2, 5]

Each position runs base layer ``layer`` of its source (``base``, a variant's name) or the merge of
the variants' layers ``layer`` onto the base's; ``output_scale`` (optional) multiplies the block's
residual update. ``removed`` lists the base layers no position takes; it is checked, not trusted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FORMAT = "flexigpt-stitch/1"


class StitchError(ValueError):
    """A stitch plan, a source or a merge that cannot be used; the message names it and what is allowed."""


@dataclass(frozen=True)
class MergeSpec:
    """A merge of several variants' layers onto the base layer."""

    method: str
    variants: tuple[str, ...]
    scale: float

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "variants": list(self.variants), "scale": self.scale}


@dataclass(frozen=True)
class Position:
    """One kept position: base layer index and where its weights come from."""

    layer: int
    source: str = "base"
    """``base``, a variant's name, or ``merge`` (then `merge` says how)."""
    merge: MergeSpec | None = None
    output_scale: float | None = None
    """Multiplies the block's residual update (attention and MLP outputs); None: 1."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layer": self.layer}
        if self.merge is not None:
            d["merge"] = self.merge.to_dict()
        else:
            d["source"] = self.source
        if self.output_scale is not None:
            d["output_scale"] = self.output_scale
        return d

    def label(self) -> str:
        """Short text for reports: the source, or ``method(variants)@scale``."""
        if self.merge is None:
            return self.source
        return f"{self.merge.method}({'+'.join(self.merge.variants)})@{self.merge.scale:.2f}"


@dataclass(frozen=True)
class StitchPlan:
    """Kept positions in order (each a base layer index and a source) over a base of `base_layers` layers."""

    base_layers: int
    positions: tuple[Position, ...]
    top: str = "base"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Free-form notes saved with the plan (scores, trial number); not part of its identity."""

    @property
    def removed(self) -> list[int]:
        kept = {p.layer for p in self.positions}
        return [i for i in range(self.base_layers) if i not in kept]

    def sources(self) -> set[str]:
        """Every source name the plan reads (variants of merges included)."""
        out = {self.top}
        for p in self.positions:
            out.update(p.merge.variants if p.merge else (p.source,))
        if any(p.merge for p in self.positions):
            out.add("base")
        return out

    def validate(self, names: Iterable[str] | None = None) -> StitchPlan:
        """Check indices, order and source names.

        Args:
            names: the source names allowed (``base`` and the variants); None: not checked.

        Returns:
            self.

        Raises:
            StitchError: naming the position and what is allowed.
        """
        if not self.positions:
            raise StitchError("positions: a plan keeps at least one layer")
        last = -1
        for i, p in enumerate(self.positions):
            if not 0 <= p.layer < self.base_layers:
                raise StitchError(f"positions[{i}].layer={p.layer}: allowed 0..{self.base_layers - 1}")
            if p.layer <= last:
                raise StitchError(
                    f"positions[{i}].layer={p.layer}: layers must be kept in increasing order, each once"
                )
            last = p.layer
            if p.merge is not None:
                if p.source != "merge":
                    raise StitchError(
                        f"positions[{i}]: a merge position has source 'merge', got {p.source!r}"
                    )
                if len(p.merge.variants) < 2 or len(set(p.merge.variants)) != len(p.merge.variants):
                    raise StitchError(f"positions[{i}].merge.variants: give two or more distinct variants")
                if not 0.0 <= p.merge.scale <= 1.0:
                    raise StitchError(f"positions[{i}].merge.scale={p.merge.scale}: allowed [0, 1]")
            elif p.source == "merge":
                raise StitchError(
                    f"positions[{i}]: source 'merge' needs a merge: {{method, variants, scale}}"
                )
            if p.output_scale is not None and not 0.0 <= p.output_scale <= 2.0:
                raise StitchError(f"positions[{i}].output_scale={p.output_scale}: allowed [0, 2]")
        if names is not None:
            allowed = set(names)
            for i, p in enumerate(self.positions):
                for s in p.merge.variants if p.merge else (p.source,):
                    if s not in allowed or (p.merge and s == "base"):
                        raise StitchError(
                            f"positions[{i}]: source {s!r} is unknown; allowed: {sorted(allowed)}"
                        )
            if self.top not in allowed:
                raise StitchError(f"top={self.top!r} is unknown; allowed: {sorted(allowed)}")
        return self

    # ------------------------------------------------------------------------------- as data
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT,
            "base_layers": self.base_layers,
            "top": self.top,
            "positions": [p.to_dict() for p in self.positions],
            "removed": self.removed,
        }
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StitchPlan:
        """Read a plan written by `to_dict` (or by hand).

        Raises:
            StitchError: a missing or unknown key, a bad value, or a `removed` list that contradicts the positions.
        """
        known = {"format", "base_layers", "top", "positions", "removed", "meta"}
        extra = set(d) - known
        if extra:
            raise StitchError(f"stitch plan: unknown keys {sorted(extra)}; allowed: {sorted(known)}")
        if d.get("format", FORMAT) != FORMAT:
            raise StitchError(f"stitch plan: format={d.get('format')!r}; this version reads {FORMAT!r}")
        try:
            positions = []
            for i, p in enumerate(d["positions"]):
                bad = set(p) - {"layer", "source", "merge", "output_scale"}
                if bad:
                    raise StitchError(f"positions[{i}]: unknown keys {sorted(bad)}")
                m = p.get("merge")
                merge = None
                if m is not None:
                    merge = MergeSpec(
                        str(m["method"]), tuple(str(v) for v in m["variants"]), float(m["scale"])
                    )
                scale = p.get("output_scale")
                positions.append(
                    Position(
                        int(p["layer"]),
                        "merge" if merge else str(p.get("source", "base")),
                        merge,
                        None if scale is None else float(scale),
                    )
                )
            plan = cls(
                int(d["base_layers"]), tuple(positions), str(d.get("top", "base")), dict(d.get("meta") or {})
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, StitchError):
                raise
            raise StitchError(f"stitch plan: missing or bad value ({e!r}); see the format in the docs") from e
        plan.validate()
        if "removed" in d and sorted(int(x) for x in d["removed"]) != plan.removed:
            raise StitchError(
                f"stitch plan: removed={d['removed']} contradicts the positions (they leave {plan.removed})"
            )
        return plan

    def save(self, path: str | Path) -> Path:
        """Write the plan as YAML (``.yaml`` / ``.yml``) or JSON (anything else)."""
        path = Path(path)
        d = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(d, sort_keys=False))
        else:
            path.write_text(json.dumps(d, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> StitchPlan:
        """Read a plan from YAML or JSON.

        Raises:
            StitchError: unreadable file or bad plan.
        """
        try:
            d = yaml.safe_load(Path(path).read_text())  # YAML reads JSON too
        except (OSError, yaml.YAMLError) as e:
            raise StitchError(f"cannot read stitch plan {path}: {e}") from e
        if not isinstance(d, dict):
            raise StitchError(f"stitch plan {path}: the top level must be a mapping")
        return cls.from_dict(d)


def identity_plan(num_layers: int, source: str = "base") -> StitchPlan:
    """Every layer kept, all from `source` (and the top modules too)."""
    return StitchPlan(num_layers, tuple(Position(i, source) for i in range(num_layers)), top=source)
