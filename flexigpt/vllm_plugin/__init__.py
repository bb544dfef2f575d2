"""vLLM model plugin: serve compact checkpoints with the sharing kept.

Installed with this package, vLLM finds it through its ``vllm.general_plugins`` entry point and
calls ``register()`` in every process it starts. ``register`` makes ``model_type: "flexigpt"``
known to transformers' ``AutoConfig`` (vLLM reads the config with it) and maps the architecture
``FlexiGPTForCausalLM`` of a compact ``config.json`` to the vLLM model in ``model.py``:

    vllm serve runs/prune/flexigpt/final --dtype bfloat16

Nothing here imports the rest of the toolkit: the plugin runs in vLLM's own environment, whose
pinned torch / transformers versions need not be the toolkit's.
"""

from __future__ import annotations

from typing import Any

ARCHITECTURE = "FlexiGPTForCausalLM"


def _config_class() -> type:
    from transformers import PretrainedConfig

    class FlexiGPTServeConfig(PretrainedConfig):
        """The compact config as vLLM reads it: the mirrored top-level fields, ``base_config`` and ``plan``."""

        model_type = "flexigpt"

        def __init__(
            self, base_config: dict[str, Any] | None = None, plan: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            self.base_config = base_config
            self.plan = plan
            super().__init__(**kw)

    return FlexiGPTServeConfig


def register() -> None:
    """Register the compact format with transformers' AutoConfig and the model with vLLM (idempotent)."""
    from transformers import CONFIG_MAPPING, AutoConfig
    from vllm import ModelRegistry

    if "flexigpt" not in CONFIG_MAPPING:  # the toolkit's own config class, where it is installed, wins
        AutoConfig.register("flexigpt", _config_class())
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "flexigpt.vllm_plugin.model:FlexiGPTForCausalLM")
