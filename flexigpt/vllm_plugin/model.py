"""The vLLM model of a compact checkpoint: physical blocks loaded once, run by every slot that uses them.

A compact checkpoint stores each physical block once (``blocks.<b>.*``) and each slot's own
tensors (``slots.<i>.*``: LoRA factors, output feature norms, private norms). Here:

- every physical block is one ``_Block`` (fused q/k/v and gate/up projections, o and down
  projections, and the block's norms): its weights exist once in memory;
- every slot is one ``_Slot`` with its **own attention layer** (so vLLM gives it its own paged KV
  cache, indexed by the slot's position in the stack), its LoRA factors, output norms and private
  norms; at run time it calls the linears of the block it runs and adds its own parts.

Continuous batching, paged attention and the scheduler are vLLM's own: the model only sees the
flattened tokens of the batch and their positions. Supported: the architectures of the engine
(LLaMA-2 / LLaMA-3 / TinyLlama, Mistral with its sliding window, Qwen2 with q/k/v biases and
per-layer sliding windows) on one device (tensor parallel size 1); anything else is refused when
the model is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# target short name -> (fused module in the block, shard id in it); o and down are not fused
_FUSED = {
    "q": ("self_attn.qkv_proj", "q"),
    "k": ("self_attn.qkv_proj", "k"),
    "v": ("self_attn.qkv_proj", "v"),
    "gate": ("mlp.gate_up_proj", 0),
    "up": ("mlp.gate_up_proj", 1),
}
_TARGET_OF = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}


class _Block(nn.Module):
    """The weights of one physical block (stored once, whichever slots run it)."""

    def __init__(self, cfg: dict[str, Any], prefix: str) -> None:
        super().__init__()
        h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.head_dim = cfg["head_dim"]
        # Qwen2's q/k/v always carry biases (o does not); LLaMA's follow attention_bias
        bias_o = bool(cfg.get("attention_bias", False))
        bias_qkv = bias_o or cfg["model_type"] == "qwen2"
        self.qkv_proj = QKVParallelLinear(
            h, self.head_dim, heads, kv, bias=bias_qkv, prefix=f"{prefix}.qkv_proj"
        )
        self.o_proj = RowParallelLinear(heads * self.head_dim, h, bias=bias_o, prefix=f"{prefix}.o_proj")
        f = cfg["intermediate_size"]
        mlp_bias = bool(cfg.get("mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(
            h, [f, f], bias=mlp_bias, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(f, h, bias=mlp_bias, prefix=f"{prefix}.down_proj")
        self.input_layernorm = RMSNorm(h, eps=cfg["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(h, eps=cfg["rms_norm_eps"])
        self.sizes = (heads * self.head_dim, kv * self.head_dim, kv * self.head_dim)
        self.intermediate = f


class _Slot(nn.Module):
    """One depth position: its own KV cache, adapters, output norms and (optionally) norms."""

    def __init__(
        self, index: int, spec: dict[str, Any], cfg: dict[str, Any], vllm_config: VllmConfig
    ) -> None:
        super().__init__()
        self.index, self.block = index, int(spec["block"])
        h, heads, kv, hd = (
            cfg["hidden_size"],
            cfg["num_attention_heads"],
            cfg["num_key_value_heads"],
            cfg["head_dim"],
        )
        # The attention layer is the slot's: vLLM allocates one KV cache per attention layer, keyed
        # by its prefix, so two slots running the same block never share cached keys and values.
        self.attn = Attention(
            heads,
            hd,
            hd**-0.5,
            num_kv_heads=kv,
            cache_config=vllm_config.cache_config,
            per_layer_sliding_window=_sliding_window(cfg, index),
            prefix=f"model.layers.{index}.self_attn.attn",
        )
        self.own_norms = bool(spec.get("own_norms"))
        if self.own_norms:
            self.input_layernorm = RMSNorm(h, eps=cfg["rms_norm_eps"])
            self.post_attention_layernorm = RMSNorm(h, eps=cfg["rms_norm_eps"])
        out_norm = spec.get("out_norm")
        self.out_norm_eps = float(out_norm["eps"]) if out_norm else None
        if out_norm:
            self.attn_out_norm = nn.Parameter(torch.empty(h), requires_grad=False)
            self.mlp_out_norm = nn.Parameter(torch.empty(h), requires_grad=False)
        shapes = {
            "q": (heads * hd, h),
            "k": (kv * hd, h),
            "v": (kv * hd, h),
            "o": (h, heads * hd),
            "gate": (cfg["intermediate_size"], h),
            "up": (cfg["intermediate_size"], h),
            "down": (h, cfg["intermediate_size"]),
        }
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        adapter = spec.get("adapter")
        for t in adapter["targets"] if adapter else ():
            r = int(adapter.get("rank_pattern", {}).get(t, adapter["rank"]))
            out_f, in_f = shapes[t]
            self.lora_a[t] = nn.Parameter(torch.empty(r, in_f), requires_grad=False)
            self.lora_b[t] = nn.Parameter(torch.empty(out_f, r), requires_grad=False)
            self.scaling[t] = 1.0 if adapter.get("alpha") is None else float(adapter["alpha"]) / r

    def _lora(self, t: str, x: torch.Tensor) -> torch.Tensor | None:
        if t not in self.lora_a:
            return None
        return F.linear(F.linear(x, self.lora_a[t]), self.lora_b[t]) * self.scaling[t]

    def _out_norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if weight is None:
            return x
        return F.layer_norm(x, (x.shape[-1],), weight, None, self.out_norm_eps)

    def forward(
        self, block: _Block, rotary: nn.Module, positions: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """The decoder layer the slot is: the block's linears plus the slot's own parts, residuals included."""
        norms = self if self.own_norms else block
        h = norms.input_layernorm(x)
        qkv, _ = block.qkv_proj(h)
        parts = list(qkv.split(block.sizes, dim=-1))
        for j, t in enumerate(("q", "k", "v")):
            delta = self._lora(t, h)
            if delta is not None:
                parts[j] = parts[j] + delta
        q, k = rotary(positions, parts[0], parts[1])
        a = self.attn(q, k, parts[2])
        o, _ = block.o_proj(a)
        delta = self._lora("o", a)
        if delta is not None:
            o = o + delta
        x = x + self._out_norm(o, getattr(self, "attn_out_norm", None))
        h = norms.post_attention_layernorm(x)
        gu, _ = block.gate_up_proj(h)
        gate, up = gu.split([block.intermediate, block.intermediate], dim=-1)
        for name in ("gate", "up"):
            delta = self._lora(name, h)
            if delta is not None:
                gate, up = (gate + delta, up) if name == "gate" else (gate, up + delta)
        m = F.silu(gate) * up
        d, _ = block.down_proj(m)
        delta = self._lora("down", m)
        if delta is not None:
            d = d + delta
        return x + self._out_norm(d, getattr(self, "mlp_out_norm", None))


def _sliding_window(cfg: dict[str, Any], slot: int) -> int | None:
    """The attention window of a slot: Qwen2 per layer (``layer_types``, which follow the slots),
    Mistral on every layer, none for LLaMA."""
    window = cfg.get("sliding_window")
    if cfg["model_type"] == "qwen2":
        types = cfg.get("slot_layer_types")
        return window if types and types[slot] == "sliding_attention" else None
    return window if cfg["model_type"] == "mistral" else None


def _stack_fields(hf_config: Any) -> dict[str, Any]:
    base = dict(hf_config.base_config)
    # per-layer lists of the source config follow the slots (the block each slot runs)
    blocks = [int(s["block"]) for s in hf_config.plan["slots"]]
    if isinstance(base.get("layer_types"), list):
        base["slot_layer_types"] = [base["layer_types"][b] for b in blocks]
    if base.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"the vLLM plugin serves compact checkpoints of {list(SUPPORTED_MODEL_TYPES)}; this one is "
            f"{base.get('model_type')!r}: serve a materialised export with stock vLLM, or use transformers"
        )
    base.setdefault("num_key_value_heads", base["num_attention_heads"])
    base["head_dim"] = base.get("head_dim") or base["hidden_size"] // base["num_attention_heads"]
    return base


class FlexiGPTForCausalLM(nn.Module):
    """vLLM model of a compact checkpoint: shared blocks, per-slot KV cache, adapters and norms."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        if get_tensor_model_parallel_world_size() != 1:
            raise ValueError("the FlexiGPT vLLM plugin runs with tensor_parallel_size=1")
        hf = vllm_config.model_config.hf_config
        cfg = _stack_fields(hf)
        self.config = hf
        slots = hf.plan["slots"]
        h, vocab = cfg["hidden_size"], cfg["vocab_size"]
        self.embed_tokens = VocabParallelEmbedding(vocab, h)
        self.blocks = nn.ModuleDict(
            {str(b): _Block(cfg, f"blocks.{b}") for b in sorted({int(s["block"]) for s in slots})}
        )
        self.slots = nn.ModuleList(_Slot(i, s, cfg, vllm_config) for i, s in enumerate(slots))
        self.norm = RMSNorm(h, eps=cfg["rms_norm_eps"])
        self.rotary_emb = get_rope(
            cfg["head_dim"],
            max_position=cfg.get("max_position_embeddings", 8192),
            is_neox_style=True,
            rope_parameters=getattr(hf, "rope_parameters", None) or cfg.get("rope_parameters"),
        )
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(vocab, h)
        if self.tied:
            self.lm_head = self.lm_head.tie_weights(self.embed_tokens)
        self.logits_processor = LogitsProcessor(vocab)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings."""
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, for the flattened tokens of the batch."""
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for slot in self.slots:
            x = slot(self.blocks[str(slot.block)], self.rotary_emb, positions, x)
        return self.norm(x)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Vocabulary logits of the last hidden states."""
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Route the compact tensors to the modules; returns the names of the parameters filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target, shard = self._route(name)
            if target is None:
                raise ValueError(f"compact tensor {name!r} has no place in the vLLM model")
            p = params[target]
            loader = getattr(p, "weight_loader", default_weight_loader)
            if shard is None:
                loader(p, tensor)
            else:
                loader(p, tensor, shard)
            loaded.add(target)
        if self.tied:
            loaded.add("lm_head.weight")
        return loaded

    def _route(self, name: str) -> tuple[str | None, Any]:
        if name == "model.embed_tokens.weight":
            return "embed_tokens.weight", None
        if name == "model.norm.weight":
            return "norm.weight", None
        if name == "lm_head.weight":
            return (None if self.tied else "lm_head.weight"), None
        kind, _, rest = name.partition(".")
        index, _, inner = rest.partition(".")
        inner = inner.replace(".base_layer", "")
        if kind == "blocks":
            if inner.endswith("layernorm.weight"):
                return f"blocks.{index}.{inner}", None
            module, _, leaf = inner.rpartition(".")
            t = _TARGET_OF[module]
            if t in _FUSED:
                fused, shard = _FUSED[t]
                return f"blocks.{index}.{fused.split('.')[-1]}.{leaf}", shard
            return f"blocks.{index}.{module.split('.')[-1]}.{leaf}", None
        if kind == "slots":
            if inner.endswith("layernorm.weight"):
                return f"slots.{index}.{inner}", None
            if ".out_norm." in inner:
                return f"slots.{index}.{'attn' if inner.startswith('self_attn') else 'mlp'}_out_norm", None
            for which in ("lora_A", "lora_B"):
                if f".{which}." in inner:
                    module = inner.split(f".{which}.")[0]
                    return f"slots.{index}.lora_{which[-1].lower()}.{_TARGET_OF[module]}", None
        return None, None
