"""The compact checkpoint: bit-exact round trip through the Auto classes, each block stored once."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM

import flexigpt.shared  # noqa: F401  (registers the format with the Auto classes)
from flexigpt.shared.engine.apply import apply_plan, expected_trainable, stored_param_count, verify
from flexigpt.shared.engine.checkpoint import (
    CheckpointError,
    is_compact,
    load_compact,
    load_model,
    save_compact,
)
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model

TOKENS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _model(arch: str):
    mt = tiny_model(arch).config.model_type
    plan = Plan(
        mt,
        4,
        (
            SlotSpec(0),
            SlotSpec(
                2, adapter=AdapterSpec(4, init="svd", svd_from=1), out_norm=OutNormSpec(0.1), own_norms=True
            ),
            SlotSpec(2),
            SlotSpec(3),
            SlotSpec(3, adapter=AdapterSpec(8, ("q", "v", "down"), init="lora"), out_norm=OutNormSpec(0.02)),
        ),
    )
    model = apply_plan(tiny_model(arch), plan)
    with torch.no_grad():  # trained-looking slot parameters
        for n, p in model.named_parameters():
            if "lora_B" in n or "out_norm" in n:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _payload_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus its JSON header)."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header_len


def test_round_trip_is_bit_exact_and_restores_sharing(arch, tmp_path):
    model = _model(arch)
    model.save_pretrained(tmp_path / "ckpt")
    assert is_compact(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager")
    assert type(loaded) is type(model)
    assert loaded.plan == model.plan
    verify(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)
    layers = loaded.model.layers
    assert (
        layers[2].self_attn.q_proj.weight.data_ptr()
        == layers[1].self_attn.q_proj.get_base_layer().weight.data_ptr()
    )
    assert layers[4].mlp.up_proj.weight.data_ptr() == layers[3].mlp.up_proj.weight.data_ptr()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_file_holds_each_physical_block_once(arch, tmp_path):
    model = _model(arch)
    save_compact(model, tmp_path / "ckpt")
    stored = stored_param_count(model)
    assert _payload_bytes(tmp_path / "ckpt" / "model.safetensors") == 4 * stored
    # block 1 is removed (not stored); blocks 2 and 3 are stored once though two slots run each:
    # the count predicted from the plan alone (3 blocks + embeddings + slot-owned tensors)
    assert stored == expected_trainable(model.plan, tiny_model(arch).config, "all")
    dense = tiny_model(arch)
    block = sum(p.numel() for p in dense.model.layers[0].parameters())
    assert stored < sum(p.numel() for p in dense.parameters()) - block / 2
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "flexigpt" and cfg["plan"]["slots"][1]["block"] == 2
    assert json.loads((tmp_path / "ckpt" / "plan.json").read_text()) == model.plan.to_dict()


def test_load_model_dispatches_and_refuses_garbage(tmp_path):
    model = _model("llama2")
    save_compact(model, tmp_path / "ckpt")
    assert type(load_model(tmp_path / "ckpt")).__name__ == "SharedLlamaForCausalLM"
    plain = tiny_model("llama2")
    plain.save_pretrained(tmp_path / "plain")
    assert type(load_model(tmp_path / "plain")).__name__ == "LlamaForCausalLM"
    # a checkpoint whose tensors do not match its plan is refused, naming what is wrong
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["plan"]["slots"][3]["adapter"] = {"rank": 2, "targets": ["q"], "init": "lora"}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="slot tensors do not match the plan"):
        load_compact(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_compact(tmp_path / "missing")


def test_save_replaces_atomically(tmp_path):
    model = _model("llama2")
    save_compact(model, tmp_path / "ckpt")
    save_compact(model, tmp_path / "ckpt")  # overwrite: no leftovers beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
