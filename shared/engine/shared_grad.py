"""One weight gradient per shared linear, accumulated inside the GEMM.

A block run by k slots is k uses of the same weight. Plain autograd computes each use's weight
gradient ``g^T x`` into a new weight-sized tensor and sums them before the Parameter's
``AccumulateGrad`` node: k - 1 weight-sized adds per shared tensor per backward. ``SharedLinear``
instead has the uses of one forward pass share an accumulator: the first use to run backward
computes ``g^T x`` into it, every later one adds its product with ``addmm_`` (beta = 1, the add is
part of the GEMM), and the use that runs backward last hands the sum to autograd as the weight's
only gradient. ``AccumulateGrad`` (and every hook on it: DeepSpeed ZeRO-1/2 reduce there, and
``register_post_accumulate_grad_hook``) still runs once per backward with the full sum, exactly
as with plain autograd, and adds into an existing ``.grad`` (gradient accumulation) as before.

The use that runs backward last is the one that ran forward first: in a decoder stack every later
slot's input depends on an earlier slot's output. That order is checked; a backward in another
order raises instead of dropping a contribution. So does a backward from an intermediate output
(the hidden state of a middle slot) while the shared weights train, since it starts below the
pass's last use: turn the path off for that (``set_grad_accumulation(model, False)``).

Plain ``F.linear`` is used whenever the path does not apply: the weight is frozen (the default
trainable set, ``adapters+norms``, pays nothing), gradients are off, DeepSpeed ZeRO-3 partitions
the weight (its module hooks gather it), the stack recomputes activations (gradient
checkpointing replays forward inside backward), no pass is open (a slot called outside its
model's forward), or the path is off.

The path is off by default: on the CPU the GEMM with beta = 1 cost about what the add it replaces
cost (docs/engine.md, "Cost of sharing"), and its GPU figure is not measured yet.
``set_grad_accumulation(model, True)`` or the recipe key ``train.shared_grad_in_gemm: true``
turns it on.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class _Accumulator:
    """The weight gradient of one shared Parameter over the uses of one forward pass."""

    __slots__ = ("buf", "next_use", "uses")

    def __init__(self) -> None:
        self.uses = 0  # uses recorded by forward
        self.next_use = 0  # the use whose backward must run next (0: a new round starts)
        self.buf: torch.Tensor | None = None


class GradPass:
    """The accumulators of one model's current forward pass (hooks on the decoder open and close it)."""

    def __init__(self) -> None:
        self.enabled = False  # opt-in: set_grad_accumulation(model, True) or train.shared_grad_in_gemm
        self.current: dict[int, _Accumulator] | None = None

    def open(self, module: nn.Module, *_: Any) -> None:
        """Forward pre-hook of the decoder: a new pass, unless the decoder checkpoints its layers."""
        checkpointing = module.training and getattr(module, "gradient_checkpointing", False)
        self.current = {} if self.enabled and not checkpointing else None

    def close(self, *_: Any) -> None:
        """Forward hook of the decoder: uses after it fall back to plain ``F.linear``."""
        self.current = None

    def __getstate__(self) -> dict[str, Any]:  # a copy of the model starts without an open pass
        return {"enabled": self.enabled, "current": None}


class _SharedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, acc: _Accumulator
    ) -> torch.Tensor:
        acc.uses += 1
        ctx.use, ctx.acc, ctx.has_bias = acc.uses, acc, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        acc: _Accumulator = ctx.acc
        expected = acc.next_use or acc.uses
        if ctx.use != expected:
            raise RuntimeError(
                f"shared linear: use {ctx.use} of a shared weight ran backward where use {expected} was due "
                "(a backward from a middle slot's output, or slots that do not form a stack); "
                "flexigpt.shared.engine.shared_grad.set_grad_accumulation(model, False) sums in autograd instead"
            )
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        if acc.buf is None:
            acc.buf = g2.t().mm(x2)
        else:
            acc.buf.addmm_(g2.t(), x2)
        grad_w = None
        acc.next_use = ctx.use - 1
        if ctx.use == 1:  # the last backward of the pass: hand over the sum, drop our reference
            grad_w, acc.buf, acc.next_use = acc.buf, None, 0
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class SharedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight other slots run too; see the module docstring.

    Same parameters, state-dict names and outputs as ``nn.Linear``; only the weight gradient's
    summation over slots differs.
    """

    grad_pass: GradPass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        acc_pass = self.grad_pass.current
        if acc_pass is None or not w.requires_grad or not torch.is_grad_enabled() or hasattr(w, "ds_id"):
            return F.linear(x, w, self.bias)
        acc = acc_pass.get(id(w))
        if acc is None:
            acc = acc_pass[id(w)] = _Accumulator()
        return _SharedLinearFn.apply(x, w, self.bias, acc)


def make_shared_linear(linear: nn.Linear, grad_pass: GradPass) -> SharedLinear:
    """A ``SharedLinear`` holding `linear`'s very Parameters (nothing is copied)."""
    out = SharedLinear.__new__(SharedLinear)
    nn.Module.__init__(out)
    out.in_features, out.out_features = linear.in_features, linear.out_features
    out.weight = linear.weight
    out.bias = linear.bias
    out.grad_pass = grad_pass
    return out


def set_grad_accumulation(model: nn.Module, enabled: bool) -> None:
    """Turn the in-GEMM accumulation of shared weight gradients on or off (off by default)."""
    for m in model.modules():
        if isinstance(m, SharedLinear):
            m.grad_pass.enabled = enabled


def install_shared_linears(model: nn.Module, layers_path: str) -> None:
    """Make every linear whose weight several slots run a ``SharedLinear`` of one pass per decoder forward.

    Args:
        model: a shared-block CausalLM.
        layers_path: the dotted path of its decoder layers (``ArchLayout.layers_path``).
    """
    layers = model.get_submodule(layers_path)
    found = [
        (layer, name, m)
        for layer in layers
        for name, m in layer.named_modules()
        if type(m) is nn.Linear  # the block's own linears; adapters' factors are slot-owned
    ]
    runs = Counter(id(m.weight) for _, _, m in found)
    shared = [(layer, name, m) for layer, name, m in found if runs[id(m.weight)] > 1]
    if not shared:
        return
    grad_pass = GradPass()
    for layer, name, m in shared:
        layer.set_submodule(name, make_shared_linear(m, grad_pass))
    decoder = model.get_submodule(layers_path.rpartition(".")[0])
    decoder.register_forward_pre_hook(grad_pass.open)
    decoder.register_forward_hook(grad_pass.close, always_call=True)
