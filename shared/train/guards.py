"""Checks that keep a training run from reporting success on a broken model or a broken setup.

- before training: local paths that do not exist (instead of a "bad hub id"), pickle weights, a
  tokenizer larger than the embedding, ``data.seq_len`` beyond the position embeddings, an output
  directory that is not writable or has no room for one checkpoint;
- on resume: a change of anything that shapes the LR schedule or the data order;
- during training: a non-finite loss, gradient norm or parameter (``TrainingDiverged``).

Every refusal is a ``RecipeError`` naming the key or file (the commands print it and exit 2);
a run that fails once started raises ``TrainingError`` (exit 1).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from flexigpt.shared.recipe import BaseRecipe, ModelSection, RecipeError

# Recipe fields that fix the LR schedule or which sequences each step reads; a resumed run that
# changes one of them does not continue the run it resumes (see ``schedule_changes``).
SCHEDULE_FIELDS = (
    "train.max_steps",
    "train.token_budget",
    "train.lr",
    "train.warmup_steps",
    "train.min_lr_ratio",
    "train.micro_batch",
    "train.grad_accum",
    "train.global_batch",
    "data.seq_len",
    "data.seed",
    "data.source",
    "data.hub_id",
    "data.split",
    "data.files",
    "data.format",
    "data.subsets",
    "data.text_field",
    "data.txt_sample_by",
    "data.shuffle_buffer",
    "data.tokenize_batch",
    "data.add_bos",
    "data.num_workers",
)
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class TrainingError(RuntimeError):
    """A started run could not go on (diverged, a checkpoint could not be written); nothing broken is kept."""

    exit_status = 1  # a failed run: the commands print what to change and exit with this status


class TrainingDiverged(TrainingError):
    """The loss, the gradient norm or a parameter is no longer finite."""


# ------------------------------------------------------------------------------------------ paths
def _looks_local(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (or anything that exists) is a local path."""
    return (
        Path(name).exists()
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
    )


def check_model_paths(section: ModelSection) -> None:
    """Refuse missing local model / tokenizer / plan paths, unreadable plans and pickle weights.

    Raises:
        RecipeError: naming ``model.source`` / ``model.tokenizer`` / ``model.plan`` and the problem.
    """
    for key in ("source", "tokenizer"):
        value = getattr(section, key)
        if value is not None and _looks_local(value) and not Path(value).expanduser().is_dir():
            what = "is a file, not a model directory" if Path(value).exists() else "does not exist"
            raise RecipeError(f"model.{key}={value!r} {what} (a local path; hub ids look like 'org/name')")
    if section.plan is not None:
        p = Path(section.plan)
        if not p.is_file():
            raise RecipeError(f"model.plan={section.plan!r} does not exist (a plan.json file is expected)")
        from flexigpt.shared.engine.plan import Plan, PlanError

        try:
            Plan.load(p)
        except (ValueError, KeyError, TypeError, PlanError) as e:
            raise RecipeError(f"model.plan={section.plan!r} is not a valid plan file: {e}") from None
    check_weight_files(section.source, section.allow_pickle_weights)


def check_weight_files(source: str, allow_pickle: bool, key: str = "model.source") -> None:
    """Refuse a local model directory whose weights are pickles (they can run code when loaded).

    Raises:
        RecipeError: `source` holds ``*.bin`` / ``*.pt`` weights and no safetensors, and the
            recipe does not opt in with ``model.allow_pickle_weights``.
    """
    d = Path(source)
    if allow_pickle or not d.is_dir() or any((d / n).is_file() for n in SAFE_WEIGHTS):
        return
    found = [n for n in PICKLE_WEIGHTS if (d / n).is_file()] or sorted(p.name for p in d.glob("*.bin"))
    if found:
        raise RecipeError(
            f"{key}={source!r} holds pickle weights ({found[0]}), which can run code when loaded. Convert "
            "them once, where you trust the files: AutoModelForCausalLM.from_pretrained(DIR)"
            ".save_pretrained(NEW_DIR, safe_serialization=True), then use NEW_DIR; or set "
            "model.allow_pickle_weights=true"
        )


