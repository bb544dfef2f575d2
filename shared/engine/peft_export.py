"""peft export: a plain base model plus a peft LoRA adapter, for models that are exactly that.

A shared model whose slots each run their own block once (no block reused) and carry no output
feature norm is a plain stack of decoder blocks with LoRA adapters on some linears: ShortGPT+LoRA
is the typical case. Such a model leaves the toolkit as two directories that the peft and
transformers users already know:

- ``base/``: the plain HF model of the source architecture, one layer per slot (adapters *not*
  merged; slot-private norms are the layer's norms), plus the tokenizer when given;
- ``adapter/``: ``adapter_config.json`` + ``adapter_model.safetensors`` written by peft itself,
  with the exact module names, ranks and alphas of every slot's adapters (peft ``rank_pattern`` /
  ``alpha_pattern``), so that ``PeftModel.from_pretrained(base, adapter_dir)`` gives the model.

The base here is a new container around the shared model's own Parameters (nothing is copied
before saving), so the export costs no extra memory.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from flexigpt.shared.engine.adapters import ADAPTER_NAME, SharedLoraLinear, lora_factors
from flexigpt.shared.engine.apply import SOURCE_CLASSES, _layers, _set_param, canonical_name
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import Plan, PlanError
from flexigpt.shared.engine.tokenizer_files import save_tokenizer
from flexigpt.shared.files import atomic_dir

BASE_DIR = "base"
ADAPTER_DIR = "adapter"


def check_peft_exportable(plan: Plan) -> None:
    """Refuse plans that are not a plain base plus adapters.

    Raises:
        PlanError: a block is run by several slots, or slots have output feature norms.
    """
    blocks = [s.block for s in plan.slots]
    reused = sorted({b for b in blocks if blocks.count(b) > 1})
    normed = [i for i, s in enumerate(plan.slots) if s.out_norm is not None]
    if reused or normed:
        why = (f"blocks {reused} are run by several slots" if reused else "") + (
            f"{'; ' if reused else ''}slots {normed} have output feature norms" if normed else ""
        )
        raise PlanError(
            f"a peft export needs a plan whose slots each run their own block once, without output "
            f"norms (ShortGPT+LoRA); here {why}. Save the compact format instead (or a materialised "
            "export where no slot has an output norm)"
        )


def peft_base(model: PreTrainedModel) -> PreTrainedModel:
    """The plain base of a shared model that is a base plus adapters: the adapters left out.

    Args:
        model: a shared model that passes ``check_peft_exportable``.

    Returns:
        A ``<Family>ForCausalLM`` with one layer per slot, holding the shared model's own
        Parameters (block weights, slot-private norms, embeddings); the adapters are not applied.
    """
    check_peft_exportable(model.plan)
    layout = get_layout(model.config)
    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        plain = SOURCE_CLASSES[layout.model_type](config)
    for path in layout.top_modules:
        plain.set_submodule(path, model.get_submodule(path))
    layers = []
    for i, layer in enumerate(_layers(model, layout)):
        with torch.device("meta"):
            dense = type(layer)(config, layer_idx=i)
        for name, p in layer.named_parameters():
            if ".lora_" not in name:
                _set_param(dense, canonical_name(name), p)
        layers.append(dense)
    plain.set_submodule(layout.layers_path, torch.nn.ModuleList(layers))
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.train(model.training)


def peft_config(model: PreTrainedModel) -> LoraConfig:
    """The peft ``LoraConfig`` of a shared model's adapters: exact module names, per-module rank and alpha."""
    layout = get_layout(model.config)
    targets, ranks, alphas = [], {}, {}
    for i, layer in enumerate(_layers(model, layout)):
        for name, m in layer.named_modules():
            if isinstance(m, SharedLoraLinear):
                path = f"{layout.layers_path}.{i}.{canonical_name(name)}"
                targets.append(path)
                ranks[path] = m.r[ADAPTER_NAME]
                alphas[path] = m.lora_alpha[ADAPTER_NAME]
    if not targets:
        raise PlanError("the plan has no adapters: export the plain model instead of a peft adapter")
    first = targets[0]
    return LoraConfig(
        r=ranks[first],
        lora_alpha=alphas[first],
        target_modules=targets,
        rank_pattern={k: v for k, v in ranks.items() if v != ranks[first]},
        alpha_pattern={k: v for k, v in alphas.items() if v != alphas[first]},
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def export_peft(
    model: PreTrainedModel, save_directory: str | os.PathLike, tokenizer: Any = None
) -> tuple[Path, Path]:
    """Write the plain base and the peft adapter of `model` under `save_directory`, atomically.

    Args:
        model: a shared model whose slots each run their own block once, without output norms.
        save_directory: target; gets ``base/`` and ``adapter/`` (replaced if it exists).
        tokenizer: saved into ``base/`` (and ``adapter/``) when given.

    Returns:
        (base directory, adapter directory).

    Raises:
        PlanError: the plan is not a base plus adapters (see ``check_peft_exportable``).
    """
    check_peft_exportable(model.plan)
    lora_config = peft_config(model)
    out = Path(save_directory)
    with atomic_dir(out) as tmp:
        base = peft_base(model)
        base.save_pretrained(tmp / BASE_DIR)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp / BASE_DIR)
        base.name_or_path = str(tmp / BASE_DIR)  # peft reads the base's config from there while saving
        # peft freezes the base, whose Parameters are the shared model's: their flags are put back below
        trainable = {id(p): p.requires_grad for p in model.parameters()}
        peft_model = get_peft_model(base, lora_config)  # wraps the base's own linears, not the shared ones
        for p in model.parameters():
            p.requires_grad_(trainable[id(p)])
        layout = get_layout(model.config)
        with torch.no_grad():
            for i, layer in enumerate(_layers(model, layout)):
                for name, m in layer.named_modules():
                    if isinstance(m, SharedLoraLinear):
                        path = f"{layout.layers_path}.{i}.{canonical_name(name)}"
                        target = peft_model.base_model.model.get_submodule(path)
                        a, b, _ = lora_factors(m)
                        target.lora_A[ADAPTER_NAME].weight.copy_(a)
                        target.lora_B[ADAPTER_NAME].weight.copy_(b)
        peft_model.save_pretrained(tmp / ADAPTER_DIR)
        # The adapter names its base by the final location (AutoPeftModel loads the base from it).
        cfg_path = tmp / ADAPTER_DIR / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str((out / BASE_DIR).resolve())
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp / ADAPTER_DIR)
    return out / BASE_DIR, out / ADAPTER_DIR


__all__ = ["ADAPTER_DIR", "BASE_DIR", "check_peft_exportable", "export_peft", "peft_base", "peft_config"]
