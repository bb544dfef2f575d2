"""SLEB-style iterative removal and reverse-order removal (Reassessing Layer Pruning, arXiv 2411.15558).

- ``sleb``: remove one block at a time, the one whose removal raises the calibration perplexity
  least, re-scoring the remaining blocks after every removal (SLEB's greedy loop, with the
  perplexity of ``sample_perplexity``). Training-free; costs about ``n x L`` calibration passes.
- ``reverse``: remove the ``n`` blocks just below the last one (the last block stays: it shapes the
  features the head reads), then recover by training only the last ``tune_layers`` blocks and the
  LM head, as the paper does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from flexigpt.prune.depth.baselines.common import (
    BaselineError,
    BaselineResult,
    decoder_layers,
    hidden_from_args,
    keep_blocks,
)
from flexigpt.shared.evaluate.perplexity import sample_perplexity


def _skip(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook that makes a block pass its input through (the block is skipped)."""
    hidden = hidden_from_args(args, kwargs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _check_n(model: PreTrainedModel, n: int) -> int:
    num = len(decoder_layers(model))
    if not 1 <= n <= num - 1:
        raise BaselineError(f"blocks to remove = {n}: allowed 1..{num - 1} (the model has {num} blocks)")
    return num


@torch.no_grad()
def sleb(model: PreTrainedModel, samples: Sequence[torch.Tensor], n: int) -> BaselineResult:
    """Remove `n` blocks greedily by the smallest calibration perplexity after each removal.

    Args:
        model: the plain source model (not modified: removal is simulated by skip hooks).
        samples: calibration token tensors.
        n: blocks to remove.

    Returns:
        The plain model without the chosen blocks; notes hold the perplexity of every candidate at
        every step.
    """
    num = _check_n(model, n)
    stack = decoder_layers(model)
    samples = list(samples)
    removed: list[int] = []
    steps: list[dict[str, Any]] = []
    handles = []
    try:
        for _ in range(n):
            scores: dict[int, float] = {}
            for b in range(num):
                if b in removed:
                    continue
                h = stack[b].register_forward_hook(_skip, with_kwargs=True)
                try:
                    scores[b] = sample_perplexity(model, samples).ppl
                finally:
                    h.remove()
            pick = min(scores, key=lambda b: scores[b])
            removed.append(pick)
            steps.append(
                {"removed": pick, "ppl": scores[pick], "candidates": {str(k): v for k, v in scores.items()}}
            )
            handles.append(stack[pick].register_forward_hook(_skip, with_kwargs=True))
    finally:
        for h in handles:
            h.remove()
    kept: list[int | None] = [b for b in range(num) if b not in removed]
    return BaselineResult(
        keep_blocks(model, removed), sorted(removed), kept, notes={"order": removed, "steps": steps}
    )


def reverse(model: PreTrainedModel, n: int, *, tune_layers: int = 3) -> BaselineResult:
    """Remove the `n` blocks below the last one; recovery trains the last `tune_layers` and the head.

    Raises:
        BaselineError: `n` or `tune_layers` does not fit the model.
    """
    num = _check_n(model, n)
    left = num - n
    if not 1 <= tune_layers <= left:
        raise BaselineError(
            f"tune_layers={tune_layers}: allowed 1..{left} (the pruned model has {left} layers)"
        )
    removed = list(range(num - 1 - n, num - 1))
    kept: list[int | None] = [b for b in range(num) if b not in removed]
    return BaselineResult(
        keep_blocks(model, removed),
        removed,
        kept,
        train={
            "trainable": "all",
            "trainable_layers": list(range(left - tune_layers, left)),
            "trainable_head": True,
        },
        notes={"tune_layers": tune_layers},
    )
