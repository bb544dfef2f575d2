"""Grown models on every architecture of the engine: function preservation, freezing, storage, generate."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from flexigpt.grow.build import grow_model, param_counts
from flexigpt.grow.dense import set_dense_trainable
from flexigpt.grow.strategies import GrowOptions, build_plan
from flexigpt.shared.engine.adapters import SharedLoraLinear, lora_factors
from flexigpt.shared.engine.apply import materialize, set_trainable, stored_param_count
from flexigpt.shared.engine.checkpoint import export_materialized, load_compact, save_compact
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec
from flexigpt.shared.engine.tiny import tiny_model

TOKENS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
LAYERS = 5
SPAN = {"start": 1, "end": 3}  # blocks 1..3 repeated once: 5 -> 8 layers


def _opts(**kw) -> GrowOptions:
    base = {"adapter": AdapterSpec(8, init="lora"), "out_norm": OutNormSpec(0.0), "own_norms": True, **SPAN}
    return GrowOptions(**{**base, **kw})


def _grow(arch: str, strategy: str, **kw):
    source = tiny_model(arch, num_layers=LAYERS)
    plan = build_plan(strategy, source.config.model_type, LAYERS, _opts(**kw))
    return grow_model(source, plan, seed=0), plan


def _logits(model, x=TOKENS):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("strategy", ["block", "sequential"])
def test_gamma_zero_grown_model_equals_the_source(arch, strategy):
    ref = tiny_model(arch, num_layers=LAYERS)
    grown, plan = _grow(arch, strategy)
    assert grown.config.num_hidden_layers == 8 == plan.num_slots
    assert [layer.self_attn.layer_idx for layer in grown.model.layers] == list(range(8))
    assert torch.equal(_logits(grown), _logits(ref))
    # gamma 0 silences the copies whatever their adapters hold: give the adapters random values
    with torch.no_grad():
        for m in grown.modules():
            if isinstance(m, SharedLoraLinear):
                lora_factors(m)[1].normal_()
    assert torch.equal(_logits(grown), _logits(ref))


@pytest.mark.parametrize(("strategy", "placement"), [("block", "block"), ("sequential", "sequential")])
def test_zero_adapters_without_output_norm_make_exact_copies(arch, strategy, placement):
    grown, plan = _grow(arch, strategy, adapter=AdapterSpec(8, init="zero"), out_norm=None)
    layout = get_layout(grown.config)
    plain = materialize(grown)  # adapters merged into private copies of the weights
    ref = tiny_model(arch, num_layers=LAYERS)
    src = ref.model.layers
    for i, s in enumerate(plan.slots):
        want = src[s.block].state_dict()
        got = plain.model.layers[i].state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), f"slot {i}"
    # each copy's norms are its own Parameters (same values), its linears its block's Parameters
    for i in plan.reusing_slots():
        copy, owner = grown.model.layers[i], grown.model.layers[plan.owner_slot(plan.slots[i].block)]
        for norm in layout.norms:
            a, b = copy.get_submodule(norm).weight, owner.get_submodule(norm).weight
            assert a is not b and torch.equal(a, b)
        assert copy.mlp.up_proj.get_base_layer().weight is owner.mlp.up_proj.weight
    # and as a whole: FlexiGPT with zero adapters and no output norm is plain stacking of its copies
    stacked = grow_model(ref, build_plan("stack", ref.config.model_type, LAYERS, _opts(placement=placement)))
    assert torch.equal(_logits(grown), _logits(stacked))


def test_llama_pro_copies_are_identity_maps_at_init(arch):
    ref = tiny_model(arch, num_layers=LAYERS)
    grown, plan = _grow(arch, "llama_pro")
    assert type(grown) is type(ref) and grown.config.num_hidden_layers == 8
    assert [layer.self_attn.layer_idx for layer in grown.model.layers] == list(range(8))
    seen = {}

    def hook(i):
        return lambda _m, args, kwargs, out: seen.__setitem__(
            i, (args[0] if args else kwargs["hidden_states"], out)
        )

    handles = [grown.model.layers[i].register_forward_hook(hook(i), with_kwargs=True) for i in plan.inserted]
    assert torch.equal(_logits(grown), _logits(ref))
    for h in handles:
        h.remove()
    for i in plan.inserted:
        x, y = seen[i]
        y = y[0] if isinstance(y, tuple) else y
        assert torch.equal(x, y), f"inserted layer {i} is not an identity map"
    # copies are private: a copy's weights are not its source block's storage
    b, c = plan.order[plan.inserted[0]], plan.inserted[0]
    assert (
        grown.model.layers[c].self_attn.q_proj.weight.data_ptr()
        != grown.model.layers[b].self_attn.q_proj.weight.data_ptr()
    )
    assert torch.equal(
        grown.model.layers[c].self_attn.q_proj.weight, grown.model.layers[b].self_attn.q_proj.weight
    )
    assert not grown.model.layers[c].mlp.down_proj.weight.any()


def _train_step(model, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = model(TOKENS, labels=TOKENS).loss
    loss.backward()
    opt.step()
    model.eval()


def test_originals_are_frozen_in_training(arch):
    grown, plan = _grow(arch, "block", out_norm=OutNormSpec(0.01))
    n = set_trainable(grown, "adapters+norms")
    assert n == param_counts(plan, grown.source_config).new_slot_params
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    _train_step(grown)
    after = grown.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k or ".out_norm." in k or "layernorm" in k for k in changed)
    copies = set(plan.reusing_slots())
    assert all(int(k.split(".")[2]) in copies for k in changed)  # only the new slots moved


def test_llama_pro_trains_only_the_copies(arch):
    grown, plan = _grow(arch, "llama_pro")
    layout = get_layout(grown.config)
    n = set_dense_trainable(grown, plan)
    assert n == len(plan.inserted) * layout.block_param_count(grown.config)
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    _train_step(grown)
    changed = {k for k, v in grown.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and {int(k.split(".")[2]) for k in changed} <= set(plan.inserted)


def test_compact_checkpoint_stores_source_plus_adapters_plus_norms(arch, tmp_path):
    source = tiny_model(arch, num_layers=LAYERS)
    source_params = sum(p.numel() for p in source.parameters())
    grown, plan = _grow(arch, "sequential", out_norm=OutNormSpec(0.01))
    save_compact(grown, tmp_path / "c")
    with safe_open(str(tmp_path / "c" / "model.safetensors"), framework="pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    numel = {k: torch.Size(s).numel() for k, s in sizes.items()}
    cfg = grown.source_config
    shapes = get_layout(cfg).matrix_shapes(cfg)
    lora = sum(8 * (o + i) for o, i in shapes.values())
    norms = 4 * cfg.hidden_size  # two output norms + own input / post-attention norms
    assert sum(numel.values()) == source_params + 3 * (lora + norms) == stored_param_count(grown)
    assert {k.split(".")[1] for k in numel if k.startswith("blocks.")} == {str(b) for b in range(LAYERS)}
    assert {int(k.split(".")[1]) for k in numel if k.startswith("slots.")} == set(plan.reusing_slots())
    loaded = load_compact(tmp_path / "c", attn_implementation="eager")
    assert loaded.plan == plan and torch.equal(_logits(loaded), _logits(grown))


def _perturb(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SharedLoraLinear):
                lora_factors(m)[1].normal_(0, 0.05)


def _generate(model, cache=True):
    prompt = TOKENS[:1, :6]
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=8,
        do_sample=False,
        use_cache=cache,
        pad_token_id=0,
    )


@pytest.mark.parametrize("strategy", ["block", "sequential"])
def test_generate_on_grown_models_and_materialised_exports(arch, strategy, tmp_path):
    grown, _ = _grow(arch, strategy, out_norm=OutNormSpec(0.1))
    _perturb(grown)
    out = _generate(grown)
    assert out.shape == (1, 14)
    assert torch.equal(out, _generate(grown, cache=False))  # every slot has its own KV-cache index
    assert torch.equal(out, _generate(materialize(grown, keep_output_norm=True)))
    # without output norms the grown model exports to a plain HF directory any runtime loads
    plain_grown, _ = _grow(arch, strategy, out_norm=None)
    _perturb(plain_grown)
    export_materialized(plain_grown, tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager")
    assert type(plain).__name__ == type(tiny_model(arch, num_layers=1)).__name__
    assert plain.config.num_hidden_layers == 8
    torch.testing.assert_close(_logits(plain), _logits(plain_grown), rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(plain), _generate(plain_grown))


@pytest.mark.parametrize("strategy", ["llama_pro", "stack"])
def test_dense_grown_models_save_load_and_generate(arch, strategy, tmp_path):
    grown, _ = _grow(arch, strategy)
    grown.save_pretrained(tmp_path / "d")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "d", attn_implementation="eager")
    assert loaded.config.num_hidden_layers == 8
    assert torch.equal(_logits(loaded), _logits(grown))
    out = _generate(loaded)
    assert out.shape == (1, 14) and torch.equal(out, _generate(loaded, cache=False))
