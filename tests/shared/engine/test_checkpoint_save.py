"""Saving compact checkpoints keeps every tensor: idle block norms, transformers' save options, shards."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from flexigpt.shared.engine.apply import apply_plan, verify
from flexigpt.shared.engine.checkpoint import (
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_compact,
    save_compact,
    weight_files,
)
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model

TOKENS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _all_private_norms(arch: str = "llama2"):
    """Block 2 is run by one slot only, and that slot has private norms: the block's own are idle."""
    source = tiny_model(arch)
    plan = Plan(
        source.config.model_type,
        4,
        (
            SlotSpec(0),
            SlotSpec(
                2, adapter=AdapterSpec(4, init="svd", svd_from=1), out_norm=OutNormSpec(0.1), own_norms=True
            ),
            SlotSpec(3),
        ),
    )
    model = apply_plan(source, plan)
    with torch.no_grad():  # private norms that differ from the block's
        for n, p in model.named_parameters():
            if "layernorm" in n and n.startswith("model.layers.1."):
                p.mul_(1.5)
    return source, model


def _keys(directory) -> set[str]:
    keys: set[str] = set()
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def _same_outputs(a, b) -> bool:
    with torch.no_grad():
        return torch.equal(a(TOKENS).logits, b(TOKENS).logits)


def test_block_whose_every_slot_has_private_norms_keeps_its_norms(arch, tmp_path):
    source, model = _all_private_norms(arch)
    save_compact(model, tmp_path / "ckpt")
    keys = _keys(tmp_path / "ckpt")
    # the block's own norms are stored with their source values, beside the slot's private ones
    assert {"blocks.2.input_layernorm.weight", "blocks.2.post_attention_layernorm.weight"} <= keys
    assert "slots.1.input_layernorm.weight" in keys
    loaded = load_compact(tmp_path / "ckpt", attn_implementation="eager")
    verify(loaded)
    assert _same_outputs(model, loaded)
    assert torch.equal(
        loaded.idle_block_norms["2.input_layernorm.weight"], source.model.layers[2].input_layernorm.weight
    )
    # and a second save of the loaded model stores them again, unchanged
    save_compact(loaded, tmp_path / "again")
    with safe_open(str(tmp_path / "again" / WEIGHTS_NAME), framework="pt") as f:
        assert torch.equal(
            f.get_tensor("blocks.2.post_attention_layernorm.weight"),
            source.model.layers[2].post_attention_layernorm.weight,
        )


def test_checkpoint_without_idle_norms_still_loads(tmp_path):
    # checkpoints written before idle norms were stored: the private norms are all a slot needs
    _, model = _all_private_norms()
    save_compact(model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / WEIGHTS_NAME
    from safetensors.torch import load_file, save_file

    tensors = {
        k: v for k, v in load_file(path).items() if not k.startswith("blocks.2.") or "layernorm" not in k
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    loaded = load_compact(tmp_path / "ckpt", attn_implementation="eager")
    assert _same_outputs(model, loaded) and loaded.idle_block_norms == {}


def test_save_pretrained_shards_like_transformers(tmp_path):
    _, model = _all_private_norms()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    d = tmp_path / "ckpt"
    assert not (d / WEIGHTS_NAME).exists()
    index = json.loads((d / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in d.glob("*.safetensors")) == files
    total = sum(t.numel() * t.element_size() for t in _tensors(d).values())
    assert index["metadata"]["total_size"] == total
    loaded = load_compact(d, attn_implementation="eager")
    verify(loaded)
    assert _same_outputs(model, loaded)
    # one file again below the default size; the old shards do not linger (the directory is replaced)
    model.save_pretrained(d)
    assert sorted(p.name for p in d.glob("*.safetensors")) == [WEIGHTS_NAME] and not (d / INDEX_NAME).exists()
    (d / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"neither {WEIGHTS_NAME} nor {INDEX_NAME}"):
        load_compact(d)


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def test_save_pretrained_honours_state_dict_and_main_process(tmp_path):
    _, model = _all_private_norms()
    model.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists()
    # accelerate passes its save function; the weights are safetensors files all the same
    model.save_pretrained(tmp_path / "accel", save_function=torch.save)
    assert weight_files(tmp_path / "accel") == [tmp_path / "accel" / WEIGHTS_NAME]
    # a state dict (as gathered from ZeRO-3 partitions) replaces the values; any alias of a shared
    # tensor is accepted
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.q_proj.weight"] += 1.0
    lora_b = "model.layers.1.mlp.down_proj.base_layer.lora_B.default.weight"
    state[lora_b] += 2.0
    model.save_pretrained(tmp_path / "ckpt", state_dict=state)
    stored = _tensors(tmp_path / "ckpt")
    assert torch.equal(
        stored["blocks.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(stored["slots.1.mlp.down_proj.base_layer.lora_B.default.weight"], state[lora_b])
    del state["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(
        CheckpointError, match=r"state_dict has no value for model\.layers\.2\.mlp\.up_proj\.weight"
    ):
        model.save_pretrained(tmp_path / "bad", state_dict=state)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"push_to_hub": True}, "push_to_hub"),
        ({"safe_serialization": False}, "safe_serialization=False"),
        ({"variant": "fp16"}, "variant"),
        ({"distributed_checkpoint": True}, "distributed_checkpoint"),
        ({"shard_everything": 1}, "shard_everything"),
    ],
)
def test_save_pretrained_refuses_what_it_cannot_follow(tmp_path, kwargs, named):
    _, model = _all_private_norms()
    with pytest.raises(CheckpointError, match=f"{named}.*not supported"):
        model.save_pretrained(tmp_path / "ckpt", **kwargs)
    assert not (tmp_path / "ckpt").exists()
