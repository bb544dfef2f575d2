"""The pieces the trainer assembles: model, tokenizer, optimizer, schedule, FLOP count, distributed setup."""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from flexigpt.shared.engine.apply import apply_plan, set_trainable
from flexigpt.shared.engine.checkpoint import load_model
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import Plan
from flexigpt.shared.recipe import ModelSection, RecipeError, TrainSection
from flexigpt.shared.train.speed import adamw_kwargs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Dense peak TFLOP/s of one device in bf16/fp16 (no sparsity), by a substring of its CUDA name.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
    "V100": 125.0,
}


# ----------------------------------------------------------------------------------- distributed
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# The environment of the one-rank group this process started itself (no launcher), or None.
_SELF_GROUP_ENV: dict[str, str] | None = None


@contextmanager
def launcher_env() -> Iterator[None]:
    """Inside: the launcher variables of the one-rank group this process started, if it started one.

    DeepSpeed reads ``LOCAL_RANK`` (and friends) from the environment when an engine is built, as
    a launcher would have set them. They are set only while needed and removed afterwards, so that
    a subprocess started later (a test, a quickstart step) does not take itself for rank 0 of this
    process's group and try to bind its port.
    """
    added = {}
    if _SELF_GROUP_ENV is not None and "RANK" not in os.environ:
        added = _SELF_GROUP_ENV
        os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def init_distributed(
    cpu_shm_comm: bool, timeout_s: float | None = None
) -> tuple[int, int, int, torch.device]:
    """Start (or join) the process group: NCCL on GPUs, gloo on CPU. Returns rank, world, local rank, device.

    Under a launcher (torchrun, deepspeed) its environment is used, and the group is built on the
    rendezvous store that rank-0 steps (``launch.rank0_step``) waited on, if they ran first. A single
    process started without one becomes a one-rank group on a free local port; build DeepSpeed
    engines inside ``launcher_env()`` then (``train`` does).

    Args:
        cpu_shm_comm: ``train.cpu_shm_comm``.
        timeout_s: the process group's timeout for every collective (``train.dist_timeout_s``);
            None: DeepSpeed's default (10 minutes, or ``DEEPSPEED_TIMEOUT`` minutes).
    """
    global _SELF_GROUP_ENV
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not use_cuda and not cpu_shm_comm:
        # DeepSpeed's comm backend JIT-compiles its shared-memory allreduce (~40 s) the first time a
        # process group starts on CPU. Marking the op unavailable makes it use plain gloo, which is
        # what the project's small CPU runs need; `train.cpu_shm_comm: true` keeps the fast path.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.constants import default_pg_timeout

    from flexigpt.shared.train.launch import init_process_group_on_store

    timeout = default_pg_timeout if timeout_s is None else timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        init_process_group_on_store("nccl" if use_cuda else "gloo", timeout)
        if "RANK" not in os.environ:
            port = os.environ.get("MASTER_PORT") or str(_free_port())
            _SELF_GROUP_ENV = {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
        with launcher_env():
            deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ model
def load_tokenizer(section: ModelSection) -> Any:
    """The tokenizer of `section` (its own path, else the model source)."""
    return AutoTokenizer.from_pretrained(section.tokenizer or section.source)


def build_model(section: ModelSection, dtype: torch.dtype, *, init_adapters: bool = True) -> PreTrainedModel:
    """Load `section.source` and make it a shared-block model.

    A compact source already is one. A plain source gets `section.plan` applied, or the identity
    plan when there is none, so that every trained model carries a plan, saves compactly and
    materialises the same way.

    Raises:
        RecipeError: a plan is given for a source that already has one.
    """
    model = load_model(section.source, dtype=dtype, attn_implementation=section.attn_implementation)
    if getattr(model, "plan", None) is not None:
        if section.plan is not None:
            raise RecipeError(
                f"model.plan={section.plan!r}: model.source={section.source!r} is already a shared-block model "
                "with its own plan; set model.plan to null"
            )
        return model
    plan = (
        Plan.load(section.plan)
        if section.plan
        else Plan.identity(model.config.model_type, model.config.num_hidden_layers)
    )
    return apply_plan(model, plan, init_slot_params=init_adapters)


def make_trainable(
    model: PreTrainedModel, rule: str, layers: list[int] | None = None, head: bool = False
) -> int:
    """Apply the trainable rule of the recipe, optionally restricted to some slots.

    Args:
        model: a shared-block model.
        rule: adapters | adapters+norms | all (see ``engine.set_trainable``, which checks the count).
        layers: slot indices (the decoder stack, ``model.layers``) whose parameters may train; None: every slot.
            Parameters outside the decoder stack (embeddings, final norm, head) are frozen then.
        head: with `layers`, the LM head and the final norm train too.

    Returns:
        The number of trainable parameters.

    Raises:
        RecipeError: a slot index is out of range, or nothing is left to train.
    """
    count = set_trainable(model, rule)
    if layers is not None:
        layout = get_layout(model.config)
        stack = model.get_submodule(layout.layers_path)
        bad = [i for i in layers if not 0 <= i < len(stack)]
        if bad:
            raise RecipeError(
                f"train.trainable_layers: {bad} out of range; the model has slots 0..{len(stack) - 1}"
            )
        keep = {id(p) for i in layers for p in stack[i].parameters()}
        if head:
            top = [model.get_output_embeddings(), model.get_submodule(layout.final_norm)]
            keep |= {id(p) for m in top for p in m.parameters()}
        for p in model.parameters():
            p.requires_grad_(p.requires_grad and id(p) in keep)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if count == 0:
        raise RecipeError(
            f"train.trainable={rule!r} (train.trainable_layers={layers}) leaves no parameter to train for this "
            "plan; use 'all', a plan with adapters, or other layers"
        )
    return count


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs per token, by the work that is done (see ``flop_count``)."""

    forward: float
    """2 x matrix parameters of every slot and the head, plus attention scores and values."""
    activation_grad: float
    """Gradients of the activations: slots from the lowest trainable one up, and the head."""
    weight_grad: float
    """Gradients of the trainable matrices (2 x their parameters, once per slot that runs them)."""
    lowest_trainable_slot: int | None
    """Where backward stops (None: no slot trains)."""

    @property
    def total(self) -> float:
        return self.forward + self.activation_grad + self.weight_grad


def _matrix_numel(p: torch.Tensor) -> int:
    # ZeRO-3 partitions parameters: their full shape / size live in ds_shape / ds_numel
    return int(getattr(p, "ds_numel", p.numel())) if len(getattr(p, "ds_shape", p.shape)) >= 2 else 0


def flop_count(model: PreTrainedModel, seq_len: int) -> FlopCount:
    """Training FLOPs per token of a shared-block model under its current ``requires_grad`` flags.

    With N_s the matrix parameters a slot runs (its block's linears, counted for every slot that
    runs a shared block, plus its adapter factors), d = heads x head_dim and T = seq_len:

    - forward: 2 N_s + 4 T d per slot, plus 2 x the head's parameters;
    - activation gradients: 2 N_s + 8 T d for the lowest slot with a trainable parameter and every
      slot above it (backward stops there), plus 2 x the head's parameters when anything trains;
    - weight gradients: 2 x the trainable matrix parameters of each slot, and of the head if it trains.

    With every parameter trainable this is PaLM's 6 N + 12 L T d. Norms, output norms and embedding
    lookups are element-wise or gathers and are not counted; activation recomputation (gradient
    checkpointing) is not counted either, as MFU is defined.
    """
    cfg = model.config
    layout = get_layout(cfg)
    layers = model.get_submodule(layout.layers_path)
    head_dim = layout.head_dim(cfg)
    attn = seq_len * cfg.num_attention_heads * head_dim
    head_w = model.get_output_embeddings().weight
    head = _matrix_numel(head_w)
    forward, act, weight = 2.0 * head, 0.0, 2.0 * head if head_w.requires_grad else 0.0
    per_slot = []
    for layer in layers:
        params = list(layer.parameters())
        n = sum(_matrix_numel(p) for p in params)
        trained = sum(_matrix_numel(p) for p in params if p.requires_grad)
        per_slot.append((n, any(p.requires_grad for p in params)))
        forward += 2.0 * n + 4.0 * attn
        weight += 2.0 * trained
    lowest = next((i for i, (_, t) in enumerate(per_slot) if t), None)
    if lowest is not None:
        act = 2.0 * head + sum(2.0 * n + 8.0 * attn for n, _ in per_slot[lowest:])
    return FlopCount(forward, act, weight, lowest)


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token by the work done (``flop_count(...).total``); the MFU numerator."""
    return flop_count(model, seq_len).total


class Throughput:
    """Tokens per second of training alone: time spent in ``paused()`` (evaluation, checkpoints) is left out."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Start a new window."""
        self._start, self._paused, self.tokens = time.perf_counter(), 0.0, 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Inside, the clock of the window stops."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0

    def rate(self) -> float:
        """Tokens per second of the window so far."""
        return self.tokens / max(time.perf_counter() - self._start - self._paused, 1e-9)


def peak_flops(train: TrainSection, device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for MFU: the recipe's figure, else a known GPU in half precision."""
    if train.peak_tflops is not None:
        return train.peak_tflops * 1e12
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


# ------------------------------------------------------------------------------------ optimization
def build_optimizer(
    model: nn.Module, train: TrainSection, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on 1-D tensors (norms, biases).

    Args:
        model: the model (its parameters may still be on the CPU; DeepSpeed moves them).
        train: the recipe section (``lr``, ``betas``, ``eps``, ``weight_decay``, ``optimizer_impl``).
        device: the device training runs on, which ``optimizer_impl: auto`` chooses by; None: the CPU.

    Raises:
        RecipeError: PyTorch refuses the chosen implementation for these parameters.
    """
    decay, no_decay = [], []
    for p in model.parameters():  # each shared Parameter once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    impl = adamw_kwargs(train.optimizer_impl, device or torch.device("cpu"))
    try:
        return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, eps=train.eps, **impl)
    except (RuntimeError, ValueError) as e:
        raise RecipeError(
            f"train.optimizer_impl={train.optimizer_impl!r}: PyTorch refuses it here: {e}"
        ) from e


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warm-up, then cosine to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSection, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine schedule (stepped by DeepSpeed once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, train.warmup_steps, total_steps, train.min_lr_ratio)
    )