# ------------------------------------------------------------------------------------ model / data
def check_model_fits(model: Any, tokenizer: Any, seq_len: int) -> None:
    """Refuse a tokenizer larger than the embedding and sequences longer than the positions.

    Raises:
        RecipeError: naming ``model.tokenizer`` or ``data.seq_len`` and the model's limit.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise RecipeError(
            f"model.tokenizer: {len(tokenizer)} tokens, but the model's embedding has {rows} rows; token ids "
            "past it cannot be looked up. Use the model's own tokenizer"
        )
    cfg = getattr(model, "source_config", None) or model.config
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise RecipeError(
            f"data.seq_len={seq_len} is above the model's max_position_embeddings={limit}; use at most {limit}"
        )


# --------------------------------------------------------------------------------------- resume
def _get(d: dict[str, Any], dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def schedule_changes(checkpoint_recipe: str, recipe: BaseRecipe) -> list[tuple[str, Any, Any]]:
    """The schedule- and data-order-shaping fields that differ between a checkpoint's recipe and `recipe`.

    Args:
        checkpoint_recipe: the ``recipe.yaml`` text stored in the checkpoint.
        recipe: this run's recipe.

    Returns:
        ``(dotted key, checkpoint value, this run's value)`` for every changed field.
    """
    old = yaml.safe_load(checkpoint_recipe) or {}
    new = recipe.model_dump(mode="json")
    return [(k, _get(old, k), _get(new, k)) for k in SCHEDULE_FIELDS if _get(old, k) != _get(new, k)]


# --------------------------------------------------------------------------------------- disk
def checkpoint_bytes(model: torch.nn.Module, n_trainable: int) -> int:
    """About the bytes one checkpoint takes on disk, over all ranks.

    The module state holds every tensor in its training dtype; the optimizer state holds fp32
    master weights and the two AdamW moments of every trainable parameter (12 bytes each).
    """
    module = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    module += sum(b.numel() * b.element_size() for b in model.buffers())
    return int(module + 12 * n_trainable)


def _free_bytes(d: Path) -> int:
    return shutil.disk_usage(d).free


def check_output_dir(out: Path, need: int) -> None:
    """Refuse an output directory that cannot be written or has no room for one checkpoint.

    Args:
        out: the run directory (it exists: the run lock created it).
        need: bytes of one checkpoint (``checkpoint_bytes``).

    Raises:
        RecipeError: naming ``output_dir``, the OS error or the free and needed space.
    """
    probe = out / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise RecipeError(f"output_dir={str(out)!r} is not writable: {e.strerror or e}") from None
    finally:
        probe.unlink(missing_ok=True)
    free = _free_bytes(out)
    if free < need:
        raise RecipeError(
            f"output_dir={str(out)!r} has {free / 2**20:,.1f} MiB free; one checkpoint needs about "
            f"{need / 2**20:,.1f} MiB (model and optimizer state). Free some space or use another output_dir"
        )


def describe_write_error(path: Path, err: BaseException) -> str:
    """The OS error behind a failed checkpoint write, named as the OS names it.

    torch reports a full disk while saving as ``basic_ios::clear: iostream error``, without the
    errno; writing a small probe next to the failed file gets the OS's own words back.
    """
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno)
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror or str(e)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    if _free_bytes(path) < (1 << 20):
        return os.strerror(errno.ENOSPC)
    return f"{err.__class__.__name__}: {err}"


# ---------------------------------------------------------------------------------- finiteness
def params_finite(module: torch.nn.Module) -> bool:
    """Whether every trainable parameter this rank holds (its ZeRO-3 partition, if any) is finite."""
    for p in module.parameters():
        if not p.requires_grad:
            continue
        data = getattr(p, "ds_tensor", None)
        data = p.data if data is None or p.numel() > 0 else data
        if data.numel() and not bool(torch.isfinite(data).all()):
            return False
    return True


def divergence_advice(precision: str) -> str:
    """What to change after a divergence."""
    tips = "lower train.lr, raise train.warmup_steps, keep train.grad_clip above 0"
    if precision == "fp16":
        tips += ", train with bf16 or fp32 (train.precision) or raise train.max_skipped_steps"
    return tips
