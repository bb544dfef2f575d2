"""Replacement plans: as data (each ablation switch changes exactly what it names) and applied by
the engine to tiny models of every architecture (exact reproduction, ShortGPT equivalences)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexigpt.prune.depth.replace import (
    REPLACEMENTS,
    ReplacementOptions,
    build_plan,
    calibrate_gamma,
    choose_bases,
    flexigpt_plan,
    shortgpt_lora_plan,
    shortgpt_plan,
)
from flexigpt.prune.depth.selection import BlockSource, SelectionResult, select_bases, source_from_model
from flexigpt.shared.engine.adapters import OutputNorm, SharedLoraLinear
from flexigpt.shared.engine.apply import apply_plan, canonical_name, set_trainable
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import TARGETS, Plan, PlanError
from flexigpt.shared.engine.tiny import tiny_config, tiny_model
from flexigpt.shared.evaluate.perplexity import sample_perplexity

PICKS = {1: 0, 2: 0, 4: 5}  # block 0 serves two removed blocks


def _slot_diffs(a: Plan, b: Plan) -> set[str]:
    """Dotted paths (slot index + field) where two plans' slots differ."""
    out = set()
    for i, (sa, sb) in enumerate(zip(a.to_dict()["slots"], b.to_dict()["slots"], strict=True)):
        for key in sa:
            va, vb = sa[key], sb[key]
            if isinstance(va, dict) and isinstance(vb, dict):
                out |= {f"{i}.{key}.{k}" for k in va if va[k] != vb[k]}
            elif va != vb:
                out.add(f"{i}.{key}")
    return out


# ------------------------------------------------------------------------------------ plans as data


def test_flexigpt_plan_defaults_follow_the_paper() -> None:
    plan = flexigpt_plan("llama", 6, PICKS)
    assert plan.num_slots == 6 and plan.removed_blocks == (1, 2, 4)
    assert [s.block for s in plan.slots] == [0, 0, 0, 3, 5, 5]
    for i in (0, 3, 5):
        assert plan.slots[i].is_plain
    for i, j in PICKS.items():
        s = plan.slots[i]
        assert s.block == j and not s.own_norms
        assert (s.adapter.rank, s.adapter.targets, s.adapter.init, s.adapter.svd_from) == (
            256,
            TARGETS,
            "svd",
            i,
        )
        assert s.adapter.alpha is None and s.out_norm.gamma == 0.01
    assert plan.notes["picks"] == {"1": 0, "2": 0, "4": 5}
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    ("switch", "fields"),
    [
        ({"svd_init": False}, {"adapter.init", "adapter.svd_from"}),
        ({"svd_init": False, "init_without_svd": "zero"}, {"adapter.init", "adapter.svd_from"}),
        ({"out_norm": False}, {"out_norm"}),
        ({"gamma": 0.1}, {"out_norm.gamma"}),
        ({"own_norms": True}, {"own_norms"}),
        ({"rank": 8}, {"adapter.rank"}),
        ({"low_rank_metric": False}, set()),  # a selection switch: it changes the picks, not this
    ],
)
def test_each_switch_changes_exactly_what_it_names(switch: dict[str, Any], fields: set[str]) -> None:
    full = flexigpt_plan("llama", 6, PICKS)
    ablated = flexigpt_plan("llama", 6, PICKS, ReplacementOptions(**switch))
    assert _slot_diffs(full, ablated) == {f"{i}.{f}" for i in PICKS for f in fields}
    assert ablated.notes["options"] == {**full.notes["options"], **switch}


