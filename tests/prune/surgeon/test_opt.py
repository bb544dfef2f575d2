"""The LLM Surgeon on OPT (the paper's architecture): q k v out_proj fc1 fc2 with biases, no gate."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, OPTForCausalLM

import flexigpt.shared  # noqa: F401  (registers the compact format with the Auto classes)
from flexigpt.prune.cli import main
from flexigpt.prune.surgeon.shot import ShotOptions, prune_shot
from flexigpt.prune.surgeon.shrink import shrink_model
from flexigpt.shared.engine.apply import apply_plan, set_trainable, stored_param_count
from flexigpt.shared.engine.checkpoint import export_materialized, save_compact
from flexigpt.shared.engine.tiny import tiny_model

from ...kit import write_workspace
from ..conftest import prune_overrides
from ..surgeon.test_surgeon_cli import RECIPE

TOKENS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def _pruned() -> torch.nn.Module:
    model = tiny_model("opt", num_layers=3)
    samples = [torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    prune_shot(model, samples, 0.3, ShotOptions(method="surgeon"), log=lambda *a, **k: None)
    with torch.no_grad():
        d = model.config.hidden_size // model.config.num_attention_heads
        attn = model.model.decoder.layers[1].self_attn
        attn.out_proj.weight[:, :d] = 0  # head 0 goes by its output columns
        attn.v_proj.weight[d : 2 * d] = 0  # head 1 by its values (weights and bias)
        attn.v_proj.bias[d : 2 * d] = 0
        fc1 = model.model.decoder.layers[2].fc1
        fc1.weight[:5] = 0  # units 0-4 by their fc1 rows and bias: ReLU(0) = 0
        fc1.bias[:5] = 0
        model.model.decoder.layers[2].fc2.weight[:, 5:9] = 0  # units 5-8 by their fc2 columns
    return model


def test_shrunk_opt_equals_the_zero_masked_one(tmp_path) -> None:
    masked = _pruned()
    with torch.no_grad():
        want = masked(input_ids=TOKENS).logits
    dense_params = stored_param_count(masked)
    source, plan = shrink_model(_pruned(), notes={"method": "surgeon"})
    assert plan.block_shapes[1].num_attention_heads <= 2
    assert plan.block_shapes[2].intermediate_size <= masked.config.ffn_dim - 9
    model = apply_plan(source, plan)
    assert stored_param_count(model) < dense_params
    assert set_trainable(model, "all") == stored_param_count(model)
    with torch.no_grad():
        got = model(input_ids=TOKENS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(TOKENS[:1], **kw), masked.generate(TOKENS[:1], **kw))

    save_compact(model, tmp_path / "compact")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact", attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=TOKENS).logits, got)
    export_materialized(model, tmp_path / "plain")
    plain = OPTForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager")
    assert stored_param_count(plain) == dense_params
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=TOKENS).logits, want, rtol=1e-5, atol=1e-5)


def test_the_command_prunes_a_tiny_opt(tmp_path) -> None:
    ws = write_workspace(tmp_path / "ws", num_layers=3, arch="opt")
    out = tmp_path / "run"
    # the first-order correction on too: OPT has no gate, so its adapters go on the six linears it has
    extra = (
        "surgeon.methods=[surgeon]",
        "surgeon.shots=2",
        "surgeon.save_sizes=[]",
        "surgeon.lora.enabled=true",
    )
    assert main([RECIPE, *prune_overrides(ws, out, *extra)]) == 0
    v = json.loads((out / "summary.json").read_text())["variants"]["surgeon-70"]
    assert len(json.loads((out / "surgeon-70" / "sparsity.json").read_text())) == 3 * 6
    model = AutoModelForCausalLM.from_pretrained(out / "surgeon-70" / "model", attn_implementation="eager")
    plain = OPTForCausalLM.from_pretrained(out / "surgeon-70" / "plain", attn_implementation="eager")
    assert type(model).__name__ == "SharedOPTForCausalLM"
    assert model.plan.block_shapes  # MLP units or heads were cut out of the matrices
    assert sum(p.numel() for p in model.parameters()) == v["stored_params"]
    ids = torch.randint(3, 40, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
