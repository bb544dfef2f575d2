"""LLM-Streamline (arXiv 2403.19135): one trained layer in place of the most redundant contiguous range.

To remove ``n`` blocks, the range of ``n + 1`` blocks whose input and output hidden states are
most alike (highest mean cosine) is replaced by one transformer block, initialised as a copy of
one block of the range and trained to reproduce the range's output hidden states from its input
hidden states (mean squared error) on the calibration tokens; nothing else changes. The result is
a plain model with ``n`` fewer layers. (The paper's other replacement, a bare FFN, has no place in
a plain transformers model and is not offered.)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from flexigpt.prune.depth.baselines.common import (
    BaselineError,
    BaselineResult,
    best_range,
    decoder_layers,
    hidden_from_args,
    layer_output,
    model_device,
    range_cosines,
    restack,
)

INITS: tuple[str, ...] = ("first", "last")


class RangeSamples:
    """Per calibration sample: the range's input hidden states, the layer's call arguments, its output."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.kwargs: list[dict[str, Any]] = []
        self.targets: list[torch.Tensor] = []


@torch.no_grad()
def capture_range(
    model: PreTrainedModel, samples: Sequence[torch.Tensor], start: int, n: int
) -> RangeSamples:
    """Record, for every sample, the input of block `start` (with the keyword arguments the model
    passes to a layer: position embeddings, mask) and the output of block ``start + n - 1``."""
    stack = decoder_layers(model)
    got = RangeSamples()

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        got.inputs.append(hidden_from_args(args, kwargs).detach())
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["past_key_values"], kw["use_cache"] = None, False
        got.kwargs.append(kw)

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        got.targets.append(layer_output(output).detach())

    handles = [
        stack[start].register_forward_pre_hook(pre, with_kwargs=True),
        stack[start + n - 1].register_forward_hook(post, with_kwargs=True),
    ]
    try:
        for ids in samples:
            model(input_ids=ids.to(model_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


def range_mse(layer: nn.Module, data: RangeSamples) -> float:
    """Mean squared error of `layer`'s outputs against the range's outputs, over all samples."""
    with torch.no_grad():
        errs = [
            torch.nn.functional.mse_loss(layer_output(layer(x, **kw)).float(), y.float(), reduction="sum")
            for x, kw, y in zip(data.inputs, data.kwargs, data.targets, strict=True)
        ]
        count = sum(y.numel() for y in data.targets)
    return float(sum(errs)) / max(count, 1)


def train_replacement(
    layer: nn.Module, data: RangeSamples, *, steps: int = 100, lr: float = 1e-4, seed: int = 0
) -> tuple[list[float], int]:
    """Train `layer` (in place) to map the range's inputs to its outputs (MSE, AdamW, one sample a step).

    Returns:
        The MSE over all samples before and after training, and the tokens trained on.
    """
    before = range_mse(layer, data)
    params = [p for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.randperm(len(data.inputs), generator=torch.Generator().manual_seed(seed))
    layer.train()
    tokens = 0
    for step in range(steps):
        k = int(order[step % len(order)])
        tokens += data.targets[k].shape[0] * data.targets[k].shape[1]
        opt.zero_grad()
        out = layer_output(layer(data.inputs[k], **data.kwargs[k])).float()
        loss = torch.nn.functional.mse_loss(out, data.targets[k].float())
        loss.backward()
        opt.step()
    layer.eval()
    for p in params:
        p.requires_grad_(False)
    return [before, range_mse(layer, data)], tokens


def streamline(
    model: PreTrainedModel,
    samples: Sequence[torch.Tensor],
    n: int,
    *,
    steps: int = 100,
    lr: float = 1e-4,
    init: str = "first",
    seed: int = 0,
) -> BaselineResult:
    """LLM-Streamline: replace the most redundant range of ``n + 1`` blocks with one trained block.

    Args:
        model: the plain source model (not modified).
        samples: calibration token tensors (the replacement trains on them).
        n: blocks to remove (net).
        steps: training steps of the replacement layer (one sample each).
        lr: its learning rate.
        init: which block of the range the replacement starts as (``first`` or ``last``).
        seed: the order in which samples are visited.

    Returns:
        The plain model with `n` fewer layers; ``train.trainable_layers`` names the replacement.

    Raises:
        BaselineError: an unknown init, or a range longer than the model.
    """
    if init not in INITS:
        raise BaselineError(f"init={init!r} is unknown; allowed: {list(INITS)}")
    num = len(decoder_layers(model))
    if not 1 <= n <= num - 1:
        raise BaselineError(f"blocks to remove = {n}: allowed 1..{num - 1} (the range of n + 1 must fit)")
    cos = range_cosines(model, samples, n + 1)
    start = best_range(cos)
    stack = decoder_layers(model)
    pick = start if init == "first" else start + n
    replacement = copy.deepcopy(stack[pick])
    data = capture_range(model, samples, start, n + 1)
    mse, tokens = train_replacement(replacement, data, steps=steps, lr=lr, seed=seed)
    blocks = list(range(start)) + [pick] + list(range(start + n + 1, num))
    layers = [stack[b] for b in range(start)] + [replacement] + [stack[b] for b in range(start + n + 1, num)]
    out = restack(model, layers, blocks)
    provenance: list[int | None] = list(range(start)) + [None] + list(range(start + n + 1, num))
    return BaselineResult(
        out,
        list(range(start, start + n + 1)),
        provenance,
        notes={
            "range_cosine": cos,
            "start": start,
            "range": [start, start + n],
            "init_block": pick,
            "mse": mse,
            "steps": steps,
            "trained_tokens": tokens,
        },
    )
