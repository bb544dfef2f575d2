"""Loading a compact checkpoint honours transformers' from_pretrained options or refuses them by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

import flexigpt.shared  # noqa: F401  (registers the format with the Auto classes)
from flexigpt.shared.engine.apply import apply_plan, verify
from flexigpt.shared.engine.checkpoint import CheckpointError, load_compact, save_compact
from flexigpt.shared.engine.load_options import LoadOptionError, resolve_device_map
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model

TOKENS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _model(arch: str = "llama2", seed: int = 0):
    mt = tiny_model(arch).config.model_type
    plan = Plan(
        mt,
        4,
        (
            SlotSpec(0),
            SlotSpec(2, adapter=AdapterSpec(4), out_norm=OutNormSpec(0.1), own_norms=True),
            SlotSpec(2),
            SlotSpec(3),
            SlotSpec(3, adapter=AdapterSpec(8, ("q", "v")), out_norm=OutNormSpec(0.02)),
        ),
    )
    torch.manual_seed(seed)
    model = apply_plan(tiny_model(arch, seed=seed), plan)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = _model()
    d = tmp_path_factory.mktemp("ckpt") / "compact"
    save_compact(model, d)
    return model, d


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def test_auto_config_answers_the_usual_fields_of_the_stack(arch, tmp_path):
    model = _model(arch)
    save_compact(model, tmp_path / "c")
    cfg = AutoConfig.from_pretrained(tmp_path / "c")
    src = tiny_model(arch).config
    assert cfg.model_type == "flexigpt"
    assert cfg.num_hidden_layers == 5 == model.config.num_hidden_layers  # one layer per slot
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        assert getattr(cfg, field) == getattr(src, field), field
    assert cfg.max_position_embeddings == src.max_position_embeddings
    assert cfg.tie_word_embeddings == src.tie_word_embeddings
    if arch == "qwen2":  # per-layer lists follow the slots' blocks
        assert cfg.layer_types == [src.layer_types[b] for b in (0, 2, 2, 3, 3)]
    # the file says what it is and what to install, for a reader without the package
    raw = json.loads((tmp_path / "c" / "config.json").read_text())
    assert raw["flexigpt"]["format"] == "flexigpt-compact/1"
    assert "pip install flexigpt" in raw["flexigpt"]["requires"]
    assert "vllm serve" in raw["flexigpt"]["vllm"]
    assert raw["transformers_version"] and raw["architectures"] == ["FlexiGPTForCausalLM"]


def test_dtype_and_device_map_are_honoured(ckpt):
    model, d = ckpt
    for kw in (
        {"dtype": torch.bfloat16},
        {"torch_dtype": "bfloat16"},
        {"dtype": "bfloat16", "device_map": "cpu"},
    ):
        m = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", **kw)
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}, kw
        verify(m)  # the sharing survives the cast
    auto = AutoModelForCausalLM.from_pretrained(
        d, dtype="auto", device_map="auto", attn_implementation="eager"
    )
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in auto.parameters()} == {want}
    assert {p.dtype for p in auto.parameters()} == {torch.float32}  # as stored
    one = AutoModelForCausalLM.from_pretrained(d, device_map={"": "cpu"}, attn_implementation="eager")
    assert torch.equal(_logits(one), _logits(model))


def test_attn_implementation_is_honoured(ckpt):
    _, d = ckpt
    for impl in ("eager", "sdpa"):
        m = AutoModelForCausalLM.from_pretrained(d, attn_implementation=impl)
        assert m.config._attn_implementation == impl


def test_options_it_cannot_honour_are_refused_by_name(ckpt):
    _, d = ckpt
    with pytest.raises(LoadOptionError, match="quantization_config"):
        AutoModelForCausalLM.from_pretrained(d, quantization_config={"quant_method": "bitsandbytes"})
    with pytest.raises(LoadOptionError, match="placed whole on one device"):
        AutoModelForCausalLM.from_pretrained(d, device_map={"model": "cpu", "lm_head": "disk"})
    with pytest.raises(LoadOptionError, match=r"\['max_memory'\] are not supported"):
        AutoModelForCausalLM.from_pretrained(d, max_memory={"cpu": "1GB"})
    with pytest.raises(LoadOptionError, match="only as safetensors"):
        AutoModelForCausalLM.from_pretrained(d, use_safetensors=False)
    with pytest.raises(LoadOptionError, match="is not a device"):
        resolve_device_map("warp-drive")


def _shard(d: Path) -> None:
    """Rewrite a compact directory as two shards and an index, as a sharded save writes them."""
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    keys = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in parts.items():
        save_file({k: tensors[k] for k in part}, str(d / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in parts.items() for k in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "model.safetensors").unlink()


def test_sharded_checkpoint_loads_bit_exact(ckpt, tmp_path):
    model, d = ckpt
    shutil.copytree(d, tmp_path / "sharded")
    _shard(tmp_path / "sharded")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", attn_implementation="eager")
    verify(loaded)
    assert torch.equal(_logits(loaded), _logits(model))
    (tmp_path / "sharded" / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_compact(tmp_path / "sharded")


def _cache_snapshot(cache: Path, repo: str, ref: str, commit: str, src: Path) -> None:
    """Put `src` into a hub cache as the snapshot `commit` of `repo`, named by branch `ref`."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    shutil.copytree(src, root / "snapshots" / commit)


def test_revision_and_subfolder_pick_the_right_snapshot_of_a_hub_id(tmp_path, monkeypatch):
    """A hub id resolved from the local hub cache (offline): revision chooses the snapshot."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first, second = _model(seed=0), _model(seed=1)
    save_compact(first, tmp_path / "m1")
    save_compact(second, tmp_path / "m2")
    save_compact(second, tmp_path / "m2" / "sub")
    cache = tmp_path / "hub"
    _cache_snapshot(cache, "org/tiny-compact", "main", "a" * 40, tmp_path / "m1")
    _cache_snapshot(cache, "org/tiny-compact", "v2", "b" * 40, tmp_path / "m2")
    main = AutoModelForCausalLM.from_pretrained(
        "org/tiny-compact", cache_dir=cache, attn_implementation="eager", token="unused-offline"
    )
    assert torch.equal(_logits(main), _logits(first))
    v2 = AutoModelForCausalLM.from_pretrained(
        "org/tiny-compact", revision="v2", cache_dir=cache, attn_implementation="eager"
    )
    assert torch.equal(_logits(v2), _logits(second))
    v2 = load_compact(
        "org/tiny-compact",
        attn_implementation="eager",
        revision="v2",
        subfolder="sub",
        cache_dir=cache,
        local_files_only=True,
    )
    assert torch.equal(_logits(v2), _logits(second))
    assert not torch.equal(_logits(first), _logits(second))
    with pytest.raises(CheckpointError, match="no subfolder 'elsewhere'"):
        load_compact("org/tiny-compact", revision="v2", subfolder="elsewhere", cache_dir=cache)
