"""From a replacement plan to a pruned model on disk: apply, check the count, save, export.

``build_variant`` applies a plan to the loaded source model (the engine reuses the source's
Parameters and reads the removed blocks' weights for the SVD init before they are dropped) and
checks that the model stores exactly the parameters the plan predicts. The engine does not modify
the source model, so one loaded source serves every variant of a run in turn: the command never
loads the source twice and never holds two copies of it (``tests/prune/test_prune_cli.py`` checks
that a variant built after another equals a fresh build).

``export_plain`` writes the ShortGPT model as a plain HF checkpoint (fewer layers, renumbered
``layer_idx``, ``num_hidden_layers`` updated). ``engine.materialize`` would do the same by copying
every tensor first; a ShortGPT plan has no adapter or norm to merge and runs each block once, so
the plain model here is a new container around the *same* modules and costs no memory (the test
checks it writes the same tensors as ``export_materialized``).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from flexigpt.shared.engine.apply import SOURCE_CLASSES, apply_plan, expected_trainable, stored_param_count
from flexigpt.shared.engine.checkpoint import DEFAULT_MAX_SHARD_SIZE, write_weights
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.parts import skeleton
from flexigpt.shared.engine.plan import Plan
from flexigpt.shared.engine.tokenizer_files import save_tokenizer


class PruneError(ValueError):
    """The prune command cannot go on; the message names the recipe key or file to change."""


def build_variant(
    source: PreTrainedModel,
    plan: Plan,
    config: PretrainedConfig,
    *,
    seed: int | None = None,
    blocks: Callable[..., AbstractContextManager] | None = None,
) -> PreTrainedModel:
    """Apply `plan` to `source` and check the stored parameter count against the plan.

    Args:
        source: the loaded plain source model (not modified; the result shares its Parameters).
        plan: a replacement plan (``replace.build_plan``).
        config: the source config the plan was made for.
        seed: seeds torch before the slot parameters are initialised (random LoRA A), so every
            rebuild gives the same model; None leaves the RNG as it is.
        blocks: for a source read block by block, what reads the blocks a slot's SVD init needs
            (``apply_plan``'s `blocks`).

    Returns:
        The shared model of the plan.

    Raises:
        PruneError: the built model stores another number of parameters than the plan predicts.
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = apply_plan(source, plan, blocks=blocks)
    want, got = expected_trainable(plan, config, "all"), stored_param_count(model)
    if got != want:
        raise PruneError(f"the pruned model stores {got:,} parameters, the plan predicts {want:,}")
    return model


def plain_model(model: PreTrainedModel) -> PreTrainedModel:
    """A plain source-class model over the same modules as a shared model whose slots are all plain.

    Args:
        model: a shared model whose plan runs every block at most once, without adapters, output
            norms or private norms (a ShortGPT plan).

    Returns:
        A ``<Family>ForCausalLM`` sharing every module (and Parameter) with `model`.

    Raises:
        PruneError: the plan has reused blocks or slot-owned parameters (use ``materialize``).
    """
    plan: Plan = model.plan
    blocks = [s.block for s in plan.slots]
    if any(not s.is_plain for s in plan.slots) or len(set(blocks)) != len(blocks):
        raise PruneError(
            "only a plan of plain slots that run distinct blocks (ShortGPT) has a plain model without copies; "
            "use flexigpt.shared.engine.checkpoint.export_materialized"
        )
    layout = get_layout(model.config)
    # The slots already are plain decoder layers with layer_idx 0..n-1 and the config already says
    # n layers (apply_plan did both), so moving the modules over is the whole conversion.
    plain = skeleton(
        SOURCE_CLASSES[layout.model_type],
        copy.deepcopy(model.config),
        top=model,
        layers=model.get_submodule(layout.layers_path),
    )
    plain.generation_config = copy.deepcopy(model.generation_config)
    # layer i of the plain model is source block blocks[i]: without this map the export reads as an
    # unpruned model of fewer layers (the report would show 0 1 2 ... for blocks 0-3 and 8-11)
    plain.config.flexigpt_source_blocks = blocks
    plain.config.flexigpt_source_layers = plan.num_source_layers
    return plain.train(model.training)


def export_plain(
    model: PreTrainedModel,
    out: str | Path,
    tokenizer: Any = None,
    *,
    read: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Save the plain model of a ShortGPT shared model (``plain_model``) as a HF checkpoint, atomically.

    Args:
        model: the shared ShortGPT model.
        out: target directory (replaced if it exists).
        tokenizer: saved beside the weights when given.
        read: for a model whose block matrices are read on demand (``stream.StreamedSource.read``):
            the weights are written shard by shard (`max_shard_size`), each tensor read as its
            shard is written, under transformers' names (a tied head once, as transformers saves it).
        max_shard_size: the largest weights file with `read`.

    Returns:
        The directory written.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier attempt
    plain = plain_model(model)
    if read is None:
        plain.save_pretrained(tmp)
    else:
        tmp.mkdir(parents=True)
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, p in plain.named_parameters():  # a tied head's weight once, under the embedding's name
            if id(p) not in seen:
                seen.add(id(p))
                tensors[name] = p
        write_weights(tensors, tmp, max_shard_size, read, metadata={"format": "pt"})
        plain.config.architectures = [type(plain).__name__]
        plain.config.save_pretrained(tmp)
        plain.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        save_tokenizer(tokenizer, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
