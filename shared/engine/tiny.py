"""Small random models of every supported architecture, built locally (no download).

Used by the tests, the benchmarks and the quickstart. Each architecture variant exercises what
makes it different: MHA vs GQA, tied embeddings, q/k/v biases, sliding-window layers, OPT's
LayerNorms with bias, biased linears, gate-free ReLU MLP and learned positions.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# name -> (model_type, extra config). "llama2" is MHA, "llama3" GQA with tied embeddings
# (TinyLlama-like), "mistral" GQA with a sliding window, "qwen2" q/k/v biases + sliding layers,
# "opt" pre-LN OPT (tied embeddings, every linear and norm with a bias).
TINY_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama2": ("llama", {"num_key_value_heads": 4}),
    "llama3": ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True, "rope_theta": 500000.0}),
    "mistral": ("mistral", {"num_key_value_heads": 2, "sliding_window": 16}),
    "qwen2": (
        "qwen2",
        {"num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},
    ),
    "opt": ("opt", {"do_layer_norm_before": True, "dropout": 0.0, "attention_dropout": 0.0}),
}


def tiny_config(
    arch: str = "llama2",
    *,
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int | None = None,
    vocab: int = 128,
    max_positions: int = 256,
    **overrides: Any,
) -> PretrainedConfig:
    """Config of a small model of architecture `arch` (one of TINY_ARCHS)."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch={arch!r} is unknown; allowed: {list(TINY_ARCHS)}")
    model_type, extra = TINY_ARCHS[arch]
    kw: dict[str, Any] = dict(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=intermediate or 2 * hidden + hidden // 2,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(extra)
    if extra.get("num_key_value_heads", heads) > heads:
        kw["num_key_value_heads"] = heads
    kw.update(overrides)
    if model_type == "opt":
        kw["ffn_dim"] = kw.pop("intermediate_size")
        kw["word_embed_proj_dim"] = kw["hidden_size"]
        kw.pop("num_key_value_heads", None)
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(arch: str = "llama2", *, seed: int = 0, **kw: Any) -> PreTrainedModel:
    """A seeded random model; norms get random weights too, so that sharing them is observable."""
    cfg = tiny_config(arch, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm.weight" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02)
    return model.eval()
