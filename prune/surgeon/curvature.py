"""K-FAC factors of the decoder linears: A = E[a aᵀ] over layer inputs, G = E[g gᵀ] over output gradients.

Every nn.Linear inside the decoder blocks is hooked (embeddings, norms and the LM head never are).
A forward hook accumulates the input activations (a constant-1 feature appended where the layer
has a bias); a hook on the layer's output tensor accumulates the gradient of the summed
next-token loss with respect to that output. Both are averaged over all calibration tokens.
Labels are the true next tokens (empirical Fisher) or drawn from the model's own prediction
(``fisher='sampled'``).

Memory: the factors of a LLaMA-2-7B are about 70 GB in fp32, so they are collected for a group of
blocks at a time (``blocks`` selects which), each group with its own forward/backward passes;
the caller computes that group's costs and stores or drops its factors before the next group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from flexigpt.shared.engine.layout import get_layout


@dataclass(frozen=True)
class LinearRef:
    """One prunable linear: its block, its short name (q, k, ..., down) and the module."""

    block: int
    target: str
    module: nn.Linear

    @property
    def key(self) -> str:
        """``<block>.<target>``: the name used in costs, state files and reports."""
        return f"{self.block}.{self.target}"


def decoder_linears(model: PreTrainedModel, blocks: Iterable[int] | None = None) -> list[LinearRef]:
    """The prunable linears of the decoder blocks (all blocks when `blocks` is None), in model order."""
    layout = get_layout(model.config)
    layers = model.get_submodule(layout.layers_path)
    wanted = range(len(layers)) if blocks is None else blocks
    out = []
    for b in wanted:
        for target, path in layout.linears:
            out.append(LinearRef(b, target, layers[b].get_submodule(path)))
    return out


class _Accumulator:
    """Running sums of x xᵀ for one layer's inputs and g gᵀ for its output gradients."""

    def __init__(self, ref: LinearRef, need_a: bool, need_g: bool, device: torch.device) -> None:
        m = ref.module
        # sizes from the weight itself: a shrunk block's modules keep their original attributes
        n_out, n_in = m.weight.shape
        self.bias = m.bias is not None
        n_in += int(self.bias)
        self.a = torch.zeros(n_in, n_in, device=device) if need_a else None
        self.g = torch.zeros(n_out, n_out, device=device) if need_g else None

    def add_input(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.bias:
            x = torch.cat([x, torch.ones(x.shape[0], 1, device=x.device)], dim=1)
        self.a.addmm_(x.T.to(self.a.device), x.to(self.a.device))

    def add_grad(self, g: torch.Tensor) -> None:
        g = g.detach().reshape(-1, g.shape[-1]).float().to(self.g.device)
        self.g.addmm_(g.T, g)


def collect_factors(
    model: PreTrainedModel,
    refs: Sequence[LinearRef],
    samples: Sequence[torch.Tensor],
    *,
    need_a: bool = True,
    need_g: bool = True,
    fisher: str = "empirical",
    seed: int = 0,
    store_device: torch.device | str = "cpu",
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """A and G of every linear in `refs`, averaged over the tokens of `samples`.

    Args:
        model: the model (its parameters need no gradient; only activation gradients are taken).
        refs: the linears to hook.
        samples: (1, T) token tensors.
        need_a: collect A (False: only G).
        need_g: collect G (needs a backward pass per sample; False: forward only).
        fisher: ``empirical`` (labels = the true next tokens) or ``sampled`` (labels drawn from
            the model's predictive distribution).
        seed: seed of the sampled labels.
        store_device: where the running sums live (CPU keeps GPU memory for the passes).

    Returns:
        ``ref.key`` -> (A or None, G or None), float32.
    """
    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher={fisher!r}: allowed 'empirical' or 'sampled'")
    device = next(model.parameters()).device
    accs = {r.key: _Accumulator(r, need_a, need_g, torch.device(store_device)) for r in refs}
    handles = []
    for r in refs:
        acc = accs[r.key]

        def fwd(_m: nn.Module, args: tuple, out: torch.Tensor, acc: _Accumulator = acc) -> None:
            if acc.a is not None:
                acc.add_input(args[0])
            if acc.g is not None and out.requires_grad:
                out.register_hook(acc.add_grad)

        handles.append(r.module.register_forward_hook(fwd))
    if need_g:
        # the parameters stay frozen: gradients flow from the embedding output instead
        emb = model.get_input_embeddings()
        handles.append(emb.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    gen = torch.Generator(device=device).manual_seed(seed)
    n_tokens = 0
    was_training = model.training
    model.eval()
    try:
        for ids in samples:
            ids = ids.to(device)
            n_tokens += ids.numel()
            with torch.set_grad_enabled(need_g):
                logits = model(input_ids=ids).logits[:, :-1].float()
                if not need_g:
                    continue
                if fisher == "empirical":
                    labels = ids[:, 1:]
                else:
                    probs = torch.softmax(logits.detach(), dim=-1).reshape(-1, logits.shape[-1])
                    labels = torch.multinomial(probs, 1, generator=gen).view(ids.shape[0], -1)
                loss = nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
                )
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_tokens == 0:
        raise ValueError("samples: no calibration tokens")
    return {
        k: (
            acc.a / n_tokens if acc.a is not None else None,
            acc.g / n_tokens if acc.g is not None else None,
        )
        for k, acc in accs.items()
    }
