"""Architecture layouts: everything the engine knows about a model family, declared once.

The engine never sniffs modules with ``hasattr``: it reads paths from the layout of the model's
``model_type``. Adding an architecture means adding one ``ArchLayout`` entry (and a shared-model
class in ``engine.py``), nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flexigpt.shared.engine.plan import TARGETS, BlockShape, PlanError


@dataclass(frozen=True)
class ArchLayout:
    """Where things live in one decoder-only architecture."""

    model_type: str
    """transformers ``config.model_type``."""
    description: str
    """Human-readable family name (shown in errors and docs)."""
    layers_path: str = "model.layers"
    """Dotted path from the CausalLM module to the ModuleList of decoder layers."""
    top_modules: tuple[str, ...] = ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")
    """Modules outside the decoder stack, carried over unchanged when a shared model is built."""
    buffer_modules: tuple[str, ...] = ("model.rotary_emb",)
    """Top modules holding only derived buffers, rebuilt from the config when loading."""
    linears: tuple[tuple[str, str], ...] = (
        ("q", "self_attn.q_proj"),
        ("k", "self_attn.k_proj"),
        ("v", "self_attn.v_proj"),
        ("o", "self_attn.o_proj"),
        ("gate", "mlp.gate_proj"),
        ("up", "mlp.up_proj"),
        ("down", "mlp.down_proj"),
    )
    """Adapter target short name -> module path inside a decoder layer."""
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    """The per-block norms a slot may own (input norm, post-attention norm)."""
    attn_out: str = "self_attn.o_proj"
    """Last linear of the attention sub-layer: the output feature norm wraps it."""
    mlp_out: str = "mlp.down_proj"
    """Last linear of the MLP sub-layer: the output feature norm wraps it."""
    layer_idx_carriers: tuple[str, ...] = ("self_attn",)
    """Submodules of a decoder layer with a ``layer_idx`` attribute (KV-cache index)."""
    per_layer_config: tuple[str, ...] = ()
    """Config fields that are lists with one entry per layer; reordered to follow the slots."""
    fixed_bias: tuple[str, ...] | None = None
    """Linears that always carry a bias (Qwen2: q, k, v); None: read attention_bias / mlp_bias."""

    def linear_path(self, target: str) -> str:
        for name, path in self.linears:
            if name == target:
                return path
        raise PlanError(f"unknown adapter target {target!r}; allowed: {list(TARGETS)}")

    def matrix_shapes(self, config: Any, shape: BlockShape | None = None) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every target linear for this config (of a narrowed block
        when `shape` is given)."""
        h = config.hidden_size
        head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
        heads, kv_heads, f = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
        if shape is not None:
            heads, kv_heads, f = shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size
        q = heads * head_dim
        kv = kv_heads * head_dim
        return {
            "q": (q, h),
            "k": (kv, h),
            "v": (kv, h),
            "o": (h, q),
            "gate": (f, h),
            "up": (f, h),
            "down": (h, f),
        }

    def biased_linears(self, config: Any) -> tuple[str, ...]:
        """Target short names whose linear carries a bias for this config."""
        if self.fixed_bias is not None:
            return self.fixed_bias
        attn = ("q", "k", "v", "o") if getattr(config, "attention_bias", False) else ()
        mlp = ("gate", "up", "down") if getattr(config, "mlp_bias", False) else ()
        return attn + mlp

    def block_param_count(self, config: Any, shape: BlockShape | None = None) -> int:
        """Parameters of one decoder block (weights, biases, norms), from the config alone."""
        shapes = self.matrix_shapes(config, shape)
        weights = sum(o * i for o, i in shapes.values())
        biases = sum(shapes[t][0] for t in self.biased_linears(config))
        return weights + biases + len(self.norms) * config.hidden_size


LAYOUTS: dict[str, ArchLayout] = {
    # LLaMA-2 (MHA), LLaMA-3 and TinyLlama (GQA) share model_type "llama".
    "llama": ArchLayout("llama", "LLaMA-2 / LLaMA-3 / TinyLlama"),
    "mistral": ArchLayout("mistral", "Mistral"),
    # Qwen2: q/k/v carry biases (shared with the block like the weights); `layer_types` says which
    # layers use sliding-window attention and must follow the slot order.
    "qwen2": ArchLayout("qwen2", "Qwen2", per_layer_config=("layer_types",), fixed_bias=("q", "k", "v")),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(LAYOUTS)


def get_layout(config_or_type: Any) -> ArchLayout:
    """The layout for a config (or a model_type string).

    Raises:
        PlanError: the architecture is not supported; the message lists the supported ones.
    """
    model_type = (
        config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    )
    try:
        return LAYOUTS[model_type]
    except KeyError:
        supported = ", ".join(f"{k} ({v.description})" for k, v in LAYOUTS.items())
        raise PlanError(f"model_type={model_type!r} is not supported; supported: {supported}") from None
