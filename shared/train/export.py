"""Turn a training checkpoint into a model, without starting a training engine.

DeepSpeed's ``zero_to_fp32`` reassembles the full fp32 weights from the ZeRO partitions of every
rank (any stage, any world size). The model skeleton is rebuilt from the checkpoint's own
``recipe.yaml`` (its ``model`` section) and ``plan.json``, the weights are loaded into it, and the
result is written in the compact format and, on request, materialised as a plain HF model or as
a plain base plus a peft adapter.

``zero_to_fp32`` unpickles without restrictions, so every ``*.pt`` file of the checkpoint is first
unpickled with ``weights_only=True`` and the allow-list of ``state.safe_torch_load``; a file that
names anything else is refused before DeepSpeed opens it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import PreTrainedModel

from flexigpt.shared.engine.apply import apply_plan, check_plain_exportable
from flexigpt.shared.engine.checkpoint import export_materialized, save_compact
from flexigpt.shared.engine.peft_export import check_peft_exportable, export_peft
from flexigpt.shared.engine.plan import Plan, PlanError
from flexigpt.shared.recipe import ModelSection
from flexigpt.shared.train.components import DTYPES, load_tokenizer
from flexigpt.shared.train.state import check_pickles, list_checkpoints


class ExportError(RuntimeError):
    """A checkpoint cannot be exported (missing files, weights that do not match the model)."""


def consolidated_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint directory (``.../checkpoints/step_N``), from every rank's partition."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    d = Path(ckpt_dir)
    reason = check_pickles(d)  # raises UnsafeCheckpointError for planted objects
    if reason is not None:
        raise ExportError(f"checkpoint {d} is unusable: {reason}")
    state = get_fp32_state_dict_from_zero_checkpoint(str(d.parent), tag=d.name)
    # ZeRO-1 records no frozen parameters beside the optimizer partitions; their values (never
    # trained, so exact in the training dtype) are in the module state that stages 1-2 save whole.
    model_states = sorted(d.glob("*model_states.pt"))
    if model_states:
        module = (
            torch.load(model_states[0], map_location="cpu", weights_only=True, mmap=True).get("module") or {}
        )
        for name, value in module.items():
            if name not in state and value.numel() > 0:
                state[name] = value.float()
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> list[str]:
    """Copy `state` into `model` by name; names of shared (aliased) Parameters may appear under any alias.

    Args:
        model: the model to fill.
        state: name -> tensor (fp32 from ``consolidated_state_dict``).
        strict: raise if a parameter of the model gets no value or a tensor matches no parameter
            (by name and shape); otherwise such tensors are skipped.

    Returns:
        Parameter names that got no value (empty when strict).

    Raises:
        ExportError: with strict, the names (or shapes) that do not match.
    """
    # Every alias of a Parameter maps to the one object, so a value under any alias fills all of them.
    params: dict[str, nn.Parameter] = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    filled: set[int] = set()
    unexpected = []
    with torch.no_grad():
        for name, value in state.items():
            if name in buffers and tuple(buffers[name].shape) == tuple(value.shape):
                buffers[name].copy_(value.to(buffers[name].dtype))
                continue
            p = params.get(name)
            if p is None:
                unexpected.append(name)
                continue
            if tuple(p.shape) != tuple(value.shape):
                if strict:
                    raise ExportError(
                        f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(p.shape)}"
                    )
                unexpected.append(name)
                continue
            p.copy_(value.to(p.dtype))
            filled.add(id(p))
    missing = sorted({n for n, p in params.items() if id(p) not in filled})
    if strict and (missing or unexpected):
        raise ExportError(
            f"checkpoint does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return missing


def checkpoint_dir(ckpt_dir: str | Path) -> Path:
    """The checkpoint directory itself: `ckpt_dir`, or the newest checkpoint inside it.

    Raises:
        ExportError: neither a checkpoint nor a directory of checkpoints.
    """
    d = Path(ckpt_dir)
    if not (d / "recipe.yaml").is_file():
        found = list_checkpoints(d)
        if not found:
            raise ExportError(f"{d} is neither a checkpoint directory nor a directory of checkpoints")
        d = found[0]
    return d


def model_from_checkpoint(ckpt_dir: str | Path, dtype: str = "float32") -> tuple[PreTrainedModel, Any]:
    """Rebuild the trained model of a checkpoint (and its tokenizer) on CPU, without DeepSpeed's engine.

    Args:
        ckpt_dir: a checkpoint directory ``.../checkpoints/step_N`` or a ``checkpoints`` directory
            (its newest checkpoint is used).
        dtype: float32 | bfloat16 | float16 for the rebuilt model.

    Raises:
        ExportError: no checkpoint, or its weights do not fit the model its recipe and plan describe.
    """
    d = checkpoint_dir(ckpt_dir)
    raw = yaml.safe_load((d / "recipe.yaml").read_text())
    section = ModelSection.model_validate(raw["model"])
    from flexigpt.shared.engine.checkpoint import load_model

    # Every tensor is overwritten below; adapters need no initialisation.
    from flexigpt.shared.train.guards import check_weight_files

    check_weight_files(section.source, section.allow_pickle_weights)
    model = load_model(section.source, dtype=DTYPES[dtype], attn_implementation=section.attn_implementation)
    plan = Plan.load(d / "plan.json")
    if getattr(model, "plan", None) is None:
        model = apply_plan(model, plan, init_slot_params=False)
    elif model.plan.to_dict() != plan.to_dict():
        raise ExportError(f"{d}/plan.json differs from the plan of the compact source {section.source}")
    load_weights(model, consolidated_state_dict(d))
    return model.eval(), load_tokenizer(section)


def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    materialize: bool = False,
    peft: bool = False,
    dtype: str = "float32",
) -> list[Path]:
    """Write the model of a checkpoint in the compact format (and materialised / as peft, on request).

    What the plan cannot give (a plain model of a plan with output norms, a peft adapter of a plan
    that reuses blocks) is refused from ``plan.json`` before any weight is read or file written.

    Args:
        ckpt_dir: a checkpoint directory or a ``checkpoints`` directory (newest used).
        out_dir: target of the compact model; the materialised one goes to ``<out_dir>_materialized``.
        materialize: also write a plain HF model (adapters merged into private weight copies).
        peft: also write the plain base and a peft adapter to ``<out_dir>_peft/{base,adapter}``.
        dtype: float32 | bfloat16 | float16.

    Returns:
        The directories written.

    Raises:
        ExportError: no checkpoint, weights that do not fit, or an export the plan cannot give.
    """
    d = checkpoint_dir(ckpt_dir)
    plan = Plan.load(d / "plan.json")
    for wanted, flag, check in (
        (materialize, "--materialize", check_plain_exportable),
        (peft, "--peft", check_peft_exportable),
    ):
        try:
            if wanted:
                check(plan)
        except PlanError as e:
            raise ExportError(f"{flag}: {e}") from None
    model, tokenizer = model_from_checkpoint(d, dtype=dtype)
    out = Path(out_dir)
    written = [save_compact(model, out, tokenizer=tokenizer)]
    if materialize:
        written.append(
            export_materialized(model, out.with_name(out.name + "_materialized"), tokenizer=tokenizer)
        )
    if peft:
        written.extend(export_peft(model, out.with_name(out.name + "_peft"), tokenizer=tokenizer))
    return written
