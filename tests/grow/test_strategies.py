"""Expansion plans as pure data: slot orders, span / depth checks, the registry, the recipe section."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig

from flexigpt.grow.build import check_fits, param_counts
from flexigpt.grow.recipe import GrowRecipe, GrowSection
from flexigpt.grow.strategies import (
    STRATEGIES,
    DensePlan,
    GrowError,
    GrowOptions,
    build_plan,
    get_strategy,
    grown_order,
    register_strategy,
)
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan
from flexigpt.shared.recipe import RecipeError, load_recipe

REPO_ROOT = Path(__file__).resolve().parents[2]
SPAN = list(range(3, 17))  # the default span of the 22 -> 36 recipes


def tinyllama_config() -> LlamaConfig:
    """TinyLlama 1.1B's shape (the 3T checkpoint's config.json), built locally."""
    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def test_block_pattern_22_to_36_is_each_block_then_its_copy():
    plan = build_plan("block", "llama", 22, GrowSection(target_layers=36).options())
    assert isinstance(plan, Plan) and plan.num_slots == 36
    want = [0, 1, 2] + [b for s in SPAN for b in (s, s)] + list(range(17, 22))
    assert [s.block for s in plan.slots] == want
    # the first occurrence of every block is the original block; the copies carry the slot params
    copies = plan.reusing_slots()
    assert copies == tuple(4 + 2 * i for i in range(14))
    for i, s in enumerate(plan.slots):
        if i in copies:
            assert (
                s.adapter == AdapterSpec(256, init="lora") and s.out_norm == OutNormSpec(0.01) and s.own_norms
            )
        else:
            assert s.is_plain
    assert plan.notes["span"] == SPAN and plan.physical_blocks == tuple(range(22))


def test_sequential_pattern_22_to_36_repeats_the_span_as_a_unit():
    plan = build_plan(
        "sequential", "llama", 22, GrowSection(strategy="sequential", target_layers=36).options()
    )
    assert [s.block for s in plan.slots] == list(range(17)) + SPAN + list(range(17, 22))
    assert plan.reusing_slots() == tuple(range(17, 31))
    assert all(plan.slots[i].is_plain for i in range(17)) and all(s.is_plain for s in plan.slots[31:])


@pytest.mark.parametrize(
    ("pattern", "repeat", "want"),
    [
        ("block", 2, [(0, 0), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0)]),
        ("sequential", 2, [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (1, 2), (2, 2), (3, 0)]),
        ("block", 1, [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]),
    ],
)
def test_orders_with_repeats(pattern, repeat, want):
    assert list(grown_order(4, (1, 2), repeat, pattern)) == want


def test_stride_repeats_every_kth_block_as_llama_pro_does():
    # LLaMA-Pro's own layout of LLaMA-2-7B: 32 -> 40 with a copy after every 4th block
    opts = GrowOptions(start=3, end=31, stride=4, target_layers=40)
    plan = build_plan("llama_pro", "llama", 32, opts)
    assert isinstance(plan, DensePlan)
    assert plan.inserted == tuple(4 + 5 * g for g in range(8))
    assert [plan.order[i] for i in plan.inserted] == [3, 7, 11, 15, 19, 23, 27, 31]
    assert (plan.init, plan.trainable) == ("zero_out", "inserted")


def test_end_can_be_derived_from_the_target_depth():
    plan = build_plan("block", "llama", 22, GrowOptions(start=3, end=None, target_layers=36))
    assert plan.notes["end"] == 16 and plan.num_slots == 36
    plan = build_plan("sequential", "llama", 22, GrowOptions(start=5, end=None, repeat=2, target_layers=36))
    assert plan.notes["span"] == list(range(5, 12)) and plan.num_slots == 36


@pytest.mark.parametrize(
    ("opts", "key"),
    [
        (GrowOptions(start=3, end=18, target_layers=36), "grow.target_layers=36"),  # '3 through 18' -> 38
        (GrowOptions(start=22, end=23), "grow.start=22"),
        (GrowOptions(start=3, end=22), "grow.end=22"),
        (GrowOptions(start=3, end=None), "grow.end is null"),
        (GrowOptions(start=3, end=None, repeat=4, target_layers=36), "grow.target_layers=36"),
        (GrowOptions(repeat=0), "grow.repeat=0"),
    ],
)
def test_bad_spans_name_the_key(opts, key):
    with pytest.raises(GrowError, match=key.replace(".", r"\.")):
        build_plan("block", "llama", 22, opts)


def test_registry_lists_strategies_and_checks_signatures():
    assert {k: v.kind for k, v in STRATEGIES.items()} == {
        "block": "shared",
        "sequential": "shared",
        "llama_pro": "dense",
        "stack": "dense",
        "solar": "dense",
        "solar_shared": "shared",
    }
    with pytest.raises(
        GrowError, match=r"allowed: \['block', 'llama_pro', 'sequential', 'solar', 'solar_shared', 'stack'\]"
    ):
        get_strategy("blocks")
    with pytest.raises(GrowError, match="parameters must be"):
        register_strategy("bad", "shared")(lambda n, opts: None)
    with pytest.raises(GrowError, match="already registered"):
        register_strategy("block", "shared")(lambda model_type, num_layers, opts: None)


def test_dense_plan_round_trips_and_validates(tmp_path):
    plan = build_plan("stack", "qwen2", 6, GrowOptions(start=1, end=3, placement="sequential"))
    assert plan.order == (0, 1, 2, 3, 1, 2, 3, 4, 5) and plan.inserted == (4, 5, 6)
    plan.save(tmp_path / "p.json")
    assert DensePlan.load(tmp_path / "p.json") == plan
    with pytest.raises(GrowError, match="non-inserted layers"):
        DensePlan("llama", 4, (0, 1, 1, 3), (2,)).validate()
    with pytest.raises(GrowError, match="unknown key"):
        DensePlan.from_dict({**plan.to_dict(), "extra": 1})


def test_tinyllama_22_to_36_parameter_arithmetic():
    cfg = tinyllama_config()
    plan = build_plan("block", "llama", 22, GrowSection(target_layers=36).options())
    check_fits(plan, cfg)
    c = param_counts(plan, cfg)
    block = 2 * 2048 * 2048 + 2 * 256 * 2048 + 3 * 5632 * 2048 + 2 * 2048  # q,o + k,v + mlp + 2 norms
    top = 2 * 32000 * 2048 + 2048
    lora = 256 * (2 * (2048 + 2048) + 2 * (256 + 2048) + 3 * (5632 + 2048))  # r x (in + out), 7 targets
    assert lora == 9_175_040 and c.source == top + 22 * block == 1_100_048_384
    norms = 2 * 2048 + 2 * 2048  # output norms (attn, mlp) + own input / post-attention norms
    assert c.stored == c.source + 14 * (lora + norms) == 1_228_613_632
    assert c.dense_equivalent == top + 36 * block == 1_716_668_416
    dense = param_counts(build_plan("llama_pro", "llama", 22, GrowOptions(target_layers=36)), cfg)
    assert dense.stored == dense.dense_equivalent and dense.new_slot_params == 14 * block


def test_adapter_rank_beyond_a_matrix_names_the_recipe_key():
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    plan = build_plan("block", "llama", 4, GrowSection(start=1, end=2).options())
    with pytest.raises(GrowError, match=r"grow\.adapter\.rank=256 exceeds target 'q'"):
        check_fits(plan, cfg)


def _recipe(**grow):
    return {
        "kind": "grow",
        "model": {"source": "m"},
        "train": {"max_steps": 1, "grad_accum": 1},
        "output_dir": "o",
        "grow": grow,
    }


@pytest.mark.parametrize(
    ("grow", "message"),
    [
        ({"strategy": "llama_pro", "adapter": {"rank": 8}}, "adapter: only the shared strategies"),
        ({"strategy": "block", "placement": "block"}, "placement: only the dense strategies"),
        ({"strategy": "mystery"}, "strategy='mystery' is unknown"),
        ({"start": 5, "end": 4}, "end=4 is before start=5"),
        ({"end": None}, "end: null needs target_layers"),
        ({"adapter": {"init": "svd"}}, "grow.adapter.init"),
        ({"adapterr": {}}, "did you mean 'adapter'"),
    ],
)
def test_recipe_section_errors_name_the_key(grow, message):
    from flexigpt.shared.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(_recipe(**grow))


def test_dense_recipe_needs_trainable_all():
    from flexigpt.shared.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match="train.trainable='adapters\\+norms': a dense grown model"):
        recipe_from_dict(_recipe(strategy="stack"))


@pytest.mark.parametrize(
    ("name", "order"),
    [
        ("tinyllama-22to36-block.yaml", [0, 1, 2] + [b for s in SPAN for b in (s, s)] + list(range(17, 22))),
        ("tinyllama-22to36-sequential.yaml", list(range(17)) + SPAN + list(range(17, 22))),
        ("llama-pro-baseline.yaml", [0, 1, 2] + [b for s in SPAN for b in (s, s)] + list(range(17, 22))),
    ],
)
def test_shipped_tinyllama_recipes_make_the_specified_plans(name, order):
    recipe = load_recipe(REPO_ROOT / "recipes" / "grow" / name)
    assert isinstance(recipe, GrowRecipe)
    assert recipe.model.source == "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
    t = recipe.train
    assert (t.lr, t.global_batch, t.token_budget, recipe.data.source) == (
        4e-3 if "block" in name or "sequential" in name else 2e-4,
        480,
        10_000_000_000,
        "slimpajama",
    )
    plan = build_plan(recipe.grow.strategy, "llama", 22, recipe.grow.options())
    layers = [s.block for s in plan.slots] if isinstance(plan, Plan) else list(plan.order)
    assert layers == order
    check_fits(plan, tinyllama_config())
