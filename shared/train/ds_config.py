"""DeepSpeed JSON configs: locate, check, and fill from the recipe.

The files in ``ds_configs/`` hold what is specific to a ZeRO stage (partitioning, offload, buckets).
Everything the recipe already says is written ``"auto"`` there and filled in here: the batch
fields, gradient clipping and the precision switches. A number in the file instead of ``"auto"``
must agree with the recipe, or loading fails with both values named. Optimizer and scheduler
sections are refused: the trainer builds ``torch.optim.AdamW`` and the cosine schedule itself
(DeepSpeed's own optimizers JIT-compile kernels on first use).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flexigpt.shared.recipe import RecipeError, TrainSection

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
_ALLOWED_AUTO = set(BATCH_KEYS) | {"gradient_clipping"}
_FORBIDDEN = {
    "optimizer": "the trainer builds torch.optim.AdamW from train.lr / betas / eps / weight_decay",
    "scheduler": "the trainer builds the warm-up + cosine schedule from train.warmup_steps / min_lr_ratio",
}


class DSConfigError(RecipeError):
    """A DeepSpeed config is malformed or disagrees with the recipe."""


def find_ds_config(path: str | Path) -> Path:
    """Resolve a ds_config path: as given (absolute or from the working directory), then from the project root.

    Raises:
        DSConfigError: no such file; the message lists the shipped configs.
    """
    p = Path(path)
    for cand in (p, PROJECT_ROOT / p):
        if cand.is_file():
            return cand
    shipped = sorted(str(f.relative_to(PROJECT_ROOT)) for f in (PROJECT_ROOT / "ds_configs").glob("*.json"))
    raise DSConfigError(f"train.ds_config={str(path)!r} does not exist; shipped configs: {shipped}")


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read and check a DeepSpeed JSON config (see ``check_ds_config``)."""
    p = find_ds_config(path)
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DSConfigError(f"{p}: not valid JSON: {e}") from e
    check_ds_config(raw, str(p))
    return raw


def check_ds_config(raw: dict[str, Any], where: str = "ds_config") -> None:
    """Static checks of a config file: structure, 'auto' only where allowed, batch arithmetic.

    Raises:
        DSConfigError: naming the key and what is allowed.
    """
    if not isinstance(raw, dict):
        raise DSConfigError(f"{where}: the top level must be an object")
    for key, why in _FORBIDDEN.items():
        if key in raw:
            raise DSConfigError(f"{where}: remove the {key!r} section ({why})")
    zero = raw.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in (1, 2, 3):
        # Stage 0 is left out on purpose: exports rebuild weights with zero_to_fp32, which reads
        # ZeRO partitions; ZeRO-1 costs next to nothing over plain data parallelism.
        raise DSConfigError(f"{where}: zero_optimization.stage must be 1, 2 or 3 (use ZeRO-1 instead of 0)")
    for key, value in raw.items():
        if value == "auto" and key not in _ALLOWED_AUTO:
            raise DSConfigError(
                f"{where}: {key!r} may not be 'auto'; 'auto' is allowed for {sorted(_ALLOWED_AUTO)}"
            )
    for section in ("bf16", "fp16"):
        enabled = raw.get(section, {}).get("enabled", False)
        if enabled not in (True, False, "auto"):
            raise DSConfigError(f"{where}: {section}.enabled={enabled!r}; allowed true, false or 'auto'")
    nums = {k: raw[k] for k in BATCH_KEYS if k in raw and raw[k] != "auto"}
    for k, v in nums.items():
        if not isinstance(v, int) or v < 1:
            raise DSConfigError(f"{where}: {k}={v!r} must be a positive integer or 'auto'")
    if len(nums) == 3:
        m, a, g = (nums[k] for k in BATCH_KEYS)
        if g % (m * a):
            raise DSConfigError(
                f"{where}: train_batch_size={g} is not micro ({m}) x accumulation ({a}) x a whole world size"
            )


def resolve_precision(precision: str, device_type: str) -> str:
    """fp32 | bf16 | fp16 for a recipe precision on a device type ("cpu" or "cuda").

    Raises:
        DSConfigError: half precision asked for on CPU (the project's CPUs have no bf16 units and
            DeepSpeed's CPU path trains half precision far slower), or bf16 on a GPU without it.
    """
    if precision == "auto":
        if device_type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision != "fp32" and device_type != "cuda":
        raise DSConfigError(f"train.precision={precision!r} needs a GPU; on CPU use 'fp32' or 'auto'")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DSConfigError("train.precision='bf16' is not supported by this GPU; use 'fp16' or 'auto'")
    return precision


def build_ds_config(
    raw: dict[str, Any], train: TrainSection, *, world_size: int, precision: str, where: str = "ds_config"
) -> dict[str, Any]:
    """The config passed to ``deepspeed.initialize``: 'auto' fields filled from the recipe, numbers checked.

    Args:
        raw: a checked config (``load_ds_config``).
        train: the recipe's train section.
        world_size: data-parallel ranks.
        precision: the resolved precision (fp32 | bf16 | fp16).
        where: name of the config in error messages.

    Returns:
        A new dict; `raw` is not modified.

    Raises:
        DSConfigError: a number in the file disagrees with the recipe, or the batch arithmetic fails.
    """
    micro, accum, total = train.resolve_batch(world_size)
    cfg = json.loads(json.dumps(raw))
    want = {
        "train_micro_batch_size_per_gpu": (micro, "train.micro_batch"),
        "gradient_accumulation_steps": (accum, "train.grad_accum"),
        "train_batch_size": (total, "train.global_batch"),
        "gradient_clipping": (train.grad_clip, "train.grad_clip"),
    }
    for key, (value, recipe_key) in want.items():
        have = cfg.get(key, "auto")
        if have != "auto" and have != value:
            raise DSConfigError(
                f"{where}: {key}={have!r} disagrees with the recipe ({recipe_key} gives {value!r} at world size "
                f"{world_size}); write 'auto' in the config or change the recipe"
            )
        cfg[key] = value
    for section, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        sub = dict(cfg.get(section, {}))
        if sub.get("enabled", "auto") not in ("auto", on):
            raise DSConfigError(
                f"{where}: {section}.enabled={sub['enabled']!r} disagrees with train.precision (resolved {precision!r})"
            )
        sub["enabled"] = on
        cfg[section] = sub
    if micro * accum * world_size != cfg["train_batch_size"]:
        raise DSConfigError(
            f"{where}: micro batch {micro} x accumulation {accum} x world size {world_size} != "
            f"train_batch_size {cfg['train_batch_size']}"
        )
    return cfg


def zero_stage(cfg: dict[str, Any]) -> int:
    """The ZeRO stage of a config."""
    return int(cfg["zero_optimization"]["stage"])
