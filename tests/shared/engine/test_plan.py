"""The slot plan as pure data: JSON round trip, derived views, validation messages."""

from __future__ import annotations

import pytest

from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, PlanError, SlotSpec
from flexigpt.shared.engine.tiny import tiny_config


def _plan() -> Plan:
    return Plan(
        "llama",
        4,
        (
            SlotSpec(0),
            SlotSpec(
                1, adapter=AdapterSpec(4, ("q", "down"), init="svd", svd_from=2), out_norm=OutNormSpec(0.05)
            ),
            SlotSpec(1, own_norms=True),
            SlotSpec(3, adapter=AdapterSpec(8, alpha=16.0)),
        ),
        notes={"method": "test"},
    )


def test_json_round_trip_is_exact(tmp_path):
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan
    assert again.to_json() == plan.to_json()


def test_derived_views():
    plan = _plan()
    assert plan.physical_blocks == (0, 1, 3)
    assert plan.removed_blocks == (2,)
    assert plan.reusing_slots() == (2,)
    assert plan.owner_slot(1) == 1
    assert not plan.is_identity()
    assert Plan.identity("llama", 3).is_identity()
    assert plan.slots[3].adapter.scaling_for("q") == 2.0
    assert "slot   2 <- block   1  reuse" in plan.summary()


@pytest.mark.parametrize(
    ("slot", "message"),
    [
        (SlotSpec(7), "slots[1].block=7 is out of range: allowed 0..3"),
        (SlotSpec(-1), "slots[1].block=-1 is out of range"),
        (
            SlotSpec(0, adapter=AdapterSpec(4, ("q", "qkv"))),
            "unknown target 'qkv'; allowed: ['q', 'k', 'v', 'o'",
        ),
        (SlotSpec(0, adapter=AdapterSpec(0)), "slots[1].adapter.rank=0: must be an integer >= 1"),
        (
            SlotSpec(0, adapter=AdapterSpec(4, init="pissa")),
            "slots[1].adapter.init='pissa' is unknown; allowed",
        ),
        (SlotSpec(0, adapter=AdapterSpec(4, init="svd")), "slots[1].adapter.svd_from=None: init=svd needs"),
        (
            SlotSpec(0, adapter=AdapterSpec(4, init="lora", svd_from=1)),
            "svd_from is only allowed with init='svd'",
        ),
        (SlotSpec(0, out_norm=OutNormSpec(gamma=-1.0)), "slots[1].out_norm.gamma=-1.0: must be >= 0"),
    ],
)
def test_bad_slots_name_the_field(slot, message):
    plan = Plan("llama", 4, (SlotSpec(0), slot))
    with pytest.raises(PlanError) as err:
        plan.validate()
    assert message in str(err.value)


def test_rank_above_matrix_size_names_target_and_bound():
    cfg = tiny_config("llama3")  # GQA: k/v are 32 x 64
    plan = Plan("llama", 4, (SlotSpec(0, adapter=AdapterSpec(40, ("q", "k"))),))
    with pytest.raises(
        PlanError,
        match=r"slots\[0\]\.adapter\.rank=40 exceeds the size of target 'k' \(32x64\): allowed 1\.\.32",
    ):
        plan.validate(get_layout(cfg).matrix_shapes(cfg))


def test_unknown_keys_in_json_are_refused():
    d = _plan().to_dict()
    d["slots"][0]["shared_with"] = 3
    with pytest.raises(PlanError, match=r"slots\[0\]: unknown key\(s\) \['shared_with'\]; allowed"):
        Plan.from_dict(d)
    d = _plan().to_dict()
    d["format"] = "other/2"
    with pytest.raises(PlanError, match="format='other/2' is not supported"):
        Plan.from_dict(d)


def test_unsupported_architecture_lists_supported():
    with pytest.raises(
        PlanError, match=r"model_type='gpt2' is not supported; supported: llama .*mistral .*qwen2"
    ):
        get_layout("gpt2")
