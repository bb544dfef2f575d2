"""The compact checkpoint format, its transformers Auto-class registration, and exports.

A compact checkpoint directory holds:

- ``config.json`` with ``model_type: "flexigpt"``, the source model's config (``base_config``) and
  the plan; transformers reads it through ``AutoConfig`` once this package is imported;
- ``model.safetensors`` with every *physical* block once (``blocks.<b>.<name>``), every slot's own
  parameters (``slots.<i>.<name>``: LoRA factors, output norms, private norms), and the tensors
  outside the decoder stack under their usual names (tied embeddings stored once);
- ``plan.json`` (the same plan, readable on its own), ``generation_config.json`` and, when given,
  the tokenizer files.

``AutoModelForCausalLM.from_pretrained(dir)`` restores the sharing (the same Parameter objects),
bit-identical outputs and the plan, with no ``trust_remote_code``: the model class it resolves to
is registered by this module and builds the model from the plan. Its options (``dtype``,
``device_map``, ``revision``, ...) are honoured or refused by name (``load_options``); the weights
may also be sharded (``model.safetensors.index.json``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

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
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.load_options import WEIGHTS_NAME, LoadOptionError, resolve_options, weight_files
from flexigpt.shared.engine.plan import Plan, PlanError
from flexigpt.shared.engine.tokenizer_files import save_tokenizer

FORMAT_VERSION = "flexigpt-compact/1"


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or does not match its plan."""


class FlexiGPTConfig(PretrainedConfig):
    """Config of a compact checkpoint: the source config plus the plan.

    The usual top-level fields (``num_hidden_layers``, ``vocab_size``, ``hidden_size``, ...) mirror
    the config of the stack the plan builds (one layer per slot), so that tools reading a config
    see the model that runs; ``base_config`` and ``plan`` stay the only source of truth for loading.
    The ``flexigpt`` field says, to a reader without this package, what the directory is and what
    to install to load it.
    """

    model_type = "flexigpt"

    def __init__(
        self, base_config: dict[str, Any] | None = None, plan: dict[str, Any] | None = None, **kw: Any
    ):
        self.base_config = base_config
        self.plan = plan
        if base_config is not None and plan is not None:
            kw.update(_mirrored_fields(base_config, plan))
            kw["flexigpt"] = _install_note()
        super().__init__(**kw)


# Fields of the source config that describe the file, not the model: never mirrored.
_NOT_MIRRORED = ("model_type", "architectures", "transformers_version", "auto_map", "base_config", "plan")


def _mirrored_fields(base_config: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """The source config's fields as the slot stack has them (layer count, per-layer lists)."""
    blocks = [s["block"] for s in plan["slots"]]
    out = {k: v for k, v in base_config.items() if not k.startswith("_") and k not in _NOT_MIRRORED}
    out["num_hidden_layers"] = len(blocks)
    for name in get_layout(base_config.get("model_type")).per_layer_config:
        if isinstance(out.get(name), list):
            out[name] = [out[name][b] for b in blocks]
    return out


def _install_note() -> dict[str, str]:
    try:
        version = importlib.metadata.version("flexigpt")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        version = "0.1.0"
    return {
        "format": FORMAT_VERSION,
        "requires": f"flexigpt>={version} (pip install flexigpt); it registers model_type 'flexigpt' "
        "with transformers' Auto classes",
        "load": "import flexigpt.shared; AutoModelForCausalLM.from_pretrained(this_directory)",
        "vllm": "pip install --no-deps flexigpt in vLLM's environment (its model plugin), then "
        "'vllm serve this_directory'",
        "without_flexigpt": "a plain model of the source architecture: 'flexigpt-train export "
        "--materialize' or engine.checkpoint.export_materialized (plans without output norms)",
    }


class FlexiGPTForCausalLM(PreTrainedModel):
    """Auto-class entry point: ``from_pretrained`` builds the shared model described by the config.

    Instances of this class are never made: ``from_pretrained`` returns a
    ``Shared<Family>ForCausalLM`` (see ``engine.py``), a subclass of the source architecture.
    """

    config_class = FlexiGPTConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):  # type: ignore[override]
        """Load a compact checkpoint; every option is honoured or refused (see ``load_options``).

        Raises:
            LoadOptionError: an option the compact loader cannot honour (quantisation, a device map
                over several devices, ...), named in the message.
        """
        opts = resolve_options(args, kwargs)
        return load_compact(
            pretrained_model_name_or_path,
            dtype=opts.dtype,
            attn_implementation=opts.attn_implementation,
            device=opts.device,
            **opts.hub,
        )


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know the compact format (idempotent)."""
    if "flexigpt" not in CONFIG_MAPPING:
        AutoConfig.register("flexigpt", FlexiGPTConfig)
        AutoModelForCausalLM.register(FlexiGPTConfig, FlexiGPTForCausalLM)


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def compact_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors of the compact format: each physical block once, slot-owned tensors per slot."""
    plan: Plan = model.plan
    layout = get_layout(model.config)
    prefix = layout.layers_path + "."
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # duplicates (tied or shared) are skipped by torch
        if not name.startswith(prefix):
            tensors[name] = p
    layers = _layers(model, layout)
    for block in plan.physical_blocks:
        owner = plan.owner_slot(block)
        spec = plan.slots[owner]
        for name, p in layers[owner].named_parameters():
            if ".lora_" in name or ".out_norm." in name:
                continue
            if spec.own_norms and canonical_name(name).rsplit(".", 1)[0] in layout.norms:
                # the owner uses private norms; the block's norms are stored if another slot uses them
                users = [i for i, s in enumerate(plan.slots) if s.block == block and not s.own_norms]
                if not users:
                    continue
                p = layers[users[0]].get_parameter(name)
            tensors[f"blocks.{block}.{canonical_name(name)}"] = p
    for slot, name, _role, p in iter_slot_params(model):
        tensors[f"slots.{slot}.{name}"] = p
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def save_compact(model: PreTrainedModel, save_directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write `model` in the compact format, atomically (a temporary directory, then a rename).

    Args:
        model: a shared model from ``apply_plan`` / ``load_compact``.
        save_directory: target directory; replaced if it exists.
        tokenizer: optional tokenizer saved beside the weights.

    Returns:
        The directory written.
    """
    out = Path(save_directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plan: Plan = model.plan
        save_file(
            compact_state(model),
            str(tmp / WEIGHTS_NAME),
            metadata={"format": "pt", "flexigpt": FORMAT_VERSION},
        )
        cfg = FlexiGPTConfig(base_config=model.source_config.to_dict(), plan=plan.to_dict())
        cfg.architectures = ["FlexiGPTForCausalLM"]
        cfg.save_pretrained(tmp)
        plan.save(tmp / "plan.json")
        model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    with torch.device("meta"):
        source = SOURCE_CLASSES[layout.model_type](base)
    src_layers = _layers(source, layout)
    slot_tensors: dict[tuple[int, str], torch.Tensor] = {}
    try:
        files = weight_files(d)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
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
        source.lm_head.weight = source.model.embed_tokens.weight
    for path_ in layout.buffer_modules:  # non-persistent buffers (rotary inv_freq) are rebuilt
        source.set_submodule(path_, type(source.get_submodule(path_))(config=base))
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
]
