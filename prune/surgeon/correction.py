"""The LLM Surgeon's first-order correction: LoRA trained between shots, absorbed under the pruning mask.

After a shot's pruning and update, low-rank adapters (the engine's peft LoRA layers) are put on
the decoder linears, trained for a few passes over a few calibration windows with the
next-token loss (Adam, only the adapters train), and absorbed into the weights: ``W += scale·B A``
on the weights that are not zero. Pruned weights therefore stay exactly zero. Rows and columns
that are zero (removed structures) are kept out of the adapters during training too: B's rows of
zero output rows and A's columns of zero input columns are held at zero after every step, so for
``rows_columns`` the absorbed delta is exactly what was trained. Single removed weights cannot be
kept out of a low-rank product; their part of the delta is dropped at the absorption.

The loop is a plain in-process Adam loop rather than the project's trainer: it runs between
two shots on the model the shot has in memory, for a handful of steps, with no data loader,
checkpoint or launcher to set up, and it must hand back the same in-memory model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from flexigpt.prune.surgeon.curvature import LinearRef, decoder_linears
from flexigpt.shared.engine.adapters import SharedLoraLinear, lora_factors, make_lora
from flexigpt.shared.engine.layout import get_layout


class CorrectionError(ValueError):
    """The correction diverged (a non-finite loss or weight); the message names the key to change."""


@dataclass(frozen=True)
class LoraOptions:
    """The correction's settings; every field is a key of ``surgeon.lora`` (see the recipe)."""

    rank: int = 8
    alpha: float | None = None
    lr: float = 1e-4
    samples: int = 3
    epochs: int = 1
    batch: int = 1
    final_pass: bool = True
    final_epochs: int = 5
    targets: tuple[str, ...] | None = None
    seed: int = 0


def _parent(model: PreTrainedModel, ref: LinearRef) -> tuple[nn.Module, str]:
    layout = get_layout(model.config)
    path = dict(layout.linears)[ref.target]
    layer = model.get_submodule(layout.layers_path)[ref.block]
    head, _, name = path.rpartition(".")
    return (layer.get_submodule(head) if head else layer), name


class _Adapters:
    """LoRA layers in place of the target linears; `restore` puts the plain linears back."""

    def __init__(self, model: PreTrainedModel, o: LoraOptions, seed: int) -> None:
        self.refs = [r for r in decoder_linears(model) if o.targets is None or r.target in o.targets]
        self.layers: list[SharedLoraLinear] = []
        self.dead: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            self._wrap(model, o, seed)
        except BaseException:
            self.restore(model)
            raise
        self.mask()

    def _wrap(self, model: PreTrainedModel, o: LoraOptions, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for r in self.refs:
            layer = make_lora(r.module, o.rank, o.alpha)
            a, b, _ = lora_factors(layer)
            with torch.no_grad():
                # the released code's initialisation: A ~ N(0, 1), B = 0 (the model is unchanged at first)
                a.data = torch.randn(a.shape, generator=gen).to(a.device)
                b.data = torch.zeros(b.shape, device=b.device)  # trained in fp32 whatever the model's dtype
            w = r.module.weight
            self.dead.append((w.eq(0).all(dim=1), w.eq(0).all(dim=0)))
            parent, name = _parent(model, r)
            setattr(parent, name, layer)
            self.layers.append(layer)

    def params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in lora_factors(layer)[:2]]

    @torch.no_grad()
    def mask(self) -> None:
        """Keep removed rows and columns out of the adapters."""
        for layer, (rows, cols) in zip(self.layers, self.dead, strict=True):
            a, b, _ = lora_factors(layer)
            b[rows] = 0.0
            a[:, cols] = 0.0

    @torch.no_grad()
    def absorb(self) -> int:
        """Add each adapter's delta to its weight except where the weight is zero; returns weights moved."""
        moved = 0
        for r, layer in zip(self.refs, self.layers, strict=True):
            a, b, scale = lora_factors(layer)
            w = r.module.weight
            delta = (b.float() @ a.float()) * scale
            delta = delta.masked_fill_(w.eq(0), 0.0)
            new = w + delta.to(w.dtype)
            if not torch.isfinite(new).all():
                raise CorrectionError(
                    f"surgeon.lora: decoder linear {r.key} would not be finite after the correction; lower "
                    "surgeon.lora.lr"
                )
            w.copy_(new)
            moved += int(delta.ne(0).sum())
        return moved

    def restore(self, model: PreTrainedModel) -> None:
        for r in self.refs:
            parent, name = _parent(model, r)
            setattr(parent, name, r.module)


def windows_for(n_windows: int, o: LoraOptions, shot: int | None) -> list[int]:
    """The calibration windows a correction trains on: a seeded subset per shot, or all for the final pass."""
    if shot is None:
        return list(range(n_windows))
    gen = torch.Generator().manual_seed(o.seed * 100_003 + shot)
    return torch.randperm(n_windows, generator=gen)[: min(o.samples, n_windows)].tolist()


def correct(
    model: PreTrainedModel,
    samples: Sequence[torch.Tensor],
    o: LoraOptions,
    *,
    shot: int | None,
    log: Callable[..., None] = print,
) -> dict[str, float | int]:
    """Train LoRA on calibration windows and absorb it into `model`'s decoder linears in place.

    Args:
        model: the pruned model (its weights change in place; zero weights stay zero).
        samples: the calibration windows, (1, T) token tensors.
        o: the correction's settings.
        shot: the shot just finished (``o.samples`` windows for ``o.epochs``), or None for the final
            pass (every window for ``o.final_epochs``).
        log: progress sink.

    Returns:
        Steps, windows, the mean loss of the first and last epoch, weights moved, seconds.

    Raises:
        CorrectionError: a loss or a weight is not finite.
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    idx = windows_for(len(samples), o, shot)
    epochs = o.epochs if shot is not None else o.final_epochs
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    adapters = None
    try:
        adapters = _Adapters(model, o, o.seed * 100_003 + (shot if shot is not None else 0))
        params = adapters.params()
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=o.lr)
        losses: list[float] = []
        steps = 0
        for epoch in range(epochs):
            for group in opt.param_groups:
                group["lr"] = o.lr * (1.0 - epoch / epochs)  # linear decay over the epochs, as released
            total = 0.0
            for first in range(0, len(idx), o.batch):
                chunk = idx[first : first + o.batch]
                opt.zero_grad(set_to_none=True)
                for i in chunk:  # windows may differ in length: one at a time, gradients summed
                    x = samples[i].to(device)
                    loss = model(input_ids=x, labels=x, use_cache=False).loss.float()
                    if not math.isfinite(loss.item()):
                        raise CorrectionError(
                            f"surgeon.lora: the correction's loss is not finite ({loss.item()}); lower surgeon.lora.lr"
                        )
                    (loss / len(chunk)).backward()
                    total += loss.item()
                opt.step()
                adapters.mask()
                steps += 1
            losses.append(total / len(idx))
        moved = adapters.absorb()
    finally:
        if adapters is not None:
            adapters.restore(model)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    seconds = time.perf_counter() - start
    what = f"after shot {shot}" if shot is not None else "final pass"
    log(
        f"  LoRA correction ({what}): {steps} steps on {len(idx)} windows, loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f}, {seconds:.1f} s"
    )
    return {
        "steps": steps,
        "windows": len(idx),
        "first_epoch_loss": losses[0],
        "last_epoch_loss": losses[-1],
        "weights_moved": moved,
        "seconds": seconds,
    }
