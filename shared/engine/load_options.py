"""What ``from_pretrained`` options mean for a compact checkpoint, and which ones it refuses.

transformers' ``from_pretrained`` takes many options; the compact loader builds the shared model
from its plan instead of running transformers' own loading code, so every option is either
honoured here or refused with a message. None is dropped silently.

Honoured: ``dtype`` / ``torch_dtype`` (``"auto"``: as stored), ``device_map`` on one device,
``attn_implementation``, the hub options (``revision``, ``token``, ``cache_dir``,
``local_files_only``, ``force_download``, ``subfolder``) and sharded checkpoints
(``model.safetensors.index.json``). Refused: quantisation, device maps that split the model over
several devices, offloading, tensor parallelism, GGUF files and non-safetensors weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

HUB_OPTIONS: tuple[str, ...] = (
    "revision",
    "token",
    "cache_dir",
    "local_files_only",
    "force_download",
    "subfolder",
)
"""Options that say where the directory comes from (passed on to the hub download)."""

# Options whose effect the compact loader already has, or that say nothing about the result:
# the loader never runs code from the directory (trust_remote_code), always loads tensor by tensor
# (low_cpu_mem_usage) and reads config.json itself (config, which the Auto class passes on).
_INERT = ("trust_remote_code", "low_cpu_mem_usage", "config", "_from_auto", "adapter_kwargs")

# Spellings of "let the library place the model": for a compact model, one device.
_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

HONOURED: tuple[str, ...] = (
    "dtype",
    "torch_dtype",
    "device_map",
    "attn_implementation",
    "use_safetensors",
    *HUB_OPTIONS,
)


class LoadOptionError(ValueError):
    """A ``from_pretrained`` option the compact loader cannot honour."""


@dataclass
class LoadOptions:
    """The resolved options of one compact load."""

    dtype: torch.dtype | None = None
    """Cast the weights to this dtype; None: as stored."""
    device: torch.device | None = None
    """Load every tensor onto this device; None: CPU."""
    attn_implementation: str | None = None
    """``eager`` | ``sdpa`` | ...; None: transformers' default (``sdpa``)."""
    hub: dict[str, Any] = field(default_factory=dict)
    """Hub options (revision, token, ...) for a directory that is a hub id."""


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        return value
    resolved = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise LoadOptionError(f"dtype={value!r} is not a torch dtype (e.g. 'float32', 'bfloat16', 'auto')")
    return resolved


def _accelerator() -> torch.device:
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return torch.device(acc.type, 0) if acc is not None else torch.device("cpu")


def resolve_device_map(device_map: Any) -> torch.device | None:
    """The one device a ``device_map`` puts a compact model on.

    A shared block is run by several slots, so it must sit on one device with all of them: the
    model is placed whole. ``"auto"`` (and ``balanced``/``sequential``) means the first accelerator,
    or the CPU where there is none; a dict is accepted when every entry names the same device.

    Raises:
        LoadOptionError: the map splits the model over several devices or offloads part of it.
    """
    if device_map is None:
        return None
    if isinstance(device_map, str) and device_map in _AUTO_MAPS:
        return _accelerator()
    if isinstance(device_map, dict):
        devices = {str(_device(v)) if v not in ("disk", "meta") else v for v in device_map.values()}
        if len(devices) != 1 or devices & {"disk", "meta"}:
            raise LoadOptionError(
                f"device_map places parts of the model on {sorted(devices)}: a compact model runs each shared "
                "block for several slots, so it is placed whole on one device; pass one device "
                "(device_map='cuda:0', {'': 0}, 'auto'), or export a materialised model to split it"
            )
        device_map = next(iter(device_map.values()))
    return _device(device_map)


def _device(value: Any) -> torch.device:
    if isinstance(value, int):
        acc = _accelerator()
        if acc.type == "cpu":
            raise LoadOptionError(f"device_map names accelerator {value}, but this machine has none")
        return torch.device(acc.type, value)
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise LoadOptionError(
            f"device_map={value!r} is not a device; allowed: a device ('cpu', 'cuda:0', 0), "
            f"one of {list(_AUTO_MAPS)}, or a dict whose entries all name one device"
        ) from None


def resolve_options(model_args: tuple[Any, ...], kwargs: dict[str, Any]) -> LoadOptions:
    """Map ``from_pretrained(path, *model_args, **kwargs)`` to the compact loader's options.

    Raises:
        LoadOptionError: an option the loader cannot honour; the message names it and lists the
            honoured ones.
    """
    if model_args:
        raise LoadOptionError(
            "positional model arguments are not supported for a compact checkpoint (its config.json "
            "describes the model)"
        )
    config = kwargs.get("config")
    quant = kwargs.get("quantization_config") or getattr(config, "quantization_config", None)
    if quant is not None or kwargs.get("load_in_8bit") or kwargs.get("load_in_4bit"):
        raise LoadOptionError(
            "quantization_config: a compact checkpoint loads only unquantised (dtype=float32, bfloat16, "
            "float16); quantise a materialised export (flexigpt-train export --materialize) instead"
        )
    if kwargs.get("use_safetensors") is False:
        raise LoadOptionError("use_safetensors=False: compact checkpoints are stored only as safetensors")
    unknown = sorted(
        k
        for k, v in kwargs.items()
        if k not in HONOURED and k not in _INERT and k != "quantization_config" and v is not None
    )
    if unknown:
        raise LoadOptionError(
            f"from_pretrained options {unknown} are not supported for a compact checkpoint; honoured: "
            f"{list(HONOURED)}"
        )
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    attn = kwargs.get("attn_implementation") or getattr(config, "_attn_implementation_internal", None)
    return LoadOptions(
        dtype=_dtype(dtype),
        device=resolve_device_map(kwargs.get("device_map")),
        # the Auto class moves `attn_implementation` into the config it passes on
        attn_implementation=attn,
        hub={k: kwargs[k] for k in HUB_OPTIONS if kwargs.get(k) is not None},
    )
