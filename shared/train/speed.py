"""The trainer's speed options: AdamW's implementation (``train.optimizer_impl``) and regional
compilation of the decoder slots (``train.compile``).

``fused`` runs AdamW's whole update as one fused kernel per parameter group
(``torch.optim.AdamW(fused=True)``, on CUDA and on the CPU); ``foreach`` uses PyTorch's
multi-tensor ops; ``auto`` is fused on GPUs and PyTorch's own default elsewhere. DeepSpeed ZeRO-1/2
hand the optimizer its flat fp32 partitions and ZeRO-3 its fp32 partitioned copies: every choice
steps those, so the choice changes the kernels, not the checkpoint format.

``compile_slots`` compiles every decoder slot in place (``nn.Module.compile``: the module keeps its
class and its parameter names, so state dicts, checkpoints and exports are those of the eager
model). Slots of one structure (a plain block, a reusing slot with adapters and an output norm) share
one graph: the compiled code takes the parameters as inputs, so a shared block compiles once per
distinct slot structure, not once per slot.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.recipe import RecipeError, TrainSection


def adamw_kwargs(impl: str, device: torch.device) -> dict[str, Any]:
    """The implementation arguments of ``torch.optim.AdamW`` for ``train.optimizer_impl`` on `device`."""
    if impl == "fused" or (impl == "auto" and device.type == "cuda"):
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True}
    return {}  # auto off CUDA: PyTorch's default (single-tensor loop on the CPU)


def check_speed_options(train: TrainSection, stage: int) -> None:
    """Refuse the speed-option combinations that cannot work as asked.

    Raises:
        RecipeError: ``train.compile`` with ZeRO-3, with gradient checkpointing, or with
            ``train.shared_grad_in_gemm``.
    """
    if not train.compile:
        return
    if stage == 3:
        raise RecipeError(
            "train.compile=true with ZeRO-3 (train.ds_config): ZeRO-3 gathers every submodule's partitioned "
            "parameters in hooks that torch.compile may not trace, so each slot breaks into many small "
            "graphs and recompiles past its limit; use ZeRO-1/2 or train.compile=false"
        )
    if train.gradient_checkpointing:
        raise RecipeError(
            "train.compile=true with train.gradient_checkpointing=true: checkpointed slots run their "
            "forward inside torch.utils.checkpoint and are left almost entirely uncompiled; set one of them "
            "to false"
        )
    if train.shared_grad_in_gemm:
        raise RecipeError(
            "train.compile=true with train.shared_grad_in_gemm=true: the in-GEMM gradient path keeps its "
            "accumulator outside the graph, so every shared linear breaks the compiled slot into pieces; "
            "set one of them to false"
        )


def compile_slots(model: nn.Module) -> int:
    """``torch.compile`` every decoder slot of `model` in place; returns how many were compiled."""
    layers = model.get_submodule(get_layout(model.config).layers_path)
    for layer in layers:
        layer.compile()
    return len(layers)


def prepare_model(model: nn.Module, train: TrainSection, stage: int) -> None:
    """Apply ``train.gradient_checkpointing`` and ``train.compile`` to `model` before DeepSpeed wraps it.

    Raises:
        RecipeError: the combination is refused (``check_speed_options``).
    """
    check_speed_options(train, stage)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.compile:
        compile_slots(model)
