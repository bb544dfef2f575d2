"""Per-slot modules: low-rank adapters on shared linears, and the output feature norm.

Adapters are peft's own LoRA ``Linear`` layers: peft wraps the original linear as ``base_layer``
and adds ``lora_A`` / ``lora_B``, which fits weight sharing as is (the wrapped ``nn.Linear`` holds
the *shared* Parameter; peft never copies it). The one thing peft would do wrong here is
``merge()``: it writes ``W += B @ A`` into the base weight, which is shared by other slots. The
subclass below refuses that; ``engine.materialize`` merges into private copies instead.

The output feature norm (FlexiGPT eq. 6) has no peft counterpart: it is a bias-free LayerNorm on
a sub-layer's *output*, so it is our own small wrapper around the sub-layer's last linear.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

ADAPTER_NAME = "default"


class SharedWeightMergeError(RuntimeError):
    """Raised when something tries to merge an adapter into a weight other slots share."""


class SharedLoraLinear(PeftLoraLinear):
    """peft LoRA linear whose base weight may be shared with other slots: merging is refused."""

    def merge(self, *args: object, **kwargs: object) -> None:  # noqa: D102
        raise SharedWeightMergeError(
            "refusing to merge a LoRA adapter into a shared weight (other slots run the same "
            "Parameter); use flexigpt.shared.engine.apply.materialize(model) to get private merged copies"
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """peft's LoRA forward, with the adapter's up-projection fused into one GEMM.

        peft computes ``result + lora_B(lora_A(x)) * scaling``: three passes over an output-sized
        tensor after the up-projection. Here the up-projection accumulates into the base output in
        the GEMM itself (``addmm`` with beta = 1), so the adapter costs two thin GEMMs and nothing
        else; this is most of the gap between a shared model and its merged export. Anything
        unusual (several adapters, variants, mixed batches, disabled or merged adapters, ZeRO-3
        partitioned weights that only module hooks gather) takes peft's own path.
        """
        b = self.lora_B[ADAPTER_NAME].weight if ADAPTER_NAME in self.lora_B else None
        if (
            args
            or kwargs
            or b is None
            or self.disable_adapters
            or self.merged
            or self.active_adapters != [ADAPTER_NAME]
            or self.lora_variant
            or hasattr(b, "ds_id")
        ):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        h = self.lora_A[ADAPTER_NAME](self.lora_dropout[ADAPTER_NAME](x.to(b.dtype)))
        scale = self.scaling[ADAPTER_NAME]
        if scale != 1.0:
            h = h * scale  # rank-sized, cheap
        out = torch.addmm(
            result.reshape(-1, result.shape[-1]),
            h.reshape(-1, h.shape[-1]).to(result.dtype),
            b.t().to(result.dtype),
        )
        return out.view(result.shape)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, the update this adapter adds to the base weight."""
        return self.get_delta_weight(ADAPTER_NAME)


def make_lora(base: nn.Linear, rank: int, alpha: float | None) -> SharedLoraLinear:
    """Wrap `base` (whose weight may be shared) with a rank-`rank` LoRA adapter.

    The adapter starts as standard LoRA (A Kaiming-uniform, B zero); callers re-initialise it.
    """
    lora_alpha = rank if alpha is None else alpha
    cfg = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=0.0, init_lora_weights=True)
    layer = SharedLoraLinear(base, ADAPTER_NAME, config=cfg, r=rank, lora_alpha=lora_alpha)
    return layer.to(device=base.weight.device, dtype=base.weight.dtype)


def lora_factors(layer: SharedLoraLinear) -> tuple[nn.Parameter, nn.Parameter, float]:
    """(A, B, scale) of a LoRA layer: delta W = scale * B @ A, A is r x in, B is out x r."""
    return layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight, layer.scaling[ADAPTER_NAME]


@torch.no_grad()
def init_lora(layer: SharedLoraLinear, mode: str, target_weight: torch.Tensor | None = None) -> None:
    """Initialise a LoRA layer.

    Args:
        layer: the adapter to initialise.
        mode: ``zero`` (A = B = 0), ``lora`` (peft's default: Kaiming A, zero B), ``svd``
            (FlexiGPT eq. 7-8: the top-r SVD of ``target_weight - base weight``; B = U_r S_r / scale,
            A = V_r^T, so that base + scale * B @ A = base + rank-r(target - base) exactly) or
            ``svd_randomized`` (the same factors by ``torch.svd_lowrank``, r + 10 columns, 2 power
            iterations: an approximation of the top-r SVD, seconds instead of a minute for a
            4096 x 11008 matrix on a CPU; it draws from torch's RNG).
        target_weight: the weight the adapted layer should approximate (``svd`` only).
    """
    a, b, scale = lora_factors(layer)
    if mode == "zero":
        a.zero_()
        b.zero_()
    elif mode == "lora":
        layer.reset_lora_parameters(ADAPTER_NAME, True)
    elif mode in ("svd", "svd_randomized"):
        if target_weight is None:
            raise ValueError(f"init {mode!r} needs the target weight")
        base = layer.get_base_layer().weight
        diff = target_weight.detach().to(torch.float32) - base.detach().to(torch.float32)
        r = a.shape[0]
        if mode == "svd":
            u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        else:
            u, s, v = torch.svd_lowrank(diff, q=min(r + 10, *diff.shape), niter=2)
            vh = v.T
        b.copy_((u[:, :r] * s[:r]) / scale)
        a.copy_(vh[:r])
    else:
        raise ValueError(f"adapter init {mode!r} is unknown; allowed: zero, lora, svd, svd_randomized")


class OutputNorm(nn.Module):
    """A sub-layer's last linear followed by a bias-free LayerNorm with learnable gamma.

    FlexiGPT eq. 6: h -> (h - mean(h)) / std(h) * gamma, per token over the hidden dimension. Placed
    on o_proj and down_proj outputs, which in Llama-family decoders are exactly the attention and
    MLP outputs before the residual add. With gamma = 0 the slot adds nothing to the residual.

    ``bypass`` (a plain attribute, never saved) skips the norm: the wrapper then computes exactly
    the sub-layer without it, which is how gamma calibration and the measured gamma see the slot
    without its norm.
    """

    def __init__(self, base_layer: nn.Module, like: torch.Tensor, gamma: float, eps: float) -> None:
        """Wrap `base_layer`; `like` (the wrapped weight) gives hidden size, device and dtype."""
        super().__init__()
        self.base_layer = base_layer
        self.out_norm = nn.LayerNorm(like.shape[0], eps=eps, bias=False, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            self.out_norm.weight.fill_(gamma)
        self.bypass = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        return h if self.bypass else self.out_norm(h)
