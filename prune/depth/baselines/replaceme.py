"""ReplaceMe (arXiv 2505.02819): remove a contiguous range and fold one linear map into the block before it.

Training-free. For a range of ``n`` blocks starting at ``i`` (``i >= 1``), with, on every
calibration token,

- ``M``: the MLP output of block ``i - 1`` (what its down-projection adds to the residual),
- ``Y``: the residual state after block ``i - 1`` (the range's input),
- ``L``: the residual state after block ``i + n - 1`` (the range's output),

one matrix ``T`` (hidden x hidden) is fitted so that ``Y - M + M T`` (block ``i - 1`` with its MLP
output mapped by ``T``) stands in for ``L``:

- ``lstsq``: minimise ``||M T - (L - Y + M)||^2`` over the tokens, in closed form
  ``T = (M^T M + damp I)^-1 M^T (L - Y + M)``;
- ``cosine``: minimise the mean cosine distance between ``Y - M + M T`` and ``L`` (Adam, started
  from the least-squares ``T``).

The map is folded into block ``i - 1``'s down-projection (``W' = T^T W``, ``b' = T^T b``), so the
result is a plain model with ``n`` fewer layers and not one parameter more.
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
    best_range,
    decoder_layers,
    hidden_from_args,
    keep_blocks,
    layer_output,
    model_device,
    range_cosines,
)
from flexigpt.shared.engine.layout import get_layout

OBJECTIVES: tuple[str, ...] = ("lstsq", "cosine")


class RangeActivations:
    """The calibration activations of one range: ``M``, ``Y``, ``L`` (tokens x hidden, fp32, CPU)."""

    def __init__(self, m: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
        self.m, self.y, self.out = m, y, out

    @property
    def target(self) -> torch.Tensor:
        """What ``M T`` must become: ``L - Y + M`` (block ``i - 1``'s new MLP output)."""
        return self.out - self.y + self.m


@torch.no_grad()
def range_activations(
    model: PreTrainedModel, samples: Sequence[torch.Tensor], start: int, n: int, max_tokens: int | None = None
) -> RangeActivations:
    """Read ``M``, ``Y`` and ``L`` of the range ``start .. start + n - 1`` on the calibration samples.

    Args:
        model: the plain source model.
        samples: (1, T) or (B, T) token tensors.
        start: first block of the range (>= 1: the block before it carries the map).
        n: blocks in the range.
        max_tokens: keep at most this many tokens (the first ones); None: all.

    Raises:
        BaselineError: the range does not fit the model.
    """
    stack = decoder_layers(model)
    if start < 1 or start + n > len(stack) or n < 1:
        raise BaselineError(
            f"range {start}..{start + n - 1}: needs 1 <= start and start + n <= {len(stack)} (a block before it)"
        )
    layout = get_layout(model.config)
    hidden = model.config.hidden_size
    got: dict[str, list[torch.Tensor]] = {"m": [], "y": [], "out": []}

    def grab(key: str, t: torch.Tensor) -> None:
        got[key].append(t.detach().float().reshape(-1, hidden).cpu())

    handles = [
        stack[start - 1].get_submodule(layout.mlp_out).register_forward_hook(lambda _m, _a, o: grab("m", o)),
        stack[start].register_forward_pre_hook(
            lambda _m, a, k: grab("y", hidden_from_args(a, k)), with_kwargs=True
        ),
        stack[start + n - 1].register_forward_hook(
            lambda _m, _a, _k, o: grab("out", layer_output(o)), with_kwargs=True
        ),
    ]
    try:
        for ids in samples:
            model(input_ids=ids.to(model_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    m, y, out = (torch.cat(got[k])[:max_tokens] for k in ("m", "y", "out"))
    return RangeActivations(m, y, out)


def lstsq_map(acts: RangeActivations, damp: float = 1e-6) -> torch.Tensor:
    """The least-squares ``T`` (hidden x hidden) of ``M T ~ L - Y + M``, in float64.

    ``damp`` x mean(diag(M^T M)) is added to the diagonal, so directions the MLP never writes to
    (a rank-deficient ``M``) map to zero instead of to noise.
    """
    m = acts.m.double()
    gram = m.T @ m
    gram += damp * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, m.T @ acts.target.double()).float()


def cosine_loss(acts: RangeActivations, t: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between ``Y - M + M T`` and ``L`` over the tokens."""
    pred = acts.y - acts.m + acts.m @ t
    return (1 - torch.nn.functional.cosine_similarity(pred, acts.out, dim=-1)).mean()


def cosine_map(
    acts: RangeActivations, steps: int = 200, lr: float = 1e-4
) -> tuple[torch.Tensor, list[float]]:
    """The cosine-objective ``T``: Adam from the least-squares map. Returns T and the loss before / after."""
    t = nn.Parameter(lstsq_map(acts).clone())
    opt = torch.optim.Adam([t], lr=lr)
    with torch.no_grad():
        first = float(cosine_loss(acts, t))
    for _ in range(steps):
        opt.zero_grad()
        loss = cosine_loss(acts, t)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(cosine_loss(acts, t))
    return t.detach(), [first, last]


@torch.no_grad()
def fold_map(model: PreTrainedModel, block: int, t: torch.Tensor) -> None:
    """Fold ``T`` into block `block`'s down-projection in place: its output ``x W^T + b`` becomes
    ``(x W^T + b) T``."""
    down = decoder_layers(model)[block].get_submodule(get_layout(model.config).mlp_out)
    t = t.to(down.weight.device, torch.float32)
    down.weight.copy_((t.T @ down.weight.float()).to(down.weight.dtype))
    if down.bias is not None:
        down.bias.copy_((down.bias.float() @ t).to(down.bias.dtype))


def replaceme(
    model: PreTrainedModel,
    samples: Sequence[torch.Tensor],
    n: int,
    *,
    objective: str = "lstsq",
    steps: int = 200,
    lr: float = 1e-4,
    max_tokens: int | None = 65536,
) -> BaselineResult:
    """ReplaceMe: the range of `n` blocks with the most alike input and output, replaced by a folded map.

    Args:
        model: the plain source model (not modified).
        samples: calibration token tensors.
        n: blocks to remove.
        objective: ``lstsq`` or ``cosine`` (see the module docstring).
        steps: Adam steps of the cosine objective.
        lr: its learning rate.
        max_tokens: calibration tokens the map is fitted on at most.

    Returns:
        The plain model with `n` fewer layers.

    Raises:
        BaselineError: an unknown objective, or `n` leaves no block before the range.
    """
    if objective not in OBJECTIVES:
        raise BaselineError(f"objective={objective!r} is unknown; allowed: {list(OBJECTIVES)}")
    num = len(decoder_layers(model))
    if not 1 <= n <= num - 1:
        raise BaselineError(
            f"blocks to remove = {n}: allowed 1..{num - 1} (a block must stay before the range)"
        )
    cos = range_cosines(model, samples, n)
    start = best_range(cos, first_start=1)
    acts = range_activations(model, samples, start, n, max_tokens)
    notes: dict[str, Any] = {"range_cosine": cos, "start": start, "objective": objective}
    if objective == "lstsq":
        t = lstsq_map(acts)
    else:
        t, losses = cosine_map(acts, steps, lr)
        notes["cosine_loss"] = losses
    notes["cosine_loss_folded"] = float(cosine_loss(acts, t))
    notes["cosine_loss_dropped"] = float(cosine_loss(acts, torch.eye(t.shape[0])))
    removed = list(range(start, start + n))
    out = keep_blocks(model, removed)
    fold_map(out, start - 1, t)
    layers: list[int | None] = [b for b in range(num) if b not in removed]
    return BaselineResult(out, removed, layers, notes=notes)


def replaceme_map(
    model: PreTrainedModel, samples: Sequence[torch.Tensor], start: int, n: int
) -> torch.Tensor:
    """The least-squares map of a given range (for inspection and tests)."""
    return lstsq_map(range_activations(model, samples, start, n))
