"""The compact checkpoint format, its transformers Auto-class registration, and exports.

A compact checkpoint directory holds:

- ``config.json`` with ``model_type: "flexigpt"``, the source model's config (``base_config``) and
  the plan; transformers reads it through ``AutoConfig`` once ``flexigpt.shared`` is imported;
- ``model.safetensors`` (or, past ``max_shard_size``, shards named by
  ``model.safetensors.index.json``, as transformers writes them) with every *physical* block once (``blocks.<b>.<name>``), every slot's own
  parameters (``slots.<i>.<name>``: LoRA factors, output norms, private norms), and the tensors
  outside the decoder stack under their usual names (tied embeddings stored once);
- ``plan.json`` (the same plan, readable on its own), ``generation_config.json`` and, when given,
  the tokenizer files;
- ``README.md``, a model card (``card.model_card``): what the directory is, stored and dense
  parameter counts, the slot map, and the lines that load it. transformers without this package
  cannot read the format, and ``config.json``'s ``how_to_load`` says what to install.

``AutoModelForCausalLM.from_pretrained(dir)`` restores the sharing (the same Parameter objects),
bit-identical outputs and the plan, with no ``trust_remote_code``: the model class it resolves to
(``autoclass.FlexiGPTForCausalLM``) builds the model from the plan. Importing this module registers
it; ``import flexigpt.shared`` registers it when transformers' Auto classes are first imported.
Its options (``dtype``, ``device_map``, ``revision``, ...) are honoured or refused by name
(``load_options``); the weights may also be sharded (``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedModel

from flexigpt.shared.engine.apply import (
    SOURCE_CLASSES,
    _layers,
    _set_param,
    apply_plan,
    canonical_name,
    check_plain_exportable,
    iter_slot_params,
    materialize,
)
from flexigpt.shared.engine.autoclass import (
    FORMAT_VERSION,
    FlexiGPTConfig,
    FlexiGPTForCausalLM,
    register_auto_classes,
)
from flexigpt.shared.engine.card import CARD_NAME, model_card
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.load_options import LoadOptionError
from flexigpt.shared.engine.parts import BLOCK, OWN_NORM, skeleton, slot_param_roles, top_params
from flexigpt.shared.engine.plan import Plan, PlanError
from flexigpt.shared.engine.tokenizer_files import save_tokenizer
from flexigpt.shared.files import atomic_dir

# Whoever imports this module can load compact checkpoints through the Auto classes at once, hook or not.
register_auto_classes()

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or does not match its plan."""


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
# The largest weights file the project writes: a compact model larger than this is split into
# several files with an index, as transformers splits plain models. 5GB is the usual hub shard size
# (and transformers 4's default; transformers 5's 50GB would leave a 7B model in one 13 GB file).
DEFAULT_MAX_SHARD_SIZE = "5GB"
# save_pretrained options that change nothing in the compact format (hub uploads aside, refused).
# A save_function (accelerate passes its own) only ever wrote pickled weights; safetensors files are
# written directly, as transformers does.
_NEUTRAL_SAVE_OPTIONS = ("save_peft_format", "save_original_format", "token", "save_function")


def compact_sources(model: PreTrainedModel) -> dict[str, tuple[tuple[str, ...], torch.Tensor]]:
    """Compact key -> (the model's names for that tensor, the tensor), in the order they are stored.

    Each physical block once (its owner slot's Parameters; norms from a slot that uses the block's
    own norms, else the block's idle norms), slot-owned tensors per slot, the rest under their
    usual names (tied tensors once). An idle norm has no name in the model (empty names).
    """
    plan: Plan = model.plan
    layout = get_layout(model.config)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    out: dict[str, tuple[tuple[str, ...], torch.Tensor]] = {}

    def put(key: str, p: torch.Tensor) -> None:
        out[key] = (tuple(aliases.get(id(p), ())), p)

    for name, p in top_params(model, layout):  # a tied head once
        put(name, p)
    layers = _layers(model, layout)
    idle = getattr(model, "idle_block_norms", {})
    for block in plan.physical_blocks:
        owner = plan.owner_slot(block)
        for name, role, p in slot_param_roles(layers[owner], plan.slots[owner], layout):
            if role not in (BLOCK, OWN_NORM):
                continue
            key = f"blocks.{block}.{canonical_name(name)}"
            if role == OWN_NORM:
                # the owner uses private norms: the block's own are another user's, or idle
                users = [i for i, s in enumerate(plan.slots) if s.block == block and not s.own_norms]
                if users:
                    put(key, layers[users[0]].get_parameter(name))
                elif f"{block}.{canonical_name(name)}" in idle:
                    out[key] = ((), idle[f"{block}.{canonical_name(name)}"].to(p.dtype))
                continue
            put(key, p)
    for slot, name, _role, p in iter_slot_params(model):
        put(f"slots.{slot}.{name}", p)
    return out


