"""Depth-pruning baselines beside FlexiGPT and ShortGPT, registered by name.

Each method takes the plain source model, calibration samples and the number of blocks to remove,
and returns a plain model with that many fewer layers (``BaselineResult``):

- ``replaceme`` / ``replaceme_cosine``: ReplaceMe, a range folded into one linear map (training-free);
- ``streamline``: LLM-Streamline, a range replaced by one block trained on hidden states;
- ``sleb``: SLEB-style greedy removal by calibration perplexity (training-free);
- ``reverse``: reverse-order removal, recovered by tuning the last blocks and the head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from flexigpt.prune.depth.baselines.common import BaselineError, BaselineResult
from flexigpt.prune.depth.baselines.replaceme import replaceme
from flexigpt.prune.depth.baselines.sleb import reverse, sleb
from flexigpt.prune.depth.baselines.streamline import streamline

Method = Callable[[PreTrainedModel, Sequence[torch.Tensor], int, dict[str, Any]], BaselineResult]


@dataclass(frozen=True)
class MethodInfo:
    """A registered baseline: how to run it and what it is."""

    fn: Method
    description: str
    training_free: bool
    """True: the method itself trains nothing (recovery, if any, is the comparison's)."""


BASELINES: dict[str, MethodInfo] = {
    "replaceme": MethodInfo(
        lambda m, s, n, o: replaceme(m, s, n, objective="lstsq", max_tokens=o.get("max_tokens")),
        "ReplaceMe: most alike range removed, least-squares linear map folded into the block before",
        True,
    ),
    "replaceme_cosine": MethodInfo(
        lambda m, s, n, o: replaceme(
            m,
            s,
            n,
            objective="cosine",
            steps=o.get("map_steps", 200),
            lr=o.get("map_lr", 1e-4),
            max_tokens=o.get("max_tokens"),
        ),
        "ReplaceMe with the cosine objective (Adam from the least-squares map)",
        True,
    ),
    "streamline": MethodInfo(
        lambda m, s, n, o: streamline(
            m, s, n, steps=o.get("layer_steps", 100), lr=o.get("layer_lr", 1e-4), init=o.get("init", "first")
        ),
        "LLM-Streamline: most alike range of n + 1 blocks replaced by one block trained on hidden states (MSE)",
        False,
    ),
    "sleb": MethodInfo(
        lambda m, s, n, o: sleb(m, s, n),
        "SLEB-style: one block at a time by the smallest calibration perplexity, re-scored after each",
        True,
    ),
    "reverse": MethodInfo(
        lambda m, s, n, o: reverse(m, n, tune_layers=o.get("tune_layers", 3)),
        "reverse order: the blocks below the last removed; recovery tunes the last blocks and the head",
        True,
    ),
}


def get_baseline(name: str) -> MethodInfo:
    """The baseline registered as `name`; an unknown name lists the valid ones."""
    try:
        return BASELINES[name]
    except KeyError:
        raise BaselineError(f"method {name!r} is unknown; allowed: {sorted(BASELINES)}") from None


__all__ = ["BASELINES", "BaselineError", "BaselineResult", "MethodInfo", "get_baseline"]