def test_low_rank_metric_switch_only_changes_the_bases(drifting: Callable[..., BlockSource]) -> None:
    src = drifting()
    removed = [2, 4, 6]
    on = choose_bases(src, removed, ReplacementOptions(metric_rank=16), progress=False)
    off = choose_bases(
        src, removed, ReplacementOptions(metric_rank=16, low_rank_metric=False), progress=False
    )
    assert (on.metric, off.metric) == ("low_rank", "frobenius")
    assert on.picks == {2: 1, 4: 3, 6: 5} and off.picks != on.picks
    plan_on = flexigpt_plan("llama", 8, on.picks)
    plan_off = flexigpt_plan("llama", 8, off.picks)
    assert _slot_diffs(plan_on, plan_off) == {f"{i}.block" for i in removed if on.picks[i] != off.picks[i]}


def test_baseline_plans() -> None:
    short = shortgpt_plan("mistral", 6, [1, 4])
    assert [s.block for s in short.slots] == [0, 2, 3, 5] and all(s.is_plain for s in short.slots)
    assert short.removed_blocks == (1, 4)
    lora = shortgpt_lora_plan("mistral", 6, [1, 4], rank=8, targets=("q", "v"))
    assert [s.block for s in lora.slots] == [0, 2, 3, 5]
    assert all(
        s.adapter.rank == 8 and s.adapter.targets == ("q", "v") and s.out_norm is None for s in lora.slots
    )
    assert set(REPLACEMENTS) == {"flexigpt", "shortgpt", "shortgpt_lora"}


def test_build_plan_clamps_ranks_to_small_gqa_matrices() -> None:
    cfg = tiny_config("llama3", num_layers=6)  # k, v: 32 x 64
    sel = SelectionResult(PICKS, [], {}, sorted(PICKS), 8, "low_rank", "sum", "fast", "exact")
    plan = build_plan("flexigpt", cfg, sel, ReplacementOptions(rank=48))
    assert plan.slots[1].adapter.rank_pattern == {"k": 32, "v": 32}
    assert plan.notes["selection"] == {"metric": "low_rank", "rank": 8, "combine": "sum"}
    assert build_plan("shortgpt", cfg, sel).removed_blocks == (1, 2, 4)
    assert build_plan("shortgpt_lora", cfg, [1, 2, 4], ReplacementOptions(rank=40)).slots[
        0
    ].adapter.rank_pattern == {
        "k": 32,
        "v": 32,
    }


def test_bad_input_is_named() -> None:
    with pytest.raises(PlanError, match=r"picks\[1\]=2"):
        flexigpt_plan("llama", 6, {1: 2, 2: 0})
    with pytest.raises(PlanError, match="removed="):
        shortgpt_plan("llama", 4, [0, 1, 2, 3])
    with pytest.raises(PlanError, match="replacement='bogus'"):
        build_plan("bogus", tiny_config(), [1])
    with pytest.raises(PlanError, match="needs a SelectionResult"):
        build_plan("flexigpt", tiny_config(), [1])
    for kw, match in [
        ({"rank": 0}, "rank=0"),
        ({"targets": ("q", "x")}, "targets="),
        ({"init_without_svd": "svd"}, "init_without_svd='svd'"),
        ({"gamma": -1.0}, "gamma=-1.0"),
        ({"combine": "max"}, "combine='max'"),
        ({"svd": "qr"}, "svd='qr'"),
    ]:
        with pytest.raises(PlanError, match=match):
            ReplacementOptions(**kw)


# ------------------------------------------------------------------------------------ applied


def _ids(length: int = 24) -> torch.Tensor:
    # longer than the tiny sliding window (16), so mistral / qwen2 windowed layers are exercised
    return torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _skipping(model: torch.nn.Module, blocks: list[int]) -> list[Any]:
    """Hooks that make the given source blocks return their input (what deleting them does)."""
    layers = model.get_submodule(get_layout(model.config).layers_path)
    return [layers[b].register_forward_hook(lambda m, a, o: a[0]) for b in blocks]


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return get_layout(model.config).matrix_shapes(model.config)


