"""A pruned model really shrinks: same logits, bit-exact compact round trip, a plain export transformers loads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import flexigpt.shared  # noqa: F401  (registers the compact format with the Auto classes)
from flexigpt.prune.surgeon.shot import ShotOptions, prune_shot
from flexigpt.prune.surgeon.shrink import shrink_model
from flexigpt.shared.engine.apply import apply_plan, set_trainable, stored_param_count
from flexigpt.shared.engine.checkpoint import export_materialized, save_compact
from flexigpt.shared.engine.tiny import tiny_model

TOKENS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def _pruned(arch: str) -> torch.nn.Module:
    model = tiny_model(arch, num_layers=3)
    samples = [torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    prune_shot(model, samples, 0.3, ShotOptions(method="surgeon"), log=lambda *a, **k: None)
    with torch.no_grad():  # a whole head and a whole key/value group of block 1 go too
        cfg = model.config
        d = cfg.hidden_size // cfg.num_attention_heads
        n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
        attn = model.model.layers[1].self_attn
        attn.o_proj.weight[:, : n_rep * d] = 0  # every query head of group 0: the group goes
        attn.v_proj.weight[d : 2 * d] = 0  # group 1's values
        if attn.v_proj.bias is not None:
            attn.v_proj.bias[d : 2 * d] = 0
        model.model.layers[2].mlp.down_proj.weight[:, :7] = 0
    return model


@pytest.mark.parametrize("arch", ["llama2", "llama3", "qwen2"])
def test_shrunk_model_equals_the_zero_masked_one(arch: str, tmp_path) -> None:
    masked = _pruned(arch)
    with torch.no_grad():
        want = masked(input_ids=TOKENS).logits
    dense_params = stored_param_count(masked)
    source, plan = shrink_model(_pruned(arch), notes={"method": "surgeon"})
    shapes = plan.block_shapes
    kv = masked.config.num_key_value_heads  # both groups gone: one silent group stays
    assert 1 in shapes and shapes[1].num_key_value_heads == max(1, kv - 2)
    assert shapes[2].intermediate_size <= masked.config.intermediate_size - 7
    model = apply_plan(source, plan)
    assert stored_param_count(model) < dense_params
    with torch.no_grad():
        got = model(input_ids=TOKENS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the trainer's count check knows the narrowed sizes
    assert set_trainable(model, "all") == stored_param_count(model)

    save_compact(model, tmp_path / "compact")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact", attn_implementation="eager")
    assert loaded.plan == plan
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=TOKENS).logits, got)
    for (n, p), (m, q) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n == m and torch.equal(p, q), n

    export_materialized(model, tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager")
    assert type(plain).__name__ == type(masked).__name__
    assert stored_param_count(plain) == dense_params
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=TOKENS).logits, want, rtol=1e-5, atol=1e-5)


def test_generation_with_a_kv_cache_runs_on_narrowed_blocks() -> None:
    masked = _pruned("llama3")
    source, plan = shrink_model(_pruned("llama3"))
    model = apply_plan(source, plan)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(TOKENS[:1], **kw), masked.generate(TOKENS[:1], **kw))
