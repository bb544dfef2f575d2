"""The output norm's measured and calibrated gamma on a tiny model: the measured gamma keeps each
slot's output scale, a ``none`` candidate scores exactly the model without norms."""

from __future__ import annotations

import pytest
import torch

from flexigpt.prune.depth.gamma import (
    calibrate_gamma,
    candidate_order,
    measure_gamma,
    norms_bypassed,
    output_norms,
)
from flexigpt.prune.depth.replace import ReplacementOptions, flexigpt_plan
from flexigpt.shared.engine.apply import apply_plan
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.tiny import tiny_model
from flexigpt.shared.evaluate.perplexity import sample_perplexity

PICKS = {1: 0, 3: 2}


def _model(**options: object) -> torch.nn.Module:
    source = tiny_model("llama3", num_layers=5)
    shapes = get_layout(source.config).matrix_shapes(source.config)
    torch.manual_seed(0)
    return apply_plan(
        source, flexigpt_plan("llama", 5, PICKS, ReplacementOptions(rank=8, **options), matrix_shapes=shapes)
    )


def _samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (2, 48), generator=g) for _ in range(3)]


def _rms(model: torch.nn.Module, samples: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per norm: per-feature RMS of the sub-layer output before and after its norm, norms active."""
    norms = output_norms(model)
    acc = [[torch.zeros(n.out_norm.weight.shape[0]), torch.zeros(n.out_norm.weight.shape[0])] for n in norms]

    def hook(i: int, k: int):  # noqa: ANN202
        def add(_m: torch.nn.Module, _a: object, o: torch.Tensor) -> None:
            acc[i][k].add_(o.square().sum((0, 1)))

        return add

    hooks = [n.base_layer.register_forward_hook(hook(i, 0)) for i, n in enumerate(norms)]
    hooks += [n.out_norm.register_forward_hook(hook(i, 1)) for i, n in enumerate(norms)]
    with torch.no_grad():
        for ids in samples:
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    tokens = sum(ids.numel() for ids in samples)
    return [((a / tokens).sqrt(), (b / tokens).sqrt()) for a, b in acc]


def test_measured_gamma_keeps_each_slots_output_scale_at_init() -> None:
    model, samples = _model(), _samples()
    before = _rms(model, samples)
    # with gamma 0.01 the normed output's RMS is at most 0.01, whatever the slot's own scale
    assert all(y.norm() / y.numel() ** 0.5 <= 0.0101 for _, y in before)
    assert all(abs((y / h).median().item() - 1) > 0.2 for h, y in before)
    gammas = measure_gamma(model, samples)
    assert len(gammas) == 4 and all(g.shape == (64,) for g in gammas)
    weights = [n.out_norm.weight for n in output_norms(model)]
    assert all(torch.equal(w, g) for w, g in zip(weights, gammas, strict=True))
    after = _rms(model, samples)
    # the first norm sees exactly the measured inputs; later ones see inputs that differ a little
    h0, y0 = after[0]
    torch.testing.assert_close(y0, h0, rtol=1e-4, atol=1e-6)
    for h, y in after:
        ratio = y / h
        assert ratio.median().item() == pytest.approx(1.0, abs=0.05), ratio
        assert y.norm().item() == pytest.approx(h.norm().item(), rel=0.05)
    with pytest.raises(ValueError, match="no output norms"):
        measure_gamma(_model(out_norm=False), samples)


def test_none_candidate_scores_exactly_the_model_without_norms() -> None:
    samples = _samples()
    plain = sample_perplexity(_model(out_norm=False), samples).ppl
    model = _model()
    cal = calibrate_gamma(model, samples, candidates=("none", 0.01, "measured"), progress=False)
    assert [g for g, _ in cal.table] == [0.01, "measured", "none"]
    assert dict(cal.table)["none"] == pytest.approx(plain, rel=1e-6)
    with norms_bypassed(output_norms(model)):
        assert sample_perplexity(model, samples).ppl == pytest.approx(plain, rel=1e-6)
    assert not any(n.bypass for n in output_norms(model))  # bypassed only for the duration
    assert cal.measured_mean is not None and cal.measured_mean > 0
    # 'none' is the most the slots contribute: largest_below keeps it when it is below ShortGPT
    forced = calibrate_gamma(model, samples, candidates=("none", 0.01), target_ppl=1e9, progress=False)
    assert forced.gamma == "none"
    assert (
        calibrate_gamma(model, samples, candidates=(0.01, "none"), target_ppl=0.0, progress=False).gamma
        == min(forced.table, key=lambda gp: gp[1])[0]
    )


def test_bad_candidates_are_refused() -> None:
    assert candidate_order([0.1, "none", 0.01, "measured"]) == [0.01, 0.1, "measured", "none"]
    for bad in ([], [0.0], ["off"], [-1.0]):
        with pytest.raises(ValueError, match="candidates="):
            candidate_order(bad)
