"""Function-preservation invariants of the shared-block engine, on every supported architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexigpt.shared.engine.adapters import SharedLoraLinear, SharedWeightMergeError
from flexigpt.shared.engine.apply import (
    TRAINABLE_RULES,
    VerifyError,
    apply_plan,
    expected_trainable,
    materialize,
    set_trainable,
    stored_param_count,
    verify,
)
from flexigpt.shared.engine.checkpoint import export_materialized
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, PlanError, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model

TOKENS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model, x=TOKENS):
    with torch.no_grad():
        return model(x).logits


GAMMA_01 = OutNormSpec(0.1)


def _reuse_plan(model_type: str, rank: int = 4, out_norm: OutNormSpec | None = GAMMA_01) -> Plan:
    """6 slots over 4 blocks: blocks 1 and 2 each run twice, the copies with adapters + output norm."""
    ad = AdapterSpec(rank, init="lora")
    return Plan(
        model_type,
        4,
        (
            SlotSpec(0),
            SlotSpec(1),
            SlotSpec(1, adapter=ad, out_norm=out_norm),
            SlotSpec(2),
            SlotSpec(2, adapter=ad, out_norm=out_norm, own_norms=True),
            SlotSpec(3),
        ),
    )


def test_identity_plan_is_bit_equal(arch):
    ref = tiny_model(arch)
    shared = apply_plan(tiny_model(arch), Plan.identity(ref.config.model_type, 4))
    assert torch.equal(_logits(ref), _logits(shared))
    assert type(shared).__name__.startswith("Shared")


def test_zero_adapter_zero_gamma_slot_equals_deleting_it(arch):
    mt = tiny_model(arch).config.model_type
    # slot 2 runs block 1 instead of block 2, with zero adapters and gamma 0: it adds nothing
    silent = SlotSpec(1, adapter=AdapterSpec(4, init="zero"), out_norm=OutNormSpec(gamma=0.0))
    replaced = apply_plan(tiny_model(arch), Plan(mt, 4, (SlotSpec(0), SlotSpec(1), silent, SlotSpec(3))))
    deleted = apply_plan(tiny_model(arch), Plan(mt, 4, (SlotSpec(0), SlotSpec(1), SlotSpec(3))))
    assert torch.equal(_logits(replaced), _logits(deleted))


def test_full_rank_difference_reproduces_the_replaced_block(arch):
    ref = tiny_model(arch)
    source = tiny_model(arch)
    layout = get_layout(ref.config)
    if layout.biased_linears(ref.config):
        # LoRA carries no bias: give block 2 the biases of block 1 in both models (the test is
        # about weights; a bias difference is outside what an adapter can express)
        for m in (ref, source):
            for t in layout.biased_linears(ref.config):
                path = layout.linear_path(t)
                with torch.no_grad():
                    m.model.layers[2].get_submodule(path).bias.copy_(
                        m.model.layers[1].get_submodule(path).bias
                    )
    shapes = layout.matrix_shapes(ref.config)
    # every target gets its full rank (GQA k/v are smaller than q): W_1 + B @ A == W_2 exactly
    full = {t: min(s) for t, s in shapes.items()}
    adapter = AdapterSpec(max(full.values()), init="svd", svd_from=2, rank_pattern=full)
    slots = (SlotSpec(0), SlotSpec(1), SlotSpec(1, adapter=adapter, own_norms=True), SlotSpec(3))
    model = apply_plan(source, Plan(ref.config.model_type, 4, slots))
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=1e-4, atol=1e-4)
    # and per layer, the adapted weight equals block 2's weight
    q = model.model.layers[2].self_attn.q_proj
    merged = q.get_base_layer().weight + q.delta_weight()
    torch.testing.assert_close(merged, ref.model.layers[2].self_attn.q_proj.weight, rtol=1e-5, atol=1e-5)


def test_shared_weights_share_storage_slot_params_do_not(arch):
    model = apply_plan(tiny_model(arch), _reuse_plan(tiny_model(arch).config.model_type))
    layers = model.model.layers
    # slot 2 runs block 1 (owner: slot 1) through a LoRA wrapper and an output norm
    owner_q = layers[1].self_attn.q_proj.weight
    reuse_q = layers[2].self_attn.q_proj.get_base_layer().weight
    assert reuse_q is owner_q and reuse_q.data_ptr() == owner_q.data_ptr()
    owner_o = layers[1].self_attn.o_proj.weight
    reuse_o = layers[2].self_attn.o_proj.base_layer.get_base_layer().weight
    assert reuse_o.data_ptr() == owner_o.data_ptr()
    # norms: slot 2 shares block 1's, slot 4 owns copies of block 2's
    assert layers[2].input_layernorm.weight.data_ptr() == layers[1].input_layernorm.weight.data_ptr()
    assert layers[4].input_layernorm.weight.data_ptr() != layers[3].input_layernorm.weight.data_ptr()
    assert torch.equal(layers[4].input_layernorm.weight, layers[3].input_layernorm.weight)
    # slot-owned parameters are distinct tensors
    a2 = layers[2].self_attn.q_proj.lora_A["default"].weight
    a4 = layers[4].self_attn.q_proj.lora_A["default"].weight
    assert a2.data_ptr() != a4.data_ptr()
    n2 = layers[2].self_attn.o_proj.out_norm.weight
    n4 = layers[4].self_attn.o_proj.out_norm.weight
    assert n2.data_ptr() != n4.data_ptr()
    # each slot has its own KV-cache index; config is kept true
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(6))
    assert model.config.num_hidden_layers == 6
    # stored parameters: 4 blocks once + slot-owned
    dense = tiny_model(arch)
    slot_owned = expected_trainable(model.plan, dense.config, "adapters+norms")
    assert stored_param_count(model) == sum(p.numel() for p in dense.parameters()) + slot_owned


def test_verify_catches_a_broken_share(arch):
    model = apply_plan(tiny_model(arch), _reuse_plan(tiny_model(arch).config.model_type))
    verify(model)
    lin = model.model.layers[2].self_attn.q_proj.get_base_layer()
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone())  # a silent copy breaks sharing
    with pytest.raises(
        VerifyError, match=r"slot 2: self_attn\.q_proj\.weight is not the same Parameter as block 1"
    ):
        verify(model)


def test_merge_into_shared_weight_is_refused():
    model = apply_plan(tiny_model("llama2"), _reuse_plan("llama"))
    lora = model.model.layers[2].self_attn.q_proj
    assert isinstance(lora, SharedLoraLinear)
    before = lora.get_base_layer().weight.clone()
    with pytest.raises(SharedWeightMergeError, match="refusing to merge"):
        lora.merge()
    assert torch.equal(lora.get_base_layer().weight, before)


def test_trainable_rules_match_the_plan(arch):
    model = apply_plan(tiny_model(arch), _reuse_plan(tiny_model(arch).config.model_type))
    counts = {rule: set_trainable(model, rule) for rule in TRAINABLE_RULES}
    assert counts["adapters"] < counts["adapters+norms"] < counts["all"] == stored_param_count(model)
    set_trainable(model, "adapters")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    with pytest.raises(PlanError, match="trainable rule 'lora' is unknown; allowed"):
        set_trainable(model, "lora")


def test_shared_block_gets_gradients_from_every_slot():
    model = apply_plan(tiny_model("llama2"), _reuse_plan("llama", out_norm=OutNormSpec(1.0)))
    set_trainable(model, "all")
    model(TOKENS, labels=TOKENS).loss.backward()
    w = model.model.layers[1].mlp.up_proj.weight
    g_both = w.grad.clone()
    # the same loss with slot 2 silenced: block 1's gradient changes, so slot 2 contributed
    model.zero_grad()
    with torch.no_grad():
        for m in (model.model.layers[2].self_attn.o_proj, model.model.layers[2].mlp.down_proj):
            m.out_norm.weight.zero_()
    model(TOKENS, labels=TOKENS).loss.backward()
    assert not torch.allclose(g_both, w.grad)


def test_generate_with_cache_matches_materialized_export(arch, tmp_path):
    mt = tiny_model(arch).config.model_type
    plan = _reuse_plan(mt, out_norm=None)
    model = apply_plan(tiny_model(arch), plan)
    with torch.no_grad():  # make the adapters non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    prompt = TOKENS[:, :5]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    shared_tokens = model.generate(prompt, **kw)
    assert torch.equal(shared_tokens, model.generate(prompt, use_cache=False, **kw))
    export_materialized(model, tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager")
    assert type(plain).__name__ == type(tiny_model(arch)).__name__
    assert plain.config.num_hidden_layers == 6
    assert torch.equal(plain.generate(prompt, **kw), shared_tokens)
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=1e-5, atol=1e-5)


def test_materialize_refuses_output_norm_unless_kept():
    model = apply_plan(tiny_model("llama2"), _reuse_plan("llama"))
    with pytest.raises(PlanError, match=r"slots \[2, 4\] have output feature norms"):
        materialize(model)
    dense = materialize(model, keep_output_norm=True)
    torch.testing.assert_close(_logits(dense), _logits(model), rtol=1e-5, atol=1e-5)
    assert isinstance(dense, type(tiny_model("llama2")))
    # private copies: training the dense model leaves the shared one untouched
    assert (
        dense.model.layers[2].self_attn.q_proj.weight.data_ptr()
        != dense.model.layers[1].self_attn.q_proj.weight.data_ptr()
    )


def test_saving_a_model_that_kept_output_norms_is_refused_like_the_export(tmp_path):
    model = apply_plan(tiny_model("llama2"), _reuse_plan("llama"))
    dense = materialize(model, keep_output_norm=True)
    with pytest.raises(PlanError) as save_err:
        dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(PlanError) as export_err:
        export_materialized(model, tmp_path / "plain")
    assert str(save_err.value) == str(export_err.value)
    assert "slots [2, 4] have output feature norms" in str(save_err.value)
    assert not any(tmp_path.iterdir())  # neither wrote anything


def test_plan_must_fit_the_model():
    with pytest.raises(PlanError, match="num_source_layers=6 does not match the source model"):
        apply_plan(tiny_model("llama2"), Plan.identity("llama", 6))
    with pytest.raises(PlanError, match="model_type='qwen2' does not match"):
        apply_plan(tiny_model("llama2"), Plan.identity("qwen2", 4))
    bad = Plan("llama", 4, (SlotSpec(0, adapter=AdapterSpec(1000)),))
    with pytest.raises(PlanError, match=r"rank=1000 exceeds the size of target 'q'"):
        apply_plan(tiny_model("llama2"), bad)


def test_trainable_count_follows_per_target_ranks():
    plan = Plan(
        "llama",
        4,
        (SlotSpec(0), SlotSpec(1), SlotSpec(1, adapter=AdapterSpec(8, rank_pattern={"k": 4})), SlotSpec(3)),
    )
    model = apply_plan(tiny_model("llama3"), plan)
    shapes = get_layout(model.config).matrix_shapes(model.config)
    want = sum((4 if t == "k" else 8) * sum(shapes[t]) for t in shapes)
    assert set_trainable(model, "adapters") == want
    assert model.model.layers[2].self_attn.k_proj.lora_A["default"].weight.shape[0] == 4
