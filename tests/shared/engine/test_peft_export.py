"""peft export: a base-plus-adapters model leaves as a plain base and a peft adapter that peft loads."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from flexigpt.shared.engine.apply import apply_plan
from flexigpt.shared.engine.peft_export import export_peft
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, PlanError, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model

TOKENS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _shortgpt_lora(arch: str, **slot_kw) -> torch.nn.Module:
    """Block 1 removed, LoRA of different ranks / alphas / targets on the kept slots, private norms on one."""
    mt = tiny_model(arch).config.model_type
    plan = Plan(
        mt,
        4,
        (
            SlotSpec(0, adapter=AdapterSpec(4, rank_pattern={"k": 2})),
            SlotSpec(2, adapter=AdapterSpec(8, ("q", "v", "down"), alpha=16.0), **slot_kw),
            SlotSpec(3),
        ),
    )
    model = apply_plan(tiny_model(arch), plan)
    with torch.no_grad():  # trained-looking adapters
        for n, p in model.named_parameters():
            if "lora_B" in n or "layernorm" in n:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_peft_loads_the_adapter_on_the_exported_base_with_equal_logits(arch, tmp_path):
    model = _shortgpt_lora(arch, own_norms=True)
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.requires_grad_(True)
    base_dir, adapter_dir = export_peft(model, tmp_path / "peft")
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert cfg["rank_pattern"] == {
        "model.layers.0.self_attn.k_proj": 2,
        **{f"model.layers.1.{p}": 8 for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")},
    }
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    assert type(base).__name__ == type(tiny_model(arch)).__name__ and base.config.num_hidden_layers == 3
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        want = model(TOKENS).logits
        torch.testing.assert_close(peft_model(TOKENS).logits, want, rtol=1e-5, atol=1e-5)
        # the adapters matter: without them the base gives other logits
        with peft_model.disable_adapter():
            assert (peft_model(TOKENS).logits - want).abs().max() > 1e-4
    # AutoPeftModel finds the base from the adapter alone
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(TOKENS).logits, want, rtol=1e-5, atol=1e-5)
    # the export left the shared model as it was
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad, n


def test_peft_export_refuses_reused_blocks_and_output_norms(tmp_path):
    with pytest.raises(PlanError, match=r"slots \[1\] have output feature norms"):
        export_peft(_shortgpt_lora("llama2", out_norm=OutNormSpec(0.1)), tmp_path / "a")
    reuse = Plan("llama", 4, (SlotSpec(0), SlotSpec(2), SlotSpec(2, adapter=AdapterSpec(4))))
    with pytest.raises(PlanError, match=r"blocks \[2\] are run by several slots"):
        export_peft(apply_plan(tiny_model("llama2"), reuse), tmp_path / "b")
    assert not any(tmp_path.iterdir())
