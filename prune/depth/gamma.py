"""Initial output-norm gamma of the FlexiGPT replacement slots: measured, or calibrated.

The output norm (eq. 6) normalises each token's o_proj / down_proj output and scales it by gamma.
The paper does not report gamma; its reading, a small number (0.01), shrinks a slot's output to
about 1% of its scale, so the SVD-initialised adapters start nearly silenced. Two other readings:

- ``measure_gamma``: gamma per feature from the slot's own output on calibration text, so that
  right after pruning the normed output has, feature by feature, the RMS of the un-normed output of
  the SVD-initialised slot (the norm starts near identity in scale instead of at 1%);
- ``calibrate_gamma``: a sweep of candidates scored by the calibration perplexity. A candidate is a
  number (every entry of gamma), ``measured`` (the measured gammas) or ``none`` (the slot without
  its output norm, scored by bypassing the norms; a plan that keeps ``none`` has no norm at all).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from flexigpt.shared.engine.adapters import OutputNorm
from flexigpt.shared.evaluate.perplexity import sample_perplexity

MEASURED, NONE = "measured", "none"
WORDS: tuple[str, ...] = (MEASURED, NONE)
Gamma = float | str


def output_norms(model: nn.Module) -> list[OutputNorm]:
    """The output norms of a model, in module order (depth order)."""
    return [m for m in model.modules() if isinstance(m, OutputNorm)]


@contextmanager
def norms_bypassed(norms: Sequence[OutputNorm]) -> Iterator[None]:
    """Run the slots without their output norms for the duration (the norms' weights are untouched)."""
    for m in norms:
        m.bypass = True
    try:
        yield
    finally:
        for m in norms:
            m.bypass = False


@torch.no_grad()
def measure_gamma(model: nn.Module, samples: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Fill every output norm's gamma with the per-feature scale of the slot's un-normed output.

    One pass over `samples` with every norm bypassed (the model as the SVD initialisation made
    it) collects, per norm and per feature f, the mean square of the sub-layer output h_f and of its
    normalised value n_f = LayerNorm(h)_f (weight 1). gamma_f = sqrt(E[h_f^2] / E[n_f^2]) then
    makes the normed output's RMS equal h's, feature by feature, on that text.

    Args:
        model: a shared model with output norms.
        samples: calibration token ids, (T,) or (B, T) each.

    Returns:
        The gamma vector written into each norm, in ``output_norms`` order.

    Raises:
        ValueError: the model has no output norms or the samples hold no token.
    """
    norms = output_norms(model)
    if not norms:
        raise ValueError("model has no output norms (plan with out_norm off?): nothing to measure")
    size = norms[0].out_norm.weight.shape[0]
    sq_h = [torch.zeros(size, dtype=torch.float64) for _ in norms]
    sq_n = [torch.zeros(size, dtype=torch.float64) for _ in norms]

    def hook(i: int, eps: float):  # noqa: ANN202
        def collect(_module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
            h = out.detach().float().reshape(-1, out.shape[-1])
            n = F.layer_norm(h, (h.shape[-1],), eps=eps)
            sq_h[i] += h.square().sum(0).double().cpu()
            sq_n[i] += n.square().sum(0).double().cpu()

        return collect

    handles = [m.base_layer.register_forward_hook(hook(i, m.out_norm.eps)) for i, m in enumerate(norms)]
    device = next(model.parameters()).device
    seen = 0
    try:
        with norms_bypassed(norms):
            for ids in samples:
                ids = ids if ids.dim() == 2 else ids[None]
                model(input_ids=ids.to(device))
                seen += ids.numel()
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError("measure_gamma: the samples hold no token")
    gammas = []
    for m, a, b in zip(norms, sq_h, sq_n, strict=True):
        # a feature the norm maps to ~0 everywhere keeps gamma 1 (nothing to match)
        g = torch.where(b > 1e-12, (a / b.clamp_min(1e-12)).sqrt(), torch.ones_like(a))
        m.out_norm.weight.copy_(g.to(m.out_norm.weight))
        gammas.append(g.float())
    return gammas


@dataclass
class GammaCalibration:
    """Outcome of ``calibrate_gamma``."""

    gamma: Gamma
    """The chosen candidate: a number, ``measured`` or ``none`` (already in the model)."""
    target_ppl: float
    """Perplexity aimed at: ShortGPT's (gamma 0 silences every replacement slot) unless given."""
    table: list[tuple[Gamma, float]] = field(default_factory=list)
    """(candidate, perplexity) for every candidate tried."""
    measured_mean: float | None = None
    """Mean of the measured gammas when ``measured`` was a candidate (the plan records it)."""


def candidate_order(candidates: Sequence[Gamma]) -> list[Gamma]:
    """Candidates from the least to the most the slots contribute: numbers ascending, ``measured``, ``none``.

    Raises:
        ValueError: a candidate that is neither a number > 0 nor one of ``WORDS``, or none at all.
    """
    nums = [g for g in candidates if not isinstance(g, str)]
    bad = [
        g
        for g in candidates
        if (isinstance(g, str) and g not in WORDS) or (not isinstance(g, str) and not g > 0)
    ]
    if not candidates or bad:
        raise ValueError(
            f"candidates={list(candidates)}: need one or more values > 0, {MEASURED!r} or {NONE!r}"
        )
    return [float(g) for g in sorted(set(nums))] + [w for w in WORDS if w in candidates]


def calibrate_gamma(
    model: nn.Module,
    samples: Sequence[torch.Tensor],
    *,
    candidates: Sequence[Gamma] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    target_ppl: float | None = None,
    rule: str = "largest_below",
    progress: bool = True,
) -> GammaCalibration:
    """Choose the output-norm gamma of a pruned shared model from its perplexity on calibration data.

    Every candidate is put into every output norm in turn (``none``: the norms bypassed). With
    gamma = 0 a replacement slot adds nothing, so the model is exactly the ShortGPT model: its
    perplexity is the default target. ``largest_below`` keeps, of the candidates whose perplexity
    does not exceed the target, the one through which the slots contribute most (order of
    ``candidate_order``; falls back to the lowest perplexity), ``closest`` the candidate whose
    log-perplexity is nearest the target.

    Args:
        model: a shared model from ``apply_plan`` with output norms.
        samples: calibration token ids (a sequence: it is read once per candidate).
        candidates: numbers > 0, ``measured`` and / or ``none``.
        target_ppl: perplexity to aim at; None measures ShortGPT's (gamma = 0).
        rule: largest_below or closest.
        progress: tqdm bars.

    Returns:
        The choice (left in the model: its gammas, or with ``none`` the measured or last ones; the
        caller builds the plan without norms) and the table of measurements.

    Raises:
        ValueError: no output norms in the model, bad candidates or rule.
    """
    if rule not in ("largest_below", "closest"):
        raise ValueError(f"rule={rule!r} is unknown; allowed: ['largest_below', 'closest']")
    order = candidate_order(candidates)
    norms = output_norms(model)
    if not norms:
        raise ValueError("model has no output norms (plan with out_norm off?): nothing to calibrate")
    measured = measure_gamma(model, samples) if MEASURED in order else None

    def put(gamma: Gamma) -> None:
        with torch.no_grad():
            for i, m in enumerate(norms):
                if gamma == MEASURED:
                    m.out_norm.weight.copy_(measured[i].to(m.out_norm.weight))
                elif gamma != NONE:
                    m.out_norm.weight.fill_(gamma)

    def ppl_at(gamma: Gamma) -> float:
        put(gamma)
        label = gamma if isinstance(gamma, str) else f"{gamma:g}"
        with norms_bypassed(norms) if gamma == NONE else nullcontext():
            return sample_perplexity(model, samples, progress=progress, desc=f"gamma {label}").ppl

    if target_ppl is None:
        target_ppl = ppl_at(0.0)
    table = [(g, ppl_at(g)) for g in order]
    if rule == "largest_below":
        ok = [g for g, p in table if p <= target_ppl]
        gamma = ok[-1] if ok else min(table, key=lambda gp: gp[1])[0]
    else:
        gamma = min(table, key=lambda gp: abs(math.log(gp[1] / target_ppl)))[0]
    put(gamma)
    mean = float(torch.cat(measured).mean()) if measured is not None else None
    return GammaCalibration(gamma, float(target_ppl), table, mean)
