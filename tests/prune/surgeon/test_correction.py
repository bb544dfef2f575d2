"""The first-order correction: LoRA trained after a shot, absorbed with the pruned weights kept at zero."""

from __future__ import annotations

import pytest
import torch

from flexigpt.prune.surgeon.correction import CorrectionError, LoraOptions, _Adapters, correct, windows_for
from flexigpt.prune.surgeon.curvature import decoder_linears
from flexigpt.prune.surgeon.shot import ShotOptions, prune_shot
from flexigpt.shared.engine.tiny import tiny_model


def _samples(n: int = 4, t: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, t), generator=g) for _ in range(n)]


def _pruned(arch: str, structures: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = tiny_model(arch, num_layers=2).to(dtype)
    o = ShotOptions(structures=structures, max_correlate=64)
    prune_shot(model, _samples(), 0.3, o, log=lambda *a, **k: None)
    return model


def _loss(model: torch.nn.Module, samples: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(model(input_ids=x, labels=x).loss) for x in samples) / len(samples)


@pytest.mark.parametrize(
    ("arch", "structures", "dtype"),
    [
        ("llama2", "rows_columns", torch.float32),
        ("llama3", "rows_columns", torch.bfloat16),  # adapters train in fp32 over bf16 weights
        ("mistral", "2:4", torch.float32),
        ("qwen2", "element", torch.float32),
    ],
)
def test_the_correction_lowers_the_loss_and_keeps_pruned_weights_zero(
    arch: str, structures: str, dtype: torch.dtype
) -> None:
    model = _pruned(arch, structures, dtype)
    samples = _samples()
    before = {r.key: r.module.weight.detach().clone() for r in decoder_linears(model)}
    biases = {
        r.key: r.module.bias.detach().clone() for r in decoder_linears(model) if r.module.bias is not None
    }
    loss = _loss(model, samples)
    flags = [p.requires_grad for p in model.parameters()]
    res = correct(model, samples, LoraOptions(lr=1e-2, samples=4, epochs=3), shot=1, log=lambda *a: None)
    assert res["steps"] == 12 and res["windows"] == 4 and res["weights_moved"] > 0
    assert _loss(model, samples) < loss
    for r in decoder_linears(model):
        assert type(r.module) is torch.nn.Linear and r.module.weight.dtype == dtype, r.key  # adapters gone
        zero = before[r.key].eq(0)
        assert r.module.weight[zero].eq(0).all(), r.key  # nothing pruned comes back
        assert zero.all() or not torch.equal(r.module.weight, before[r.key]), r.key  # live layers move
        if r.key in biases:
            assert torch.equal(r.module.bias, biases[r.key])  # biases are not adapted
    assert [p.requires_grad for p in model.parameters()] == flags  # trainable flags as they were


def test_absorbing_is_exact_for_removed_rows_and_columns_and_masks_single_weights() -> None:
    samples = _samples(2)
    for structures in ("rows_columns", "element"):
        model = _pruned("llama2", structures)
        before = {r.key: r.module.weight.detach().clone() for r in decoder_linears(model)}
        adapters = _Adapters(model, LoraOptions(), seed=0)
        with torch.no_grad():
            for layer in adapters.layers:
                layer.lora_B["default"].weight.normal_(0.0, 0.01)  # a trained-looking adapter
        adapters.mask()
        with torch.no_grad():
            adapted = [model(input_ids=x).logits for x in samples]
        adapters.absorb()
        adapters.restore(model)
        with torch.no_grad():
            merged = [model(input_ids=x).logits for x in samples]
        for r in decoder_linears(model):
            assert r.module.weight[before[r.key].eq(0)].eq(0).all()
        same = all(torch.allclose(a, m, rtol=1e-4, atol=1e-5) for a, m in zip(adapted, merged, strict=True))
        # rows and columns are kept out of the adapters while training; single weights only at the merge
        assert same == (structures == "rows_columns"), structures


def test_windows_are_a_seeded_subset_per_shot_and_all_for_the_final_pass() -> None:
    o = LoraOptions(samples=3)
    assert windows_for(10, o, 2) == windows_for(10, o, 2) != windows_for(10, o, 3)
    assert len(windows_for(10, o, 1)) == 3 and len(set(windows_for(10, o, 1))) == 3
    assert windows_for(2, o, 1) in ([0, 1], [1, 0])
    assert windows_for(5, o, None) == [0, 1, 2, 3, 4]


def test_a_diverging_correction_is_refused_and_leaves_plain_linears() -> None:
    model = _pruned("llama2", "rows_columns")
    with torch.no_grad():
        decoder_linears(model)[0].module.weight[0, 0] = float("nan")
    with pytest.raises(CorrectionError, match="surgeon.lora.lr"):
        correct(model, _samples(), LoraOptions(), shot=1, log=lambda *a: None)
    assert all(type(r.module) is torch.nn.Linear for r in decoder_linears(model))
    assert all(type(m).__name__ != "SharedLoraLinear" for m in model.modules())
