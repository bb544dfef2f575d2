"""The compact format's entries in the transformers Auto classes: its config class and model entry point.

``AutoConfig.from_pretrained(dir)`` on a compact directory reads ``model_type: "flexigpt"`` and needs
``FlexiGPTConfig``; ``AutoModelForCausalLM.from_pretrained(dir)`` then needs a model class for that
config, ``FlexiGPTForCausalLM``, whose ``from_pretrained`` builds the shared model from the plan
(``checkpoint.load_compact``). No ``trust_remote_code`` is involved.

This module imports only transformers' configuration code and the pure-data layouts, never torch:
registration can then run right after transformers' Auto modules are imported (see ``autohook``)
without any risk of importing a half-initialised module.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

from transformers.configuration_utils import PretrainedConfig

from flexigpt.shared.engine.layout import get_layout

FORMAT_VERSION = "flexigpt-compact/1"
"""The compact format's version, stored in its weights' metadata and config."""

LOAD_HINT = (
    "flexigpt compact shared-block checkpoint: transformers alone does not know model_type 'flexigpt'. "
    "pip install flexigpt (or pip install -e . in a clone of the project), then `import flexigpt.shared` "
    "before AutoModelForCausalLM.from_pretrained(this directory); see README.md here."
)
"""Stored in the compact ``config.json`` as ``how_to_load``."""


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
        self,
        base_config: dict[str, Any] | None = None,
        plan: dict[str, Any] | None = None,
        how_to_load: str = LOAD_HINT,
        **kw: Any,
    ):
        self.base_config = base_config
        self.plan = plan
        # Read by people only: what to install when transformers does not recognise the format.
        self.how_to_load = how_to_load
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


class FlexiGPTForCausalLM:
    """Auto-class entry point: ``from_pretrained`` builds the shared model described by the config.

    Instances of this class are never made: ``from_pretrained`` returns a ``Shared<Family>ForCausalLM``
    (``engine.apply``), a subclass of the source architecture. It is a plain class, not a
    ``PreTrainedModel``, so that registering it needs no modelling code.
    """

    config_class = FlexiGPTConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """Load a compact checkpoint; every option is honoured or refused (see ``load_options``).

        Raises:
            LoadOptionError: an option the compact loader cannot honour (quantisation, a device map
                over several devices, ...), named in the message.
        """
        from flexigpt.shared.engine.checkpoint import load_compact
        from flexigpt.shared.engine.load_options import resolve_options

        opts = resolve_options(args, kwargs)
        return load_compact(
            pretrained_model_name_or_path,
            dtype=opts.dtype,
            attn_implementation=opts.attn_implementation,
            device=opts.device,
            **opts.hub,
        )


def register_config() -> None:
    """Make ``AutoConfig`` know ``model_type: "flexigpt"`` (idempotent)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

    if "flexigpt" not in CONFIG_MAPPING:
        AutoConfig.register("flexigpt", FlexiGPTConfig)


def register_model() -> None:
    """Make ``AutoModelForCausalLM`` build compact checkpoints (idempotent)."""
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    # exist_ok: a second registration of the same pair is harmless (e.g. after importlib.reload)
    AutoModelForCausalLM.register(FlexiGPTConfig, FlexiGPTForCausalLM, exist_ok=True)


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know the compact format (idempotent)."""
    register_config()
    register_model()
