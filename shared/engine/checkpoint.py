"""The compact checkpoint format, its transformers Auto-class registration, and exports.

A compact checkpoint directory holds:

- ``config.json`` with ``model_type: "flexigpt"``, the source model's config (``base_config``) and
  the plan; transformers reads it through ``AutoConfig`` once ``flexigpt.shared`` is imported;
- ``model.safetensors`` with every *physical* block once (``blocks.<b>.<name>``), every slot's own
  parameters (``slots.<i>.<name>``: LoRA factors, output norms, private norms), and the tensors
  outside the decoder stack under their usual names (tied embeddings stored once);
- ``plan.json`` (the same plan, readable on its own), ``generation_config.json`` and, when given,
  the tokenizer files.

``AutoModelForCausalLM.from_pretrained(dir)`` restores the sharing (the same Parameter objects),
bit-identical outputs and the plan, with no ``trust_remote_code``: the model class it resolves to
(``autoclass.FlexiGPTForCausalLM``) builds the model from the plan. Importing this module registers
it; ``import flexigpt.shared`` registers it when transformers' Auto classes are first imported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedModel

from flexigpt.shared.engine.apply import (
    SOURCE_CLASSES,
    _layers,
    _set_param,
    apply_plan,
    canonical_name,
    iter_slot_params,
    materialize,
)
from flexigpt.shared.engine.autoclass import FlexiGPTConfig, FlexiGPTForCausalLM, register_auto_classes
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import Plan, PlanError

# Whoever imports this module can load compact checkpoints through the Auto classes at once, hook or not.
register_auto_classes()

WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = "flexigpt-compact/1"


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or does not match its plan."""


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def compact_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors of the compact format: each physical block once, slot-owned tensors per slot."""
    plan: Plan = model.plan
    layout = get_layout(model.config)
    prefix = layout.layers_path + "."
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # duplicates (tied or shared) are skipped by torch
        if not name.startswith(prefix):
            tensors[name] = p
    layers = _layers(model, layout)
    for block in plan.physical_blocks:
        owner = plan.owner_slot(block)
        spec = plan.slots[owner]
        for name, p in layers[owner].named_parameters():
            if ".lora_" in name or ".out_norm." in name:
                continue
            if spec.own_norms and canonical_name(name).rsplit(".", 1)[0] in layout.norms:
                # the owner uses private norms; the block's norms are stored if another slot uses them
                users = [i for i, s in enumerate(plan.slots) if s.block == block and not s.own_norms]
                if not users:
                    continue
                p = layers[users[0]].get_parameter(name)
            tensors[f"blocks.{block}.{canonical_name(name)}"] = p
    for slot, name, _role, p in iter_slot_params(model):
        tensors[f"slots.{slot}.{name}"] = p
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def save_compact(model: PreTrainedModel, save_directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write `model` in the compact format, atomically (a temporary directory, then a rename).

    Args:
        model: a shared model from ``apply_plan`` / ``load_compact``.
        save_directory: target directory; replaced if it exists.
        tokenizer: optional tokenizer saved beside the weights.

    Returns:
        The directory written.
    """
    out = Path(save_directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plan: Plan = model.plan
        save_file(
            compact_state(model),
            str(tmp / WEIGHTS_NAME),
            metadata={"format": "pt", "flexigpt": FORMAT_VERSION},
        )
        cfg = FlexiGPTConfig(base_config=model.source_config.to_dict(), plan=plan.to_dict())
        cfg.architectures = ["FlexiGPTForCausalLM"]
        cfg.save_pretrained(tmp)
        plan.save(tmp / "plan.json")
        model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def _resolve_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists() or str(path).startswith((".", "/")):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    from huggingface_hub import snapshot_download  # a hub id: what users run, never the tests

    return Path(snapshot_download(str(path)))


def is_compact(path: str | os.PathLike) -> bool:
    """True if `path` is a local compact checkpoint directory."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "flexigpt"


def load_compact(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, attn_implementation: str | None = None
) -> PreTrainedModel:
    """Load a compact checkpoint: the shared model with its sharing, plan and exact weights.

    Args:
        path: a local compact directory or a hub id.
        dtype: cast the loaded weights to this dtype (default: as stored).
        attn_implementation: ``eager`` | ``sdpa`` | ... (default ``sdpa``, as transformers).

    Raises:
        CheckpointError: the directory is incomplete or its tensors do not match the plan.
        PlanError: the plan is invalid or names an unsupported architecture.
    """
    d = _resolve_dir(path)
    raw = json.loads((d / "config.json").read_text())
    if raw.get("model_type") != "flexigpt":
        raise CheckpointError(f"{d}: config.json has model_type={raw.get('model_type')!r}, not 'flexigpt'")
    base_dict = dict(raw["base_config"])
    layout = get_layout(base_dict.get("model_type"))
    base = CONFIG_MAPPING[layout.model_type].from_dict(base_dict)
    base._attn_implementation = attn_implementation or "sdpa"
    plan = Plan.from_dict(raw["plan"])
    with torch.device("meta"):
        source = SOURCE_CLASSES[layout.model_type](base)
    src_layers = _layers(source, layout)
    slot_tensors: dict[tuple[int, str], torch.Tensor] = {}
    with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            t = f.get_tensor(key)
            kind, _, rest = key.partition(".")
            if kind == "blocks":
                b, _, name = rest.partition(".")
                _set_param(src_layers[int(b)], name, nn.Parameter(t))
            elif kind == "slots":
                i, _, name = rest.partition(".")
                slot_tensors[(int(i), name)] = t
            else:
                _set_param(source, key, nn.Parameter(t))
    if base.tie_word_embeddings:
        source.lm_head.weight = source.model.embed_tokens.weight
    for path_ in layout.buffer_modules:  # non-persistent buffers (rotary inv_freq) are rebuilt
        source.set_submodule(path_, type(source.get_submodule(path_))(config=base))
    model = apply_plan(source, plan, init_slot_params=False)
    want = {(i, name): p for i, name, _, p in iter_slot_params(model)}
    missing, extra = sorted(set(want) - set(slot_tensors)), sorted(set(slot_tensors) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{d}: slot tensors do not match the plan (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    with torch.no_grad():
        for key, p in want.items():
            p.copy_(slot_tensors[key])
    if (d / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(d)
    if dtype is not None:
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.eval()


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, attn_implementation: str | None = None
) -> PreTrainedModel:
    """Load a compact checkpoint or a plain HF model (local directory or hub id)."""
    if is_compact(path):
        return load_compact(path, dtype=dtype, attn_implementation=attn_implementation)
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    get_layout(model.config)  # refuse unsupported architectures early, with the supported list
    return model


def export_materialized(
    model: PreTrainedModel, save_directory: str | os.PathLike, tokenizer: Any = None
) -> Path:
    """Save a plain HF model of the source architecture (adapters merged into private copies).

    Raises:
        PlanError: the plan has output feature norms, which the plain architecture cannot hold.
    """
    plain = materialize(model)
    out = Path(save_directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = [
    "CheckpointError",
    "FlexiGPTConfig",
    "FlexiGPTForCausalLM",
    "PlanError",
    "export_materialized",
    "is_compact",
    "load_compact",
    "load_model",
    "register_auto_classes",
    "save_compact",
]
