"""OPT in the shared-block engine: what differs from the LLaMA family (LayerNorms with bias, biased
linears, no gate, learned positions, attention sized from the hidden size)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

import flexigpt.shared  # noqa: F401  (registers the compact format with the Auto classes)
from flexigpt.shared.engine.apply import (
    TRAINABLE_RULES,
    apply_plan,
    expected_trainable,
    materialize,
    set_trainable,
    stored_param_count,
)
from flexigpt.shared.engine.checkpoint import export_materialized, save_compact
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import AdapterSpec, BlockShape, OutNormSpec, Plan, PlanError, SlotSpec
from flexigpt.shared.engine.tiny import tiny_config, tiny_model

TOKENS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
OPT_TARGETS = ("q", "k", "v", "o", "up", "down")


def _logits(model, x=TOKENS):
    with torch.no_grad():
        return model(x).logits


GAMMA_01 = OutNormSpec(0.1)


def _reuse_plan(out_norm: OutNormSpec | None = GAMMA_01) -> Plan:
    ad = AdapterSpec(4, targets=OPT_TARGETS, init="lora")
    slots = (
        SlotSpec(0),
        SlotSpec(1),
        SlotSpec(1, adapter=ad, out_norm=out_norm),
        SlotSpec(2),
        SlotSpec(2, adapter=ad, out_norm=out_norm, own_norms=True),
        SlotSpec(3),
    )
    return Plan("opt", 4, slots)


def _perturb_adapters(model) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)


def test_identity_plan_is_bit_equal_and_zero_slot_equals_deleting_it():
    ref = tiny_model("opt")
    shared = apply_plan(tiny_model("opt"), Plan.identity("opt", 4))
    assert type(shared).__name__ == "SharedOPTForCausalLM"
    assert torch.equal(_logits(ref), _logits(shared))
    silent = SlotSpec(
        1, adapter=AdapterSpec(4, OPT_TARGETS, init="zero"), out_norm=OutNormSpec(0.0), own_norms=True
    )
    replaced = apply_plan(tiny_model("opt"), Plan("opt", 4, (SlotSpec(0), SlotSpec(1), silent, SlotSpec(3))))
    deleted = apply_plan(tiny_model("opt"), Plan("opt", 4, (SlotSpec(0), SlotSpec(1), SlotSpec(3))))
    assert torch.equal(_logits(replaced), _logits(deleted))


def test_private_norms_own_weight_and_bias_and_counts_match_the_plan():
    model = apply_plan(tiny_model("opt"), _reuse_plan())
    layers = model.model.decoder.layers
    for name in ("weight", "bias"):
        # slot 4 owns copies of block 2's LayerNorm weight and bias; slot 2 shares block 1's
        own = getattr(layers[4].self_attn_layer_norm, name)
        assert own is not getattr(layers[3].self_attn_layer_norm, name)
        assert torch.equal(own, getattr(layers[3].self_attn_layer_norm, name))
        assert getattr(layers[2].final_layer_norm, name) is getattr(layers[1].final_layer_norm, name)
    assert layers[2].fc1.get_base_layer().bias is layers[1].fc1.bias
    counts = {rule: set_trainable(model, rule) for rule in TRAINABLE_RULES}
    assert counts["all"] == stored_param_count(model)
    assert counts == {r: expected_trainable(model.plan, model.source_config, r) for r in TRAINABLE_RULES}
    # slot 4 owns 2 LayerNorms (weight + bias each); slots 2 and 4 an output norm on out_proj and fc2
    h = model.config.hidden_size
    assert counts["adapters+norms"] - counts["adapters"] == 2 * (2 * h) + 2 * (2 * h)


def test_gate_is_refused_naming_the_allowed_targets():
    plan = Plan("opt", 4, (SlotSpec(0), SlotSpec(0, adapter=AdapterSpec(4)), SlotSpec(3)))
    with pytest.raises(
        PlanError, match=r"'gate' does not exist.*allowed: \['q', 'k', 'v', 'o', 'up', 'down'\]"
    ):
        apply_plan(tiny_model("opt"), plan)


def test_post_ln_opt_is_refused_by_name():
    with pytest.raises(PlanError, match="do_layer_norm_before=false, as facebook/opt-350m"):
        get_layout(tiny_config("opt", do_layer_norm_before=False))


def test_compact_round_trip_and_plain_export(tmp_path):
    model = apply_plan(tiny_model("opt"), _reuse_plan())
    _perturb_adapters(model)
    save_compact(model, tmp_path / "compact")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact", attn_implementation="eager")
    assert type(loaded).__name__ == "SharedOPTForCausalLM"
    assert torch.equal(_logits(loaded), _logits(model))
    assert (
        loaded.model.decoder.layers[2].fc1.get_base_layer().weight
        is loaded.model.decoder.layers[1].fc1.weight
    )

    plain_plan = apply_plan(tiny_model("opt"), _reuse_plan(out_norm=None))
    _perturb_adapters(plain_plan)
    prompt = TOKENS[:, :5]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    tokens = plain_plan.generate(prompt, **kw)
    assert torch.equal(tokens, plain_plan.generate(prompt, use_cache=False, **kw))
    export_materialized(plain_plan, tmp_path / "plain")
    plain = OPTForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager")
    assert plain.config.num_hidden_layers == 6
    torch.testing.assert_close(_logits(plain), _logits(plain_plan), rtol=1e-5, atol=1e-5)
    assert torch.equal(plain.generate(prompt, **kw), tokens)


def _narrowed_source():
    """Block 1 with 2 of 4 heads (the first two) and 100 of 160 MLP units; the same model with the
    removed heads and units zeroed in place."""
    model, zeroed = tiny_model("opt"), tiny_model("opt")
    keep_units, width = 100, 2 * 16
    with torch.no_grad():
        layer, zl = model.model.decoder.layers[1], zeroed.model.decoder.layers[1]
        for lin, zlin in (
            (layer.fc1, zl.fc1),
            *(
                (getattr(layer.self_attn, n), getattr(zl.self_attn, n))
                for n in ("q_proj", "k_proj", "v_proj")
            ),
        ):
            rows = keep_units if lin is layer.fc1 else width
            lin.weight = torch.nn.Parameter(lin.weight[:rows].clone())
            lin.bias = torch.nn.Parameter(lin.bias[:rows].clone())
            zlin.weight[rows:] = 0
            zlin.bias[rows:] = 0
        for lin, zlin, cols in (
            (layer.fc2, zl.fc2, keep_units),
            (layer.self_attn.out_proj, zl.self_attn.out_proj, width),
        ):
            lin.weight = torch.nn.Parameter(lin.weight[:, :cols].clone())
            zlin.weight[:, cols:] = 0
    return model, zeroed


def test_narrowed_block_runs_saves_and_exports(tmp_path):
    source, zeroed = _narrowed_source()
    plan = Plan("opt", 4, tuple(SlotSpec(i) for i in range(4)), block_shapes={1: BlockShape(100, 2, 2)})
    model = apply_plan(source, plan)
    assert model.model.decoder.layers[1].self_attn.q_proj.weight.shape == (32, 64)
    torch.testing.assert_close(_logits(model), _logits(zeroed), rtol=1e-5, atol=1e-5)
    assert set_trainable(model, "all") == expected_trainable(plan, model.source_config, "all")
    save_compact(model, tmp_path / "compact")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact", attn_implementation="eager")
    assert torch.equal(_logits(loaded), _logits(model))
    torch.testing.assert_close(_logits(materialize(model)), _logits(zeroed), rtol=1e-5, atol=1e-5)


def test_counts_from_the_config_alone_match_opt_1_3b_built_on_meta():
    # facebook/opt-1.3b's shapes (no weights: built on the meta device): 1,315,758,080 parameters
    cfg = OPTConfig(
        vocab_size=50272,
        hidden_size=2048,
        ffn_dim=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        max_position_embeddings=2048,
        word_embed_proj_dim=2048,
        do_layer_norm_before=True,
    )
    with torch.device("meta"):
        model = OPTForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == 1_315_758_080
    assert expected_trainable(Plan.identity("opt", 24), cfg, "all") == 1_315_758_080
