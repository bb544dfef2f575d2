"""Narrowed blocks in the plan: old plans load unchanged, bad shapes are refused, tensors must match."""

from __future__ import annotations

import pytest
import torch

from flexigpt.shared.engine.apply import apply_plan, expected_trainable, materialize
from flexigpt.shared.engine.plan import AdapterSpec, BlockShape, Plan, PlanError, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model


def test_a_plan_without_block_shapes_keeps_its_json_and_one_with_them_round_trips() -> None:
    plan = Plan.identity("llama", 3)
    assert "block_shapes" not in plan.to_dict()
    narrowed = Plan("llama", 3, plan.slots, {}, {1: BlockShape(40, 2, 2)})
    d = narrowed.to_dict()
    assert d["block_shapes"] == {
        "1": {"intermediate_size": 40, "num_attention_heads": 2, "num_key_value_heads": 2}
    }
    assert Plan.from_json(narrowed.to_json()) == narrowed
    assert "narrowed: 40 MLP units" in narrowed.summary()


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({5: BlockShape(4, 2, 2)}, "not run by any slot"),
        ({0: BlockShape(0, 2, 2)}, "integer >= 1"),
        ({0: BlockShape(4, 3, 2)}, "not a multiple"),
    ],
)
def test_bad_block_shapes_are_refused(shapes, message) -> None:
    with pytest.raises(PlanError, match=message):
        Plan("llama", 2, (SlotSpec(0), SlotSpec(1)), {}, shapes).validate()


def test_wider_than_source_or_regrouped_is_refused() -> None:
    src = tiny_model("llama3", num_layers=2)  # 4 heads over 2 kv heads
    with pytest.raises(PlanError, match="wider"):
        apply_plan(src, Plan("llama", 2, (SlotSpec(0), SlotSpec(1)), {}, {0: BlockShape(999, 4, 2)}))
    with pytest.raises(PlanError, match="query heads per kv head"):
        apply_plan(src, Plan("llama", 2, (SlotSpec(0), SlotSpec(1)), {}, {0: BlockShape(8, 1, 1)}))


def test_tensors_that_do_not_match_the_planned_shape_are_refused() -> None:
    src = tiny_model("llama2", num_layers=2)
    plan = Plan("llama", 2, (SlotSpec(0), SlotSpec(1)), {}, {1: BlockShape(100, 4, 4)})
    with pytest.raises(PlanError, match=r"block 1's mlp.gate_proj.weight has shape \(160, 64\)"):
        apply_plan(src, plan)


def test_a_narrowed_block_reused_with_adapters_and_padded_on_materialize() -> None:
    src = tiny_model("llama2", num_layers=2)
    mlp = src.model.layers[0].mlp
    keep = torch.arange(100)
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight = torch.nn.Parameter(lin.weight[keep].clone())
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, keep].clone())
    plan = Plan(
        "llama",
        2,
        (SlotSpec(0), SlotSpec(1), SlotSpec(0, adapter=AdapterSpec(4, init="lora"))),
        {},
        {0: BlockShape(100, 4, 4)},
    )
    model = apply_plan(src, plan)
    assert model.model.layers[2].mlp.gate_proj.base_layer.weight is model.model.layers[0].mlp.gate_proj.weight
    n = sum(p.numel() for p in model.parameters())
    assert expected_trainable(plan, src.config, "all") == n
    # rank 4 on q, k, v, o (64 x 64) and on the narrowed gate, up (100 x 64) and down (64 x 100)
    assert expected_trainable(plan, src.config, "adapters") == 4 * (4 * (64 + 64) + 3 * (100 + 64))
    plain = materialize(model)
    assert plain.model.layers[0].mlp.gate_proj.weight.shape == (160, 64)
    assert plain.model.layers[0].mlp.gate_proj.weight[100:].eq(0).all()
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