@pytest.mark.parametrize("own_norms", [False, True])
def test_full_rank_svd_replacement_reproduces_the_removed_block(arch: str, own_norms: bool) -> None:
    model = tiny_model(arch, num_layers=4)
    layers = model.model.layers
    # j has i's attention type: a slot runs its base block's (Qwen2 layers 2-3 use a sliding window).
    i, j = 2, 3
    with torch.no_grad():
        # A slot runs its base's biases (Qwen2 q/k/v) and, unless it owns them, its base's norms;
        # give block i the same so that only the linear weights differ.
        for name, p in layers[i].named_parameters():
            if name.endswith(".bias") or (not own_norms and "layernorm" in name):
                p.copy_(layers[j].get_parameter(name))
    ref = _logits(model, _ids())
    hidden = model.config.hidden_size
    options = ReplacementOptions(rank=hidden, out_norm=False, own_norms=own_norms)  # full rank (k/v clamped)
    plan = flexigpt_plan(model.config.model_type, 4, {i: j}, options, matrix_shapes=_shapes(model))
    shared = apply_plan(model, plan)
    assert (
        shared.model.layers[i].self_attn.q_proj.base_layer.weight
        is shared.model.layers[j].self_attn.q_proj.weight
    )
    torch.testing.assert_close(_logits(shared, _ids()), ref, atol=2e-5, rtol=1e-4)


def test_shortgpt_plan_deletes_exactly_the_chosen_blocks(arch: str) -> None:
    model = tiny_model(arch, num_layers=5)
    removed = [1, 3]
    handles = _skipping(model, removed)
    ref = _logits(model, _ids())
    for h in handles:
        h.remove()
    full = _logits(model, _ids())
    pruned = apply_plan(model, shortgpt_plan(model.config.model_type, 5, removed))
    assert pruned.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    kept = [model.model.layers[b].mlp.up_proj.weight for b in (0, 2, 4)]
    assert all(p.mlp.up_proj.weight is k for p, k in zip(pruned.model.layers, kept, strict=True))
    out = _logits(pruned, _ids())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, full, atol=1e-3)


def test_zero_gamma_replacement_equals_shortgpt_and_lora_baseline_starts_there(arch: str) -> None:
    cfg_model = tiny_model(arch, num_layers=5)
    short = _logits(apply_plan(cfg_model, shortgpt_plan(cfg_model.config.model_type, 5, [1, 3])), _ids())
    shapes = _shapes(cfg_model)
    mt = cfg_model.config.model_type
    silent = flexigpt_plan(mt, 5, {1: 0, 3: 0}, ReplacementOptions(rank=8, gamma=0.0), matrix_shapes=shapes)
    torch.testing.assert_close(_logits(apply_plan(tiny_model(arch, num_layers=5), silent), _ids()), short)
    lora = shortgpt_lora_plan(mt, 5, [1, 3], rank=8, matrix_shapes=shapes)
    torch.testing.assert_close(_logits(apply_plan(tiny_model(arch, num_layers=5), lora), _ids()), short)


def _deltas(model: torch.nn.Module, slot: int) -> dict[str, torch.Tensor]:
    layer = model.model.layers[slot]
    return {
        canonical_name(n): m.delta_weight().detach()
        for n, m in layer.named_modules()
        if isinstance(m, SharedLoraLinear)
    }


