"""Architecture layouts: everything the engine knows about a model family, declared once.

The engine never sniffs modules with ``hasattr``: it reads paths from the layout of the model's
``model_type``. Adding an architecture means adding one ``ArchLayout`` entry (and a shared-model
class in ``apply.py``); a family whose config names its sizes differently, or whose attention does
not follow the config's head count (OPT), overrides the few methods that say so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from flexigpt.shared.engine.plan import BlockShape, PlanError


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
    final_norm: str = "model.norm"
    """The norm after the decoder stack (a top module)."""
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

    norm_bias: bool = False
    """The per-block norms carry a bias (LayerNorm) besides their weight (RMSNorm: weight only)."""

    @property
    def targets(self) -> tuple[str, ...]:
        """The adapter target short names this architecture has (a subset of ``plan.TARGETS``)."""
        return tuple(name for name, _ in self.linears)

    def linear_path(self, target: str) -> str:
        for name, path in self.linears:
            if name == target:
                return path
        raise PlanError(
            f"adapter target {target!r} does not exist in {self.description}; allowed: {list(self.targets)}"
        )

    def missing_targets(self, targets: Any) -> list[str]:
        """The names in `targets` this architecture has no linear for (OPT: ``gate``)."""
        return [t for t in targets if t not in self.targets]

    def targets_message(self, key: str, targets: Any) -> str:
        """Why recipe key `key` = `targets` does not fit this architecture, naming the allowed targets."""
        return (
            f"{key}={list(targets)}: {self.missing_targets(targets)} do not exist in {self.description}; "
            f"allowed: {list(self.targets)}"
        )

    # ------------------------------------------------------------------ sizes from the config
    def ffn_size(self, config: Any) -> int:
        """MLP units of a full block."""
        return config.intermediate_size

    def kv_heads(self, config: Any) -> int:
        """Key / value heads of a full block."""
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def head_dim(self, config: Any) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def full_shape(self, config: Any) -> BlockShape:
        """The sizes of an unpruned block."""
        return BlockShape(self.ffn_size(config), config.num_attention_heads, self.kv_heads(config))

    def matrix_shapes(self, config: Any, shape: BlockShape | None = None) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every target linear for this config (of a narrowed block
        when `shape` is given)."""
        h = config.hidden_size
        head_dim = self.head_dim(config)
        shape = shape or self.full_shape(config)
        q = shape.num_attention_heads * head_dim
        kv = shape.num_key_value_heads * head_dim
        f = shape.intermediate_size
        every = {
            "q": (q, h),
            "k": (kv, h),
            "v": (kv, h),
            "o": (h, q),
            "gate": (f, h),
            "up": (f, h),
            "down": (h, f),
        }
        return {t: every[t] for t in self.targets}

    def biased_linears(self, config: Any) -> tuple[str, ...]:
        """Target short names whose linear carries a bias for this config."""
        if self.fixed_bias is not None:
            return self.fixed_bias
        attn = ("q", "k", "v", "o") if getattr(config, "attention_bias", False) else ()
        mlp = ("gate", "up", "down") if getattr(config, "mlp_bias", False) else ()
        return attn + mlp

    def norm_param_count(self, config: Any) -> int:
        """Parameters of one per-block norm (its weight, and its bias for a LayerNorm with bias)."""
        return config.hidden_size * (2 if self.norm_bias else 1)

    def block_param_count(self, config: Any, shape: BlockShape | None = None) -> int:
        """Parameters of one decoder block (weights, biases, norms), from the config alone."""
        shapes = self.matrix_shapes(config, shape)
        weights = sum(o * i for o, i in shapes.values())
        biases = sum(shapes[t][0] for t in self.biased_linears(config))
        return weights + biases + len(self.norms) * self.norm_param_count(config)

    def top_param_count(self, config: Any) -> int:
        """Parameters outside the decoder stack: embeddings, final norm, head (once when tied)."""
        emb = config.vocab_size * config.hidden_size
        return emb + config.hidden_size + (0 if config.tie_word_embeddings else emb)

    # ------------------------------------------------------------------ narrowed blocks
    def block_config(self, config: Any, shape: BlockShape | None) -> Any:
        """The config a narrowed block's modules are built from (`config` itself for a full block).

        The head dimension is pinned first: transformers derives it from hidden_size / heads otherwise.
        """
        if shape is None:
            return config
        narrowed = copy.deepcopy(config)
        narrowed.head_dim = self.head_dim(config)
        narrowed.intermediate_size = shape.intermediate_size
        narrowed.num_attention_heads = shape.num_attention_heads
        narrowed.num_key_value_heads = shape.num_key_value_heads
        return narrowed

    def narrow_layer(self, layer: Any, config: Any, shape: BlockShape | None) -> None:
        """Give a decoder layer built from ``block_config`` the sizes `shape` says, where its
        modules do not follow the config (nothing to do for the LLaMA family)."""

    def check_config(self, config: Any) -> None:
        """Refuse a config of this family that the engine cannot run (nothing to refuse by default).

        Raises:
            PlanError: naming the model and why.
        """


