"""The global threshold, and whole-model shots on a tiny model (baselines from the same machinery)."""

from __future__ import annotations

import pytest
import torch

from flexigpt.prune.surgeon.curvature import collect_factors, decoder_linears
from flexigpt.prune.surgeon.shot import ShotOptions, prune_shot
from flexigpt.prune.surgeon.threshold import element_threshold, structured_threshold
from flexigpt.shared.engine.tiny import tiny_model


def _costs(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (8, 6), "b": (5, 12), "c": (10, 10)}
    return {n: (torch.rand(r, generator=g), torch.rand(c, generator=g)) for n, (r, c) in shapes.items()}


def _zeroed(costs, choice) -> int:
    n = 0
    for name, (rc, cc) in costs.items():
        m = torch.ones(rc.numel(), cc.numel())
        m[choice.rows[name]] = 0
        m[:, choice.cols[name]] = 0
        n += int(m.eq(0).sum())
    return n


@pytest.mark.parametrize("target", [0.05, 0.2, 0.37, 0.6])
def test_structured_threshold_meets_the_target_within_one_structure(target: float) -> None:
    costs = _costs()
    choice = structured_threshold(costs, target)
    budget = int(target * choice.total)
    assert choice.total == 8 * 6 + 5 * 12 + 10 * 10
    assert _zeroed(costs, choice) == choice.zeroed <= budget  # overlaps counted once
    # the cheapest structure not taken would overshoot
    rest = [
        (float(c[i]), name, kind, i)
        for name, (rc, cc) in costs.items()
        for kind, c, taken in (("row", rc, choice.rows[name]), ("col", cc, choice.cols[name]))
        for i in range(c.numel())
        if i not in taken.tolist()
    ]
    _, name, kind, i = min(rest)
    more = {"rows": dict(choice.rows), "cols": dict(choice.cols)}
    key = "rows" if kind == "row" else "cols"
    more[key][name] = torch.cat([more[key][name], torch.tensor([i])])
    bigger = type(choice)(more["rows"], more["cols"], 0, choice.total)
    assert _zeroed(costs, bigger) > budget
    # one threshold: every taken structure is no costlier than every one left
    taken_max = max(
        max(torch.cat([rc[choice.rows[n]], cc[choice.cols[n]]]).tolist(), default=0.0)
        for n, (rc, cc) in costs.items()
    )
    assert taken_max <= min(rest)[0]


def test_element_and_two_of_four_thresholds() -> None:
    g = torch.Generator().manual_seed(1)
    costs = {"a": torch.rand(4, 8, generator=g), "b": torch.rand(6, 12, generator=g)}
    masks = element_threshold(costs, 0.3)
    assert sum(int(m.sum()) for m in masks.values()) == int(0.3 * (32 + 72))
    masks = element_threshold(costs, 0.5, n_of_m=(2, 4))
    for m in masks.values():
        assert (m.view(m.shape[0], -1, 4).sum(-1) == 2).all()


def _samples(n: int = 4, t: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, t), generator=g) for _ in range(n)]


