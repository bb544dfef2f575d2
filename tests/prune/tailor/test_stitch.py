"""Stitch plans and candidates built in memory: the identity plan reproduces the base exactly, one
variant everywhere reproduces that variant exactly, merges follow their formulas, blocks are read
lazily and merged once, and plans round-trip through YAML / JSON with clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexigpt.prune.tailor.build import Stitcher
from flexigpt.prune.tailor.sources import MergeOptions, SourceSet, merge_tensor
from flexigpt.prune.tailor.space import SearchSpace, removal_order, warm_starts
from flexigpt.prune.tailor.stitch import MergeSpec, Position, StitchError, StitchPlan, identity_plan

from .tailorkit import NUM_LAYERS

IDS = torch.tensor([[4, 7, 20, 35, 9, 12, 30, 33]])


@pytest.fixture(scope="module")
def sources(tailor_setting: dict[str, Path]) -> SourceSet:
    s = tailor_setting
    return SourceSet(str(s["base"]), {"colour": str(s["colour"]), "home": str(s["home"])}, cache_blocks=16)


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_identity_and_single_variant_plans_reproduce_their_models_exactly(sources, tailor_setting) -> None:
    st = Stitcher(sources, NUM_LAYERS, attn_implementation="eager")
    for name in ("base", "colour", "home"):
        ref = AutoModelForCausalLM.from_pretrained(tailor_setting[name], attn_implementation="eager").eval()
        # the variants differ from the base only in their decoder layers, so the top may stay the base's
        for top in {"base", name}:
            plan = StitchPlan(NUM_LAYERS, tuple(Position(i, name) for i in range(NUM_LAYERS)), top=top)
            assert torch.equal(_logits(st.build(plan)), _logits(ref)), (name, top)
    # and a stitched model really differs from its sources
    mixed = StitchPlan(
        NUM_LAYERS, tuple(Position(i, "colour" if i % 2 else "home") for i in range(NUM_LAYERS))
    )
    base = AutoModelForCausalLM.from_pretrained(tailor_setting["base"], attn_implementation="eager").eval()
    assert not torch.allclose(_logits(st.build(mixed)), _logits(base))


def test_merges_follow_their_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    b, v1, v2 = (torch.randn(16, 8, generator=g) for _ in range(3))
    opts = MergeOptions(ties_density=1.0)
    ta = merge_tensor(MergeSpec("task_arithmetic", ("a", "b"), 0.3), b, [v1, v2], opts)
    torch.testing.assert_close(ta, b + 0.3 * ((v1 - b) + (v2 - b)))
    lin = merge_tensor(MergeSpec("linear", ("a", "b"), 0.4), b, [v1, v2], opts)
    torch.testing.assert_close(lin, 0.6 * b + 0.4 * (v1 + v2) / 2)
    # TIES at density 1: elect each entry's sign by the summed task vectors, average the agreeing ones
    d = torch.stack([v1 - b, v2 - b]) * 0.5
    sign = torch.sign(d.sum(0))
    agree = (torch.sign(d) == sign).float()
    expect = b + (d * agree).sum(0) / (0.5 * agree).sum(0).clamp_min(1e-12)
    ties = merge_tensor(MergeSpec("ties", ("a", "b"), 0.5), b, [v1, v2], opts)
    torch.testing.assert_close(ties, expect)
    # density 0.5 keeps the larger half of each task vector's entries
    trimmed = merge_tensor(MergeSpec("ties", ("a", "b"), 1.0), b, [v1, b.clone()], MergeOptions(0.5))
    assert ((trimmed - b) != 0).sum() == (v1 - b).numel() // 2
    with pytest.raises(StitchError, match="allowed"):
        merge_tensor(MergeSpec("dare", ("a", "b"), 1.0), b, [v1, v2], opts)


def test_merged_positions_use_the_merged_tensors_and_are_computed_once(sources) -> None:
    st = Stitcher(sources, NUM_LAYERS - 2, attn_implementation="eager")
    m = MergeSpec("task_arithmetic", ("colour", "home"), 0.7)
    kept = [0, 1, 3, 4, 6, 7]
    plan = StitchPlan(
        NUM_LAYERS, tuple(Position(i, "merge", m) if i == 3 else Position(i, "base") for i in kept)
    )
    model = st.build(plan)
    name = "self_attn.q_proj.weight"
    b, c, h = (sources.raw_block(s, 3)[name] for s in ("base", "colour", "home"))
    torch.testing.assert_close(model.model.layers[2].get_parameter(name).data, b + 0.7 * ((c - b) + (h - b)))
    merges = sources.merges
    st.build(plan)
    assert sources.merges == merges  # cached, not merged again
    assert model.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(6))


def test_blocks_are_read_lazily_and_the_cache_is_bounded(sources) -> None:
    sources._cache.clear()
    before = sources.reads
    sources.raw_block("colour", 5)
    assert sources.reads == before + 1
    for name in ("base", "colour", "home"):
        for i in range(NUM_LAYERS):
            sources.raw_block(name, i)
    assert len(sources._cache) == sources.cache_blocks < 3 * NUM_LAYERS


def test_plans_round_trip_and_bad_plans_are_refused(tmp_path: Path) -> None:
    plan = StitchPlan(
        8,
        (
            Position(0),
            Position(1, "colour"),
            Position(3, "merge", MergeSpec("task_arithmetic", ("colour", "home"), 0.25)),
            Position(4, "home", None, 1.5),
            Position(5),
            Position(7),
        ),
    )
    for suffix in (".yaml", ".json"):
        assert StitchPlan.load(plan.save(tmp_path / f"p{suffix}")) == plan
    d = plan.to_dict()
    assert d["removed"] == [2, 6]
    with pytest.raises(StitchError, match="contradicts"):
        StitchPlan.from_dict({**d, "removed": [2]})
    with pytest.raises(StitchError, match="increasing"):
        StitchPlan.from_dict({**d, "positions": [{"layer": 3}, {"layer": 1}]})
    with pytest.raises(StitchError, match="unknown keys"):
        StitchPlan.from_dict({**d, "layers": 3})
    with pytest.raises(StitchError, match="allowed"):
        plan.validate(["base", "colour"])
    (tmp_path / "bad.json").write_text(json.dumps({"base_layers": 8, "positions": [{"layer": 9}]}))
    with pytest.raises(StitchError, match="allowed 0..7"):
        StitchPlan.load(tmp_path / "bad.json")


@pytest.mark.parametrize("encoding", ["source", "flags"])
@pytest.mark.parametrize("conditional", [False, True])
def test_search_space_round_trips_warm_starts_through_trial_parameters(encoding, conditional) -> None:
    import optuna

    space = SearchSpace(
        8, 2, ("colour", "home"), ("task_arithmetic",), (0.0, 1.0), False, conditional, encoding
    )
    orders = {h: removal_order(h, 8) for h in ("top", "middle", "alternating")}
    assert (
        orders["top"][:2] == [6, 5]
        and orders["middle"][:3] == [3, 4, 2]
        and orders["alternating"][:2] == [6, 1]
    )
    starts = warm_starts(space, orders, [0.5, 1.0])
    assert len(starts) == 3 * (1 + 2 + 2)
    study = optuna.create_study()
    for _, plan in starts:
        study.enqueue_trial(space.params(plan))
        trial = study.ask()
        assert space.suggest(trial) == plan
        study.tell(trial, 0.0)
    names = {k for t in study.trials for k in t.params}
    assert ("layer_0_source" in names) == (encoding == "source")
    assert ("layer_0_candidate_0" in names) == (encoding == "flags")


def test_the_source_encoding_offers_base_each_variant_and_each_merged_set() -> None:
    import optuna

    space = SearchSpace(4, 1, ("a", "b", "c"))
    assert space.choices() == ["base", "a", "b", "c", "a+b", "a+c", "b+c", "a+b+c"]
    trial = optuna.trial.FixedTrial(
        {"remove_idx_0": 1, **{f"layer_{i}_source": c for i, c in enumerate(["b", "x", "a+c", "base"])}}
        | {f"layer_{i}_merge_scale": 0.25 for i in range(4)}
    )
    with pytest.raises(ValueError):  # FixedTrial refuses a value outside the choices
        space.suggest(trial)
    trial = optuna.trial.FixedTrial(
        {"remove_idx_0": 1, **{f"layer_{i}_source": c for i, c in enumerate(["b", "a", "a+c", "base"])}}
        | {f"layer_{i}_merge_scale": 0.25 for i in range(4)}
    )
    plan = space.suggest(trial)
    assert [(p.layer, p.source) for p in plan.positions] == [(0, "b"), (2, "merge"), (3, "base")]
    assert plan.positions[1].merge.variants == ("a", "c") and plan.positions[1].merge.scale == 0.25


def test_sources_with_other_shapes_are_refused(tailor_setting, tmp_path: Path) -> None:
    from flexigpt.shared.engine.tiny import tiny_model

    tiny_model("llama2", num_layers=NUM_LAYERS, hidden=32, heads=4, vocab=64).save_pretrained(
        tmp_path / "narrow"
    )
    with pytest.raises(StitchError, match="hidden_size"):
        SourceSet(str(tailor_setting["base"]), {"narrow": str(tmp_path / "narrow")})
    assert identity_plan(3).removed == []