@dataclass(frozen=True)
class OPTLayout(ArchLayout):
    """OPT: LayerNorms with bias, biased linears, a ReLU MLP without gate, learned positions.

    The config names the MLP width ``ffn_dim`` and has no key / value head count (every head has
    its own keys and values). The attention module sizes its projections from the hidden size, so
    a narrowed block gets its projections replaced after it is built.
    """

    def ffn_size(self, config: Any) -> int:
        return config.ffn_dim

    def kv_heads(self, config: Any) -> int:
        return config.num_attention_heads

    def head_dim(self, config: Any) -> int:
        return config.hidden_size // config.num_attention_heads

    def biased_linears(self, config: Any) -> tuple[str, ...]:
        return self.targets if getattr(config, "enable_bias", True) else ()

    def top_param_count(self, config: Any) -> int:
        h = config.hidden_size
        emb = config.vocab_size * h
        positions = (config.max_position_embeddings + 2) * h  # OPT's learned positions are offset by 2
        head = 0 if config.tie_word_embeddings else emb
        return emb + positions + 2 * h + head  # final LayerNorm: weight and bias

    def block_config(self, config: Any, shape: BlockShape | None) -> Any:
        if shape is None:
            return config
        narrowed = copy.deepcopy(config)
        narrowed.ffn_dim = shape.intermediate_size
        return narrowed

    def narrow_layer(self, layer: Any, config: Any, shape: BlockShape | None) -> None:
        from torch import nn  # the layouts themselves are plain data, importable without torch

        if shape is None or shape.num_attention_heads == config.num_attention_heads:
            return
        attn = layer.get_submodule("self_attn")
        h, width = config.hidden_size, shape.num_attention_heads * self.head_dim(config)
        bias = getattr(config, "enable_bias", True)
        device = attn.q_proj.weight.device
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, nn.Linear(h, width, bias=bias, device=device))
        attn.out_proj = nn.Linear(width, h, bias=bias, device=device)
        attn.num_heads = shape.num_attention_heads

    def check_config(self, config: Any) -> None:
        if not getattr(config, "do_layer_norm_before", True):
            raise PlanError(
                f"{getattr(config, '_name_or_path', '') or 'this OPT model'} normalises after each sub-layer "
                "(do_layer_norm_before=false, as facebook/opt-350m); only pre-LN OPT is supported "
                "(opt-125m, opt-1.3b, opt-2.7b, opt-6.7b and larger)"
            )
        if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
            raise PlanError(
                f"word_embed_proj_dim={config.word_embed_proj_dim} differs from hidden_size={config.hidden_size} "
                "(project_in / project_out, as facebook/opt-350m): not supported"
            )
        if getattr(config, "_remove_final_layer_norm", False) or not getattr(
            config, "layer_norm_elementwise_affine", True
        ):
            raise PlanError("OPT without a final layer norm or without norm weights is not supported")


LAYOUTS: dict[str, ArchLayout] = {
    # LLaMA-2 (MHA), LLaMA-3 and TinyLlama (GQA) share model_type "llama".
    "llama": ArchLayout("llama", "LLaMA-2 / LLaMA-3 / TinyLlama"),
    "mistral": ArchLayout("mistral", "Mistral"),
    # Qwen2: q/k/v carry biases (shared with the block like the weights); `layer_types` says which
    # layers use sliding-window attention and must follow the slot order.
    "qwen2": ArchLayout("qwen2", "Qwen2", per_layer_config=("layer_types",), fixed_bias=("q", "k", "v")),
    # OPT (pre-LN: opt-125m, opt-1.3b and larger): no gate, LayerNorms with bias, learned positions.
    "opt": OPTLayout(
        "opt",
        "OPT (pre-LN)",
        layers_path="model.decoder.layers",
        top_modules=(
            "model.decoder.embed_tokens",
            "model.decoder.embed_positions",
            "model.decoder.final_layer_norm",
            "lm_head",
        ),
        final_norm="model.decoder.final_layer_norm",
        buffer_modules=(),
        linears=(
            ("q", "self_attn.q_proj"),
            ("k", "self_attn.k_proj"),
            ("v", "self_attn.v_proj"),
            ("o", "self_attn.out_proj"),
            ("up", "fc1"),
            ("down", "fc2"),
        ),
        norms=("self_attn_layer_norm", "final_layer_norm"),
        attn_out="self_attn.out_proj",
        mlp_out="fc2",
        norm_bias=True,
    ),
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
        layout = LAYOUTS[model_type]
    except KeyError:
        supported = ", ".join(f"{k} ({v.description})" for k, v in LAYOUTS.items())
        raise PlanError(f"model_type={model_type!r} is not supported; supported: {supported}") from None
    if not isinstance(config_or_type, str):
        layout.check_config(config_or_type)
    return layout
