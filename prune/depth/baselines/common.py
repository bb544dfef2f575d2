"""What the depth-pruning baselines share: restacking a plain model, reading hidden states, ranges.

Every baseline here returns a *plain* model of the source class with fewer layers (no shared
blocks, no new parameter types), so plain transformers, vLLM and llama.cpp load its export as is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from flexigpt.shared.engine.apply import stack_config
from flexigpt.shared.engine.layout import get_layout


class BaselineError(ValueError):
    """A baseline's options do not fit the model; the message names the option and what is allowed."""


@dataclass
class BaselineResult:
    """A pruned plain model and what a report needs to know about how it was made."""

    model: PreTrainedModel
    """The pruned plain model (source class, fewer layers)."""
    removed: list[int]
    """Source blocks that no longer run as themselves (a replaced range counts as removed)."""
    layers: list[int | None]
    """Source block of every layer of the result; None: a layer the method made (a replacement)."""
    train: dict[str, Any] = field(default_factory=dict)
    """``train:`` values of this method's recovery (e.g. which layers train)."""
    notes: dict[str, Any] = field(default_factory=dict)
    """What the method measured and chose (scores, range, objective values), JSON-serialisable."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder stack of a plain model of a supported family."""
    return model.get_submodule(get_layout(model.config).layers_path)


def restack(model: PreTrainedModel, layers: Sequence[nn.Module], blocks: Sequence[int]) -> PreTrainedModel:
    """A copy of `model` whose decoder stack is `layers` (copied), described as running source `blocks`.

    The layer count, every per-layer config list and every ``layer_idx`` follow the new stack, so
    the KV cache, ``save_pretrained`` and ``from_pretrained`` see a consistent model.

    Args:
        model: the plain source model (not modified).
        layers: the decoder layers of the result, bottom to top (modules of `model` or new ones).
        blocks: for the config's per-layer lists, the source block each layer stands for.

    Returns:
        A new plain model of the source class.
    """
    layout = get_layout(model.config)
    stack = decoder_layers(model)
    keep = nn.ModuleList()
    # copy the top modules once by detaching the stack for the deep copy, then attach copied layers
    parent_path, _, name = layout.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, name, nn.ModuleList())
    try:
        out = copy.deepcopy(model)
    finally:
        setattr(parent, name, stack)
    for layer in layers:
        keep.append(copy.deepcopy(layer))
    for i, layer in enumerate(keep):
        for carrier in layout.layer_idx_carriers:
            module = layer.get_submodule(carrier)
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = i
    out.get_submodule(parent_path).__setattr__(name, keep)
    out.config = stack_config(model.config, list(blocks), layout)
    out.get_submodule(parent_path).config = out.config
    return out.train(model.training)


def keep_blocks(model: PreTrainedModel, removed: Iterable[int]) -> PreTrainedModel:
    """A copy of `model` without the `removed` blocks."""
    gone = set(removed)
    stack = decoder_layers(model)
    blocks = [b for b in range(len(stack)) if b not in gone]
    return restack(model, [stack[b] for b in blocks], blocks)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def hidden_from_args(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with (positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def stack_states(
    model: PreTrainedModel, samples: Iterable[torch.Tensor], visit: Callable[[list[torch.Tensor]], None]
) -> int:
    """Run every sample and call `visit` with its L + 1 residual states (fp32, tokens x hidden).

    State j is the input of block j; state L the output of the last block, before the final norm
    (the last hidden state transformers returns is after it, which would skew the top range).

    Returns:
        The number of tokens seen.
    """
    stack = decoder_layers(model)
    states: list[torch.Tensor] = []
    handles = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        states.append(hidden_from_args(args, kwargs).detach().float().reshape(-1, model.config.hidden_size))

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        states.append(layer_output(output).detach().float().reshape(-1, model.config.hidden_size))

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in stack]
    handles.append(stack[-1].register_forward_hook(post, with_kwargs=True))
    tokens = 0
    try:
        for ids in samples:
            states.clear()
            model(input_ids=ids.to(model_device(model)), use_cache=False)
            visit(states)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return tokens


def range_cosines(model: PreTrainedModel, samples: Sequence[torch.Tensor], n: int) -> list[float]:
    """Mean cosine similarity, over calibration tokens, of the input of block i and the output of
    block i + n - 1, for every start i (the range criterion of ReplaceMe and LLM-Streamline).

    Raises:
        BaselineError: n is not 1..L.
    """
    num = len(decoder_layers(model))
    if not 1 <= n <= num:
        raise BaselineError(f"range length {n}: allowed 1..{num} (the model has {num} blocks)")
    sums = torch.zeros(num - n + 1, dtype=torch.float64)

    def visit(states: list[torch.Tensor]) -> None:
        for i in range(num - n + 1):
            cos = torch.nn.functional.cosine_similarity(states[i], states[i + n], dim=-1)
            sums[i] += cos.double().sum()

    tokens = stack_states(model, samples, visit)
    return [float(s) / max(tokens, 1) for s in sums]


def best_range(cosines: Sequence[float], first_start: int = 0) -> int:
    """The start of the range whose input and output are most alike (highest cosine), from `first_start`."""
    starts = range(first_start, len(cosines))
    if not starts:
        raise BaselineError(f"no range starts at or after block {first_start}")
    return max(starts, key=lambda i: cosines[i])
