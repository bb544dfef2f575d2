"""One pruning shot over the whole model: curvature, costs, one global threshold, weight updates.

The shot works block group by block group so that only one group's factors are in memory:
collect the group's factors, compute its costs (small vectors), then keep the factors for the
update (in memory, or on disk for large models) or drop them (methods without an update). After
the global threshold, each layer is updated on its own, loading its factors back one at a time.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from flexigpt.prune.surgeon.costs import (
    element_costs,
    prepare,
    remove_cols,
    remove_elements,
    remove_rows,
    structure_costs,
    write_back,
)
from flexigpt.prune.surgeon.curvature import LinearRef, collect_factors, decoder_linears
from flexigpt.prune.surgeon.threshold import element_threshold, structured_threshold
from flexigpt.shared.engine.layout import get_layout

# method -> (curvature, diagonal costs and no update). The paper's baselines are the same
# machinery with less curvature: magnitude = identity factors, L-OBD = activations only (G = I),
# K-OBD = K-FAC factors without their off-diagonal terms (and so without a compensating update).
METHODS: dict[str, tuple[str, bool]] = {
    "magnitude": ("identity", True),
    "l_obd": ("activations", True),
    "k_obd": ("kfac", True),
    "surgeon": ("kfac", False),
}
STRUCTURES: tuple[str, ...] = ("rows_columns", "2:4", "element")
UPDATES: tuple[str, ...] = ("correlated", "independent")


@dataclass(frozen=True)
class ShotOptions:
    """How a shot prunes; every field is a recipe key of ``surgeon:`` (see the recipe for help)."""

    method: str = "surgeon"
    structures: str = "rows_columns"
    damp_g: float = 0.01
    damp_a: float = 0.01
    fisher: str = "empirical"
    update: str = "correlated"
    max_correlate: int = 2000
    obd: bool | None = None
    blocks_per_pass: int | None = None
    factors: str = "memory"
    scratch: Path | None = None
    seed: int = 0

    @property
    def curvature(self) -> str:
        return METHODS[self.method][0]

    @property
    def diagonal(self) -> bool:
        """True: OBD costs and no update (the baselines, or the Surgeon with ``obd: true``)."""
        return METHODS[self.method][1] if self.obd is None else self.obd


@dataclass
class ShotResult:
    """What one shot did: zeroed weights of the decoder linears and each layer's sparsity."""

    target: float
    zeroed: int
    total: int
    sparsity: dict[str, float] = field(default_factory=dict)
    removed_rows: dict[str, int] = field(default_factory=dict)
    removed_cols: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "zeroed": self.zeroed,
            "total": self.total,
            "sparsity": self.sparsity,
            "removed_rows": self.removed_rows,
            "removed_cols": self.removed_cols,
        }


class _FactorStore:
    """Each layer's factors between the costs and the update: in memory, or one file per layer."""

    def __init__(self, where: str, scratch: Path | None) -> None:
        self.where = where
        self.mem: dict[str, tuple] = {}
        self.dir = None
        if where == "disk":
            base = scratch or Path(tempfile.gettempdir())
            base.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=".factors-", dir=base))

    def put(self, key: str, factors: tuple) -> None:
        if self.dir is None:
            self.mem[key] = factors
        else:
            torch.save(factors, self.dir / f"{key}.pt")

    def get(self, key: str) -> tuple:
        if self.dir is None:
            return self.mem.pop(key)
        return torch.load(self.dir / f"{key}.pt", weights_only=True)

    def close(self) -> None:
        self.mem.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _groups(n_blocks: int, size: int | None) -> list[list[int]]:
    size = size or n_blocks
    return [list(range(s, min(s + size, n_blocks))) for s in range(0, n_blocks, size)]


@torch.no_grad()
def _layer_factors(
    model: PreTrainedModel, refs: list[LinearRef], samples: Sequence[torch.Tensor], o: ShotOptions
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    if o.curvature == "identity":
        return {r.key: (None, None) for r in refs}
    with torch.enable_grad():
        # factors accumulate where the model runs: moving every activation to the host costs more
        device = next(model.parameters()).device
        return collect_factors(
            model,
            refs,
            samples,
            need_a=True,
            need_g=o.curvature == "kfac",
            fisher=o.fisher,
            seed=o.seed,
            store_device=device,
        )


def prune_shot(
    model: PreTrainedModel,
    samples: Sequence[torch.Tensor],
    target: float,
    o: ShotOptions,
    log: Callable[..., None] = print,
) -> ShotResult:
    """Zero ``target`` of the decoder-linear weights of `model` in place (cumulative over shots).

    Args:
        model: a plain model of a supported architecture (its weights are changed in place).
        samples: the calibration windows, (1, T) token tensors.
        target: fraction of all decoder-linear weights zero after the shot (earlier zeros count).
        o: the method and its settings.
        log: progress sink.

    Returns:
        The shot's result (zeroed count, per-layer sparsity).
    """
    layers = model.get_submodule(get_layout(model.config).layers_path)
    update = not o.diagonal
    store = _FactorStore(o.factors if update else "memory", o.scratch)
    costs: dict[str, object] = {}
    refs: dict[str, LinearRef] = {}
    try:
        for group in _groups(len(layers), o.blocks_per_pass):
            group_refs = decoder_linears(model, group)
            factors = _layer_factors(model, group_refs, samples, o)
            for r in group_refs:
                a, g = factors.pop(r.key)
                c = prepare(
                    r.module.weight, r.module.bias, g, a, damp_g=o.damp_g, damp_a=o.damp_a, obs=not o.diagonal
                )
                if o.structures == "rows_columns":
                    costs[r.key] = structure_costs(c, obs=not o.diagonal)
                else:
                    costs[r.key] = element_costs(c, obs=not o.diagonal).float()
                refs[r.key] = r
                if update:
                    store.put(r.key, (a, g))
            del factors
        if o.structures == "rows_columns":
            choice = structured_threshold(costs, target)  # type: ignore[arg-type]
            masks = None
        else:
            n_of_m = (2, 4) if o.structures == "2:4" else None
            masks = element_threshold(costs, target, n_of_m=n_of_m)  # type: ignore[arg-type]
            choice = None
        del costs
        result = ShotResult(target, 0, 0)
        for key, r in refs.items():
            a, g = store.get(key) if update else (None, None)
            w, b = r.module.weight, r.module.bias
            c = prepare(w, b, g, a, damp_g=o.damp_g, damp_a=o.damp_a, obs=update)
            mode = o.update if update else "none"
            if choice is not None:
                rows, cols = choice.rows[key].to(c.w.device), choice.cols[key].to(c.w.device)
                remove_rows(c, rows, update=mode)
                remove_cols(c, cols, update=mode)
                c.w[rows] = 0.0  # the column update leaves removed rows at zero; keep it exact
                result.removed_rows[key], result.removed_cols[key] = len(rows), len(cols)
            else:
                remove_elements(c, masks[key].to(c.w.device), update=mode, max_correlate=o.max_correlate)  # type: ignore[index]
            write_back(c, w, b)
            zeros = int(w.eq(0).sum())
            result.sparsity[key] = zeros / w.numel()
            result.zeroed += zeros
            result.total += w.numel()
    finally:
        store.close()
    log(
        f"  shot target {target:.4f}: zeroed {result.zeroed:,} of {result.total:,} decoder-linear weights "
        f"({result.zeroed / result.total:.4f})"
    )
    return result