def test_factors_are_token_averaged_outer_products() -> None:
    model = tiny_model("qwen2", num_layers=2)
    refs = decoder_linears(model, [1])
    samples = _samples(2)
    f = collect_factors(model, refs, samples)
    a, g = f["1.q"]
    assert a.shape == (65, 65) and g.shape == (64, 64)  # q has a bias: a constant-1 feature
    assert a[-1, -1].item() == pytest.approx(1.0)
    # A of down_proj by hand: the MLP's product activations over every token
    inputs = []
    h = refs[-1].module.register_forward_hook(lambda _m, args, _o: inputs.append(args[0].reshape(-1, 160)))
    with torch.no_grad():
        for s in samples:
            model(input_ids=s)
    h.remove()
    x = torch.cat(inputs)
    torch.testing.assert_close(f["1.down"][0], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    assert torch.allclose(g, g.T) and (g.diagonal() > 0).all()


def _pruned(method: str, **kw) -> torch.nn.Module:
    model = tiny_model("llama2", num_layers=2)
    prune_shot(model, _samples(), 0.2, ShotOptions(method=method, **kw), log=lambda *a, **k: None)
    return model


def test_magnitude_is_identity_curvature_obd_on_a_model() -> None:
    ref = tiny_model("llama2", num_layers=2)
    pruned = _pruned("magnitude")
    costs = {
        r.key: (
            0.5 * r.module.weight.double().square().sum(1),
            0.5 * r.module.weight.double().square().sum(0),
        )
        for r in decoder_linears(ref)
    }
    choice = structured_threshold(costs, 0.2)
    for r, p in zip(decoder_linears(ref), decoder_linears(pruned), strict=True):
        w = r.module.weight.detach().clone()
        w[choice.rows[r.key]] = 0
        w[:, choice.cols[r.key]] = 0
        assert torch.equal(p.module.weight, w), r.key


def test_surgeon_with_its_update_switched_off_is_k_obd() -> None:
    k_obd, surgeon_obd, surgeon = _pruned("k_obd"), _pruned("surgeon", obd=True), _pruned("surgeon")
    for a, b, _c in zip(*(decoder_linears(m) for m in (k_obd, surgeon_obd, surgeon)), strict=True):
        assert torch.equal(a.module.weight, b.module.weight)
    assert any(
        not torch.equal(a.module.weight, c.module.weight)
        for a, c in zip(decoder_linears(k_obd), decoder_linears(surgeon), strict=True)
    )


@pytest.mark.parametrize("structures", ["rows_columns", "element", "2:4"])
@pytest.mark.parametrize("factors", ["memory", "disk"])
def test_a_surgeon_shot_meets_its_target(structures: str, factors: str, tmp_path) -> None:
    model = tiny_model("qwen2", num_layers=2)
    # joint single-weight solves in groups of 256: small systems keep the test fast
    o = ShotOptions(
        structures=structures, factors=factors, scratch=tmp_path, blocks_per_pass=1, max_correlate=256
    )
    res = prune_shot(model, _samples(), 0.3, o, log=lambda *a, **k: None)
    assert res.zeroed <= int(0.3 * res.total) + 2  # a weight may be zero after its update by chance
    assert res.zeroed >= 0.25 * res.total
    assert not list(tmp_path.iterdir())  # the factors on disk are gone after the shot
    for r in decoder_linears(model):
        assert res.sparsity[r.key] == pytest.approx(r.module.weight.eq(0).double().mean().item())


def test_sampled_fisher_draws_labels_from_the_model_reproducibly() -> None:
    model = tiny_model("llama2", num_layers=2)
    refs = decoder_linears(model, [0])
    samples = _samples(2)
    emp = collect_factors(model, refs, samples)["0.o"][1]
    s1 = collect_factors(model, refs, samples, fisher="sampled", seed=1)["0.o"][1]
    s2 = collect_factors(model, refs, samples, fisher="sampled", seed=1)["0.o"][1]
    s3 = collect_factors(model, refs, samples, fisher="sampled", seed=2)["0.o"][1]
    assert torch.equal(s1, s2) and not torch.equal(s1, s3) and not torch.equal(s1, emp)
    with pytest.raises(ValueError, match="fisher"):
        collect_factors(model, refs, samples, fisher="true")


def test_multi_shot_reaches_the_target_with_curvature_measured_on_each_shots_model(monkeypatch) -> None:
    import flexigpt.prune.surgeon.shot as shot_mod

    seen: list[torch.Tensor] = []
    real = shot_mod.collect_factors

    def spy(model, refs, samples, **kw):
        out = real(model, refs, samples, **kw)
        if refs[0].block == 0:
            seen.append(out["0.down"][0].clone())  # A of block 0's down_proj: its inputs
        return out

    monkeypatch.setattr(shot_mod, "collect_factors", spy)
    model = tiny_model("llama2", num_layers=2)
    o = ShotOptions(blocks_per_pass=1)
    for shot in range(1, 4):
        res = prune_shot(model, _samples(), shot * 0.1, o, log=lambda *a, **k: None)
        assert int(shot * 0.1 * res.total) - 200 <= res.zeroed <= int(shot * 0.1 * res.total)
    assert len(seen) == 3
    # the inputs of down change as gate / up rows go: each shot measured the model it pruned
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert (seen[2].diagonal() == 0).sum() > (seen[0].diagonal() == 0).sum()