def compact_state(
    model: PreTrainedModel, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of the compact format: each physical block once, slot-owned tensors per slot.

    Args:
        model: a shared model.
        state_dict: values to store instead of the model's own, keyed as ``model.state_dict()``
            (any alias of a shared tensor will do), e.g. weights gathered from ZeRO-3 partitions.

    Raises:
        CheckpointError: `state_dict` lacks a tensor of the model (the message names it).
    """
    tensors = {}
    for key, (names, p) in compact_sources(model).items():
        if state_dict is not None and names:
            found = [n for n in names if n in state_dict]
            if not found:
                raise CheckpointError(f"state_dict has no value for {names[0]} (stored as {key})")
            p = state_dict[found[0]]
        tensors[key] = p.detach().contiguous()
    return tensors


def save_compact(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    read: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Path:
    """Write `model` in the compact format, atomically (a temporary directory, then a rename).

    Args:
        model: a shared model from ``apply_plan`` / ``load_compact``.
        save_directory: target directory; replaced if it exists.
        tokenizer: optional tokenizer saved beside the weights.
        state_dict: values to store instead of the model's own (see ``compact_state``).
        max_shard_size: largest weights file (bytes, or "5GB" / "500MB"); a larger model is split
            into ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, as
            transformers does.
        read: for a model whose block matrices are read on demand (``stream.StreamedSource.read``):
            gives each tensor's values as its shard is written, so that one shard at a time is in
            memory. Not with `state_dict`.

    Returns:
        The directory written.
    """
    out = Path(save_directory)
    with atomic_dir(out) as tmp:
        plan: Plan = model.plan
        if read is None:
            write_weights(compact_state(model, state_dict), tmp, max_shard_size)
        else:
            tensors = {key: p for key, (_, p) in compact_sources(model).items()}
            write_weights(tensors, tmp, max_shard_size, read)
        cfg = FlexiGPTConfig(base_config=model.source_config.to_dict(), plan=plan.to_dict())
        cfg.architectures = ["FlexiGPTForCausalLM"]
        cfg.save_pretrained(tmp)
        plan.save(tmp / "plan.json")
        (tmp / CARD_NAME).write_text(
            model_card(model, out.resolve().name, with_tokenizer=tokenizer is not None)
        )
        model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return out


def write_weights(
    tensors: dict[str, torch.Tensor],
    directory: Path,
    max_shard_size: int | str,
    read: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `tensors` as one file or shards with an index; `read` gives the values shard by shard.

    With `read`, the shards are split by the tensors' sizes (meta stand-ins of them) and each
    shard's values are read only while that shard is written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    metadata = metadata or {"format": "pt", "flexigpt": FORMAT_VERSION}
    sizes = tensors if read is None else {k: torch.empty_like(t, device="meta") for k, t in tensors.items()}
    split = split_torch_state_dict_into_shards(
        sizes,
        filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: tensors[k] if read is None else read(tensors[k]) for k in keys}
        save_file(shard, str(directory / filename), metadata=metadata)
        del shard
    if split.is_sharded:
        index = {
            "metadata": {**split.metadata, "flexigpt": FORMAT_VERSION},
            "weight_map": split.tensor_to_filename,
        }
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_pretrained_compact(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    safe_serialization: bool = True,
    **kwargs: Any,
) -> Path | None:
    """``save_pretrained`` of a shared model: transformers' options, in the compact format.

    ``is_main_process=False`` writes nothing (the other ranks of a distributed save); ``state_dict``
    and ``max_shard_size`` are honoured as transformers does. Options the compact format cannot
    follow (``push_to_hub``, ``variant``, ``safe_serialization=False``, a distributed checkpoint,
    unknown keywords) are refused rather than silently dropped.

    Raises:
        CheckpointError: a refused option (the message names it).
    """
    refused = sorted(
        k for k, v in kwargs.items() if k not in _NEUTRAL_SAVE_OPTIONS and v not in (None, False)
    )
    if not safe_serialization:
        refused.insert(0, "safe_serialization=False")
    if refused:
        raise CheckpointError(
            f"save_pretrained of a shared-block model: {', '.join(refused)} not supported; the compact format "
            "takes tokenizer, is_main_process, state_dict and max_shard_size (it is always safetensors)"
        )
    if not is_main_process:
        return None
    return save_compact(
        model, save_directory, tokenizer, state_dict=state_dict, max_shard_size=max_shard_size
    )


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def _resolve_dir(path: str | os.PathLike, subfolder: str = "", **hub: Any) -> Path:
    p = Path(path)
    if not p.is_dir():
        if p.exists() or str(path).startswith((".", "/")):
            raise CheckpointError(f"{path}: not a checkpoint directory")
        from huggingface_hub import snapshot_download  # a hub id (or its copy in the local hub cache)

        p = Path(snapshot_download(str(path), **hub))
    if subfolder:
        p = p / subfolder
        if not p.is_dir():
            raise CheckpointError(f"{path}: no subfolder {subfolder!r}")
    return p


def is_compact(path: str | os.PathLike) -> bool:
    """True if `path` is a local compact checkpoint directory."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "flexigpt"


def load_compact(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    *,
    device: torch.device | str | None = None,
    **hub: Any,
) -> PreTrainedModel:
    """Load a compact checkpoint: the shared model with its sharing, plan and exact weights.

    Args:
        path: a local compact directory or a hub id.
        dtype: cast the loaded weights to this dtype (default: as stored).
        attn_implementation: ``eager`` | ``sdpa`` | ... (default ``sdpa``, as transformers).
        device: read every tensor straight onto this device (default: CPU).
        hub: for a hub id: ``revision``, ``token``, ``cache_dir``, ``local_files_only``,
            ``force_download``; ``subfolder`` also applies to a local directory.

    Raises:
        CheckpointError: the directory is incomplete or its tensors do not match the plan.
        PlanError: the plan is invalid or names an unsupported architecture.
    """
    d = _resolve_dir(path, **hub)
    raw = json.loads((d / "config.json").read_text())
    if raw.get("model_type") != "flexigpt":
        raise CheckpointError(f"{d}: config.json has model_type={raw.get('model_type')!r}, not 'flexigpt'")
    base_dict = dict(raw["base_config"])
    layout = get_layout(base_dict.get("model_type"))
    base = CONFIG_MAPPING[layout.model_type].from_dict(base_dict)
    base._attn_implementation = attn_implementation or "sdpa"
    plan = Plan.from_dict(raw["plan"])
    # Every stored tensor is put into a meta skeleton; the rotary embedding is rebuilt from the config.
    source = skeleton(SOURCE_CLASSES[layout.model_type], base)
    src_layers = _layers(source, layout)
    slot_tensors: dict[tuple[int, str], torch.Tensor] = {}
    files = weight_files(d)
    target = torch.device("cpu") if device is None else torch.device(device)
    for file in files:  # one file, or the shards of a sharded save
        with safe_open(str(file), framework="pt", device=str(target)) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_tensor(key)
                kind, _, rest = key.partition(".")
                if kind == "blocks":
                    b, _, name = rest.partition(".")
                    _set_param(src_layers[int(b)], name, nn.Parameter(t))
                elif kind == "slots":
                    i, _, name = rest.partition(".")
                    slot_tensors[(int(i), name)] = t
                else:
                    _set_param(source, key, nn.Parameter(t))
    if base.tie_word_embeddings:
        source.get_output_embeddings().weight = source.get_input_embeddings().weight
    model = apply_plan(source, plan, init_slot_params=False)
    want = {(i, name): p for i, name, _, p in iter_slot_params(model)}
    missing, extra = sorted(set(want) - set(slot_tensors)), sorted(set(slot_tensors) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{d}: slot tensors do not match the plan (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    with torch.no_grad():
        for key, p in want.items():
            p.copy_(slot_tensors[key])
    if (d / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(d)
    # rebuilt buffers (rotary inv_freq) and new slot modules start on the CPU
    model.to(target)
    if dtype is not None:
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.eval()


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a compact checkpoint: one file, or the shards its index names.

    Raises:
        CheckpointError: neither file exists, or the index names a missing shard.
    """
    d = Path(directory)
    index = d / INDEX_NAME
    if index.is_file():
        files = [d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{d}: {INDEX_NAME} names missing shards {missing[:5]}")
        return files
    if (d / WEIGHTS_NAME).is_file():
        return [d / WEIGHTS_NAME]
    raise CheckpointError(f"{d}: neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, attn_implementation: str | None = None
) -> PreTrainedModel:
    """Load a compact checkpoint or a plain HF model (local directory or hub id)."""
    if is_compact(path):
        return load_compact(path, dtype=dtype, attn_implementation=attn_implementation)
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    get_layout(model.config)  # refuse unsupported architectures early, with the supported list
    return model


def export_materialized(
    model: PreTrainedModel, save_directory: str | os.PathLike, tokenizer: Any = None
) -> Path:
    """Save a plain HF model of the source architecture (adapters merged into private copies).

    Raises:
        PlanError: the plan has output feature norms, which the plain architecture cannot hold.
    """
    check_plain_exportable(model.plan)
    plain = materialize(model)
    out = Path(save_directory)
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp, max_shard_size=DEFAULT_MAX_SHARD_SIZE)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return out


__all__ = [
    "CheckpointError",
    "FlexiGPTConfig",
    "FlexiGPTForCausalLM",
    "LoadOptionError",
    "PlanError",
    "export_materialized",
    "is_compact",
    "load_compact",
    "load_model",
    "register_auto_classes",
    "save_compact",
    "save_pretrained_compact",
    "weight_files",
]