def test_applied_switches_change_only_their_part() -> None:
    def build(**switch: Any) -> torch.nn.Module:
        model = tiny_model("llama2", num_layers=4)
        return apply_plan(model, flexigpt_plan("llama", 4, {2: 1}, ReplacementOptions(rank=16, **switch)))

    full, no_svd, no_norm = build(), build(svd_init=False), build(out_norm=False)
    norms = {
        name: [isinstance(m, OutputNorm) for m in mdl.modules()].count(True)
        for name, mdl in (("full", full), ("no_svd", no_svd), ("no_norm", no_norm))
    }
    assert norms == {"full": 2, "no_svd": 2, "no_norm": 0}
    svd = _deltas(full, 2)
    assert len(svd) == 7 and all(float(d.abs().max()) > 1e-3 for d in svd.values())
    assert all(float(d.abs().max()) == 0.0 for d in _deltas(no_svd, 2).values())  # standard LoRA: B = 0
    assert _deltas(no_norm, 2).keys() == svd.keys()
    for name, d in _deltas(no_norm, 2).items():
        torch.testing.assert_close(d, svd[name])
    # The svd adapter is the top-16 SVD of W_2 - W_1 (eq. 7-8, full weights).
    src = tiny_model("llama2", num_layers=4).model.layers
    diff = src[2].self_attn.q_proj.weight - src[1].self_attn.q_proj.weight
    u, s, vh = torch.linalg.svd(diff)
    torch.testing.assert_close(svd["self_attn.q_proj"], (u[:, :16] * s[:16]) @ vh[:16], atol=1e-5, rtol=1e-4)
    # The trainer's hand-off: one slot's adapters on seven linears plus two output-norm gammas.
    assert (
        set_trainable(full, "adapters+norms") == sum(16 * (o + i) for o, i in _shapes(full).values()) + 2 * 64
    )


def perplexity(model: torch.nn.Module, samples: list[torch.Tensor]) -> float:
    """The package's one perplexity, on calibration samples (what calibrate_gamma measures with)."""
    return sample_perplexity(model, samples).ppl


def test_calibrate_gamma_targets_the_shortgpt_perplexity() -> None:
    samples = [_ids(32)[:1], _ids(32)[1:]]
    short = perplexity(
        apply_plan(tiny_model("llama3", num_layers=5), shortgpt_plan("llama", 5, [1, 3])), samples
    )
    model = apply_plan(
        tiny_model("llama3", num_layers=5),
        flexigpt_plan(
            "llama", 5, {1: 0, 3: 2}, ReplacementOptions(rank=8), matrix_shapes=_shapes(tiny_model("llama3"))
        ),
    )
    cal = calibrate_gamma(model, samples, candidates=(0.5, 0.01, 2.0), progress=False)
    assert cal.target_ppl == pytest.approx(short, rel=1e-6)
    assert [g for g, _ in cal.table] == [0.01, 0.5, 2.0]
    below = [g for g, p in cal.table if p <= short]
    assert cal.gamma == (max(below) if below else min(cal.table, key=lambda gp: gp[1])[0])
    gammas = [m.out_norm.weight.detach() for m in model.modules() if isinstance(m, OutputNorm)]
    assert len(gammas) == 4 and all(torch.all(g == torch.tensor(cal.gamma)) for g in gammas)
    assert perplexity(model, samples) == pytest.approx(dict(cal.table)[cal.gamma], rel=1e-6)
    closest = calibrate_gamma(
        model, samples, candidates=(0.01, 2.0), target_ppl=cal.table[-1][1], rule="closest", progress=False
    )
    assert closest.gamma == 2.0
    with pytest.raises(ValueError, match="rule='best'"):
        calibrate_gamma(model, samples, rule="best")
    with pytest.raises(ValueError, match="no output norms"):
        calibrate_gamma(apply_plan(tiny_model(num_layers=3), shortgpt_plan("llama", 3, [1])), samples)


def test_pruned_model_from_selected_bases_round_trips_the_compact_format(tmp_path: Path) -> None:
    model = tiny_model("qwen2", num_layers=6)
    sel = select_bases(source_from_model(model), [2, 3], rank=8, progress=False)
    plan = build_plan("flexigpt", model.config, sel, ReplacementOptions(rank=8))
    shared = apply_plan(model, plan)
    before = _logits(shared, _ids())
    shared.save_pretrained(str(tmp_path / "pruned"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"))
    assert back.plan == plan
    torch.testing.assert_close(_logits(back, _ids()), before)
    assert replace(plan, notes={}).removed_blocks == (2, 3)
