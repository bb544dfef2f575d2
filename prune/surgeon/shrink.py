"""Remove the structures a pruned model no longer uses, so that it is really smaller.

Row and column pruning leaves zeros inside full-size matrices. Some of them take a whole unit out
of the computation, and those are cut from the matrices:

- an MLP unit j whose gate row, up row (each with a zero bias, if any) or down column is zero:
  act(0)·up = 0 and gate·0 = 0, so the unit adds nothing (the Llama family's act(0) = 0); without
  a gate (OPT: fc1 = up, fc2 = down) a zero fc1 row with a zero bias gives act(0) = 0 (ReLU);
- an attention head whose output columns of o are zero, or whose value rows (with bias) are zero,
  with its q rows; a key/value head goes (k and v rows) when every query head that reads it has
  gone. Grouped-query models therefore lose whole groups only, keeping the grouping uniform.

Weights that are zero but sit in a live unit (a column of q, a row of o) stay: the hidden size
and head dimension are shared by the residual stream and the rotary embedding.

``shrink_model`` returns the plan (with each narrowed block's sizes) and the model with the
smaller tensors; ``apply_plan`` turns it into a shared model that saves in the compact format.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import BlockShape, Plan


def _zero_rows(linear: nn.Linear) -> torch.Tensor:
    dead = linear.weight.eq(0).all(dim=1)
    if linear.bias is not None:
        dead &= linear.bias.eq(0)
    return dead


def _keep_at_least_one(keep: torch.Tensor) -> torch.Tensor:
    # a block with nothing left keeps one (silent) unit: zero-size matrices are not worth the risk
    if not keep.any():
        keep = keep.clone()
        keep[0] = True
    return keep


def _select(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    w = linear.weight.detach()
    if rows is not None:
        w = w[rows]
        if linear.bias is not None:
            linear.bias = nn.Parameter(
                linear.bias.detach()[rows].clone(), requires_grad=linear.bias.requires_grad
            )
    if cols is not None:
        w = w[:, cols]
    linear.weight = nn.Parameter(w.clone().contiguous(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


@torch.no_grad()
def shrink_model(model: PreTrainedModel, notes: dict | None = None) -> tuple[PreTrainedModel, Plan]:
    """Cut dead MLP units and attention heads out of every block of a plain model, in place.

    Args:
        model: a plain model of a supported architecture, with pruned (zero) structures.
        notes: provenance for the plan.

    Returns:
        The model (its tensors replaced by the smaller ones; its config unchanged) and the
        identity plan of the source architecture with the narrowed blocks' sizes.
    """
    config = model.config
    layout = get_layout(config)
    layers = model.get_submodule(layout.layers_path)
    head_dim = layout.head_dim(config)
    heads, kv_heads = config.num_attention_heads, layout.kv_heads(config)
    n_rep = heads // kv_heads
    shapes: dict[int, BlockShape] = {}
    # a zero pre-activation silences a unit only if act(0) = 0 (SiLU, GELU, ReLU do)
    act = getattr(config, "hidden_act", None) or config.activation_function
    zero_is_silent = bool(ACT2FN[act](torch.zeros(1)).eq(0).all())
    gated = "gate" in layout.targets
    for b, layer in enumerate(layers):
        lin = {t: layer.get_submodule(p) for t, p in layout.linears}
        unit_dead = lin["down"].weight.eq(0).all(dim=0)
        if gated:  # up·act(gate): a zero up row silences the unit whatever the activation
            unit_dead |= _zero_rows(lin["up"])
        if zero_is_silent:
            unit_dead |= _zero_rows(lin["gate" if gated else "up"])
        units = _keep_at_least_one(~unit_dead).nonzero().flatten()
        o_dead = lin["o"].weight.eq(0).all(dim=0).view(heads, head_dim).all(dim=1)
        v_dead = _zero_rows(lin["v"]).view(kv_heads, head_dim).all(dim=1)
        head_dead = o_dead | v_dead.repeat_interleave(n_rep)
        groups = _keep_at_least_one(~head_dead.view(kv_heads, n_rep).all(dim=1)).nonzero().flatten()
        q_heads = (groups[:, None] * n_rep + torch.arange(n_rep)[None, :]).flatten()
        if len(units) == layout.ffn_size(config) and len(groups) == kv_heads:
            continue

        def dims(idx: torch.Tensor) -> torch.Tensor:
            return (idx[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()

        for t in ("gate", "up") if gated else ("up",):
            _select(lin[t], rows=units)
        _select(lin["down"], cols=units)
        _select(lin["q"], rows=dims(q_heads))
        _select(lin["k"], rows=dims(groups))
        _select(lin["v"], rows=dims(groups))
        _select(lin["o"], cols=dims(q_heads))
        shapes[b] = BlockShape(len(units), len(q_heads), len(groups))
    plan = Plan.identity(config.model_type, len(layers))
    plan = Plan(plan.model_type, plan.num_source_layers, plan.slots, dict(notes or {}), shapes)
    return model, plan
