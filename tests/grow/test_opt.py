"""Growing OPT: FlexiGPT slots (no gate; LayerNorms with bias as private norms) and the dense baselines."""

from __future__ import annotations

import pytest
import torch
from transformers import OPTForCausalLM

from flexigpt.grow.build import grow_model, param_counts
from flexigpt.grow.cli import main
from flexigpt.grow.dense import set_dense_trainable
from flexigpt.grow.strategies import GrowOptions, build_plan
from flexigpt.shared.engine.adapters import SharedLoraLinear, lora_factors
from flexigpt.shared.engine.apply import set_trainable
from flexigpt.shared.engine.checkpoint import export_materialized
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec
from flexigpt.shared.engine.tiny import tiny_model

from ..kit import write_workspace
from .conftest import REPO_ROOT, local_overrides

TOKENS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
OPT_TARGETS = ("q", "k", "v", "o", "up", "down")


def _grow(strategy: str, **kw):
    source = tiny_model("opt", num_layers=4)
    base = {"adapter": AdapterSpec(8, OPT_TARGETS), "out_norm": OutNormSpec(0.0), "own_norms": True}
    plan = build_plan(strategy, "opt", 4, GrowOptions(start=1, end=2, **{**base, **kw}))
    return grow_model(source, plan, seed=0), plan


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("strategy", ["block", "sequential"])
def test_gamma_zero_grown_opt_equals_the_source_and_trains_its_new_slots(strategy):
    ref = tiny_model("opt", num_layers=4)
    grown, plan = _grow(strategy)
    with torch.no_grad():
        for m in grown.modules():
            if isinstance(m, SharedLoraLinear):
                lora_factors(m)[1].normal_()
    assert plan.num_slots == 6 and torch.equal(_logits(grown), _logits(ref))
    # new slots: adapters on six linears, two LayerNorms of weight + bias, output norms on out_proj / fc2
    assert set_trainable(grown, "adapters+norms") == param_counts(plan, grown.source_config).new_slot_params
    copy = grown.model.decoder.layers[plan.reusing_slots()[0]]
    assert copy.final_layer_norm.bias.requires_grad and copy.fc2.out_norm.weight.requires_grad


def test_grown_opt_without_output_norm_exports_a_plain_opt(tmp_path):
    grown, _ = _grow("block", out_norm=None, adapter=AdapterSpec(8, OPT_TARGETS, init="lora"))
    with torch.no_grad():
        for n, p in grown.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    export_materialized(grown, tmp_path / "plain")
    plain = OPTForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager")
    assert plain.config.num_hidden_layers == 6
    torch.testing.assert_close(_logits(plain), _logits(grown), rtol=1e-5, atol=1e-5)


def test_llama_pro_on_opt_inserts_identity_copies_and_trains_only_them(tmp_path):
    ref = tiny_model("opt", num_layers=4)
    grown, plan = _grow("llama_pro", adapter=None, out_norm=None, own_norms=False)
    assert type(grown) is OPTForCausalLM and grown.config.num_hidden_layers == 6
    assert torch.equal(_logits(grown), _logits(ref))  # out_proj and fc2 zeroed with their biases
    assert set_dense_trainable(grown, plan) == len(plan.inserted) * get_layout(ref.config).block_param_count(
        ref.config
    )
    grown.save_pretrained(tmp_path / "d")
    assert torch.equal(
        _logits(OPTForCausalLM.from_pretrained(tmp_path / "d", attn_implementation="eager")), _logits(grown)
    )


def test_the_command_refuses_gate_on_opt_and_plans_its_six_targets(tmp_path, capsys):
    ws = write_workspace(tmp_path / "ws", num_layers=4, arch="opt")
    recipe = str(REPO_ROOT / "recipes" / "grow" / "local-tiny.yaml")
    assert main([recipe, *local_overrides(ws, tmp_path / "r", "--plan-only")]) == 2
    assert "grow.adapter.targets=" in capsys.readouterr().err
    extra = ("grow.adapter.targets=[q,k,v,o,up,down]", "--plan-only")
    assert main([recipe, *local_overrides(ws, tmp_path / "r", *extra)]) == 0
    assert "adapter r=8 [q,k,v,o,up,down]" in capsys.readouterr().out
    # post-LN OPT (opt-350m's layout) is refused by name, not met with a traceback
    tiny_model("opt", num_layers=4, hidden=32, do_layer_norm_before=False).save_pretrained(tmp_path / "post")
    post = (f"model.source={tmp_path / 'post'}", *extra)
    assert main([recipe, *local_overrides(ws, tmp_path / "r", *post)]) == 2
    assert "do_layer_norm_before=false, as facebook/opt-350m" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
