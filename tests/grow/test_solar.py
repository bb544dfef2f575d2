"""SOLAR depth up-scaling: the dense map, its shared-weight twin through the engine, the span rules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flexigpt.grow.build import grow_model
from flexigpt.grow.strategies import GrowError, GrowOptions, build_plan
from flexigpt.shared.engine.apply import stored_param_count
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec
from flexigpt.shared.engine.tiny import tiny_model

TOKENS = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def test_dense_and_shared_solar_give_the_same_logits_at_init(arch: str) -> None:
    n, target = 6, 8  # m = 2: blocks 0..3 of one copy, then 2..5 of the other
    src = tiny_model(arch, num_layers=n)
    mt = src.config.model_type
    dense_plan = build_plan("solar", mt, n, GrowOptions(start=0, end=None, target_layers=target))
    assert list(dense_plan.order) == [0, 1, 2, 3, 2, 3, 4, 5] and dense_plan.notes["m"] == 2
    shared_plan = build_plan(
        "solar_shared",
        mt,
        n,
        GrowOptions(
            start=0, end=None, target_layers=target, adapter=AdapterSpec(4, init="lora"), out_norm=None
        ),
    )
    assert [s.block for s in shared_plan.slots] == list(dense_plan.order)
    dense = grow_model(src, dense_plan)
    shared = grow_model(tiny_model(arch, num_layers=n), shared_plan, seed=0)
    torch.testing.assert_close(_logits(shared), _logits(dense), rtol=1e-5, atol=1e-5)
    # the dense model is the two truncated copies joined, by hand
    ref = tiny_model(arch, num_layers=n)
    joined = copy.deepcopy(ref)
    joined.model.layers = nn.ModuleList(
        [copy.deepcopy(ref.model.layers[b]) for b in [0, 1, 2, 3]]
        + [copy.deepcopy(ref.model.layers[b]) for b in [2, 3, 4, 5]]
    )
    for i, layer in enumerate(joined.model.layers):
        layer.self_attn.layer_idx = i
    joined.config.num_hidden_layers = joined.model.config.num_hidden_layers = 8
    if getattr(joined.config, "layer_types", None):
        joined.config.layer_types = [ref.config.layer_types[b] for b in dense_plan.order]
    torch.testing.assert_close(_logits(joined), _logits(dense), rtol=1e-5, atol=1e-5)
    # the shared model stores the source blocks once: fewer parameters than the dense one
    assert stored_param_count(shared) < stored_param_count(dense)


def test_solar_span_rules() -> None:
    assert build_plan("solar", "llama", 32, GrowOptions(start=8, end=23)).order == tuple(
        list(range(24)) + list(range(8, 32))
    )
    with pytest.raises(GrowError, match="grow.start=8 grow.end=23"):
        build_plan("solar", "llama", 32, GrowOptions(start=8, end=16))
    with pytest.raises(GrowError, match="target_layers=47"):
        build_plan("solar", "llama", 32, GrowOptions(end=None, target_layers=47))
    with pytest.raises(GrowError, match="out_norm"):
        build_plan("solar_shared", "llama", 8, GrowOptions(start=2, end=5, out_norm=OutNormSpec(0.01)))
