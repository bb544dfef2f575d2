"""Dense growth baselines: LLaMA-Pro and plain stacking, as plain models of the source class.

The engine's slots always share their block's Parameters, so a baseline whose inserted blocks are
*private* full copies (LLaMA-Pro trains them; mergekit's passthrough stacks them) is built here,
outside the engine: a plain ``<Family>ForCausalLM`` whose decoder stack follows a ``DensePlan``.
Every layer is rebuilt from the grown config (so ``layer_idx`` and per-layer fields such as
Qwen2's ``layer_types`` follow the new order); original layers take over the source's Parameters,
inserted ones get deep copies.

The trainable set of a dense model is not the engine's rule (which speaks of adapters and norms of
shared models): ``set_dense_trainable`` freezes everything but the inserted layers for LLaMA-Pro
and asserts the count the plan predicts. It works on the plain model and on the identity-plan
shared model the trainer wraps it in, since both name the layers ``model.layers.<i>``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from flexigpt.shared.engine.apply import stack_config
from flexigpt.shared.engine.layout import ArchLayout, get_layout

from .strategies import DensePlan, GrowError


def grown_config(source_config: PretrainedConfig, plan: DensePlan, layout: ArchLayout) -> PretrainedConfig:
    """The config of the grown stack: layer count and per-layer fields follow ``plan.order``."""
    return stack_config(source_config, plan.order, layout)


@torch.no_grad()
def grow_dense(source: PreTrainedModel, plan: DensePlan) -> PreTrainedModel:
    """Grow `source` in place into the plain model of `plan`.

    The source model is consumed: its original layers move into the new stack (same Parameters),
    inserted layers are deep copies of their source block. With ``plan.init == "zero_out"`` the
    copies' o_proj and down_proj (weights and biases) are zeroed, so each copy adds nothing to the
    residual stream and the grown model computes exactly what the source did.

    Args:
        source: a loaded plain model of a supported family.
        plan: the dense plan (from the ``llama_pro`` or ``stack`` strategy).

    Returns:
        The same model object with the grown stack and an updated config.

    Raises:
        GrowError: the plan does not fit the model, or `source` is a shared-block model.
    """
    layout = get_layout(source.config)
    if getattr(source, "plan", None) is not None:
        raise GrowError("dense growth needs a plain model; the source is a shared-block (compact) model")
    if (
        plan.model_type != source.config.model_type
        or plan.num_source_layers != source.config.num_hidden_layers
    ):
        raise GrowError(
            f"dense plan is for {plan.model_type} with {plan.num_source_layers} layers; the source is "
            f"{source.config.model_type} with {source.config.num_hidden_layers}"
        )
    plan.validate()
    old = source.get_submodule(layout.layers_path)
    config = grown_config(source.config, plan, layout)
    inserted = set(plan.inserted)
    new_layers = []
    for i, b in enumerate(plan.order):
        with torch.device("meta"):
            layer = type(old[b])(config, layer_idx=i)
        state = old[b].state_dict()
        if i in inserted:
            state = {k: v.detach().clone() for k, v in state.items()}
        layer.load_state_dict(state, assign=True, strict=True)
        if i in inserted and plan.init == "zero_out":
            for path in (layout.attn_out, layout.mlp_out):
                for p in layer.get_submodule(path).parameters():
                    p.zero_()
        new_layers.append(layer.train(old[b].training))
    source.set_submodule(layout.layers_path, nn.ModuleList(new_layers))
    for name in ("num_hidden_layers", *layout.per_layer_config):
        setattr(source.config, name, getattr(config, name))
    for name, t in source.named_parameters():
        if t.device.type == "meta":
            raise GrowError(f"dense growth left {name} on the meta device")
    return source


def dense_param_count(config: PretrainedConfig, num_layers: int) -> int:
    """Parameters of a plain model of `config`'s family with `num_layers` blocks (tied embeddings once)."""
    layout = get_layout(config)
    return layout.top_param_count(config) + num_layers * layout.block_param_count(config)


def expected_dense_trainable(plan: DensePlan, source_config: PretrainedConfig) -> int:
    """Trainable parameters of a dense grown model under ``plan.trainable``, from the config alone."""
    if plan.trainable == "all":
        return dense_param_count(source_config, plan.num_layers)
    return len(plan.inserted) * get_layout(source_config).block_param_count(source_config)


def set_dense_trainable(model: nn.Module, plan: DensePlan) -> int:
    """Freeze and unfreeze a dense grown model by ``plan.trainable``; assert the predicted count.

    ``inserted`` (LLaMA-Pro): only the inserted layers train; the original blocks, the embeddings,
    the final norm and the head stay frozen. ``all``: every parameter trains.

    Args:
        model: the grown model (plain, or wrapped by the engine with an identity plan).
        plan: its dense plan.

    Returns:
        The number of trainable parameters.

    Raises:
        GrowError: the count differs from what the plan predicts (the model is not the plan's).
    """
    layout = get_layout(model.config)
    prefixes = tuple(f"{layout.layers_path}.{i}." for i in plan.inserted)
    for name, p in model.named_parameters():
        p.requires_grad_(plan.trainable == "all" or name.startswith(prefixes))
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    want = expected_dense_trainable(plan, model.config)  # only per-block shapes and the vocab matter
    if count != want:
        raise GrowError(
            f"trainable={plan.trainable!r}: {count} trainable parameters, the plan predicts {want}"
        )
    return count
