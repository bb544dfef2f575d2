"""The compact format's entries in the transformers Auto classes: its config class and model entry point.

``AutoConfig.from_pretrained(dir)`` on a compact directory reads ``model_type: "flexigpt"`` and needs
``FlexiGPTConfig``; ``AutoModelForCausalLM.from_pretrained(dir)`` then needs a model class for that
config, ``FlexiGPTForCausalLM``, whose ``from_pretrained`` builds the shared model from the plan
(``checkpoint.load_compact``). No ``trust_remote_code`` is involved.

This module imports only transformers' configuration code, never its modelling code or the engine:
registration can then run right after transformers' Auto modules are imported (see ``autohook``)
without any risk of importing a half-initialised module.
"""

from __future__ import annotations

import os
from typing import Any

from transformers.configuration_utils import PretrainedConfig

LOAD_HINT = (
    "flexigpt compact shared-block checkpoint: transformers alone does not know model_type 'flexigpt'. "
    "pip install flexigpt (or pip install -e . in a clone of the project), then `import flexigpt.shared` "
    "before AutoModelForCausalLM.from_pretrained(this directory); see README.md here."
)
"""Stored in the compact ``config.json`` as ``how_to_load``."""


class FlexiGPTConfig(PretrainedConfig):
    """Config of a compact checkpoint: the source config plus the plan."""

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
        super().__init__(**kw)


class FlexiGPTForCausalLM:
    """Auto-class entry point: ``from_pretrained`` builds the shared model described by the config.

    Instances of this class are never made: ``from_pretrained`` returns a ``Shared<Family>ForCausalLM``
    (``engine.apply``), a subclass of the source architecture. It is a plain class, not a
    ``PreTrainedModel``, so that registering it needs no modelling code.
    """

    config_class = FlexiGPTConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *_: Any, **kwargs: Any):
        """Load the compact checkpoint at `pretrained_model_name_or_path` (``dtype`` / ``attn_implementation`` honoured)."""
        from flexigpt.shared.engine.checkpoint import load_compact

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return load_compact(
            pretrained_model_name_or_path,
            dtype=None if dtype == "auto" else dtype,
            # the Auto class moves `attn_implementation` into the config it passes on
            attn_implementation=kwargs.get("attn_implementation")
            or getattr(kwargs.get("config"), "_attn_implementation_internal", None),
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
