"""The parts of a model: a skeleton with transplanted top modules, and what each parameter is.

Two things every builder of a model in this package needs, written once:

- ``skeleton``: an instance of a CausalLM class built on the meta device (nothing allocated) whose
  top modules (embeddings, final norm, rotary embedding, head: ``ArchLayout.top_modules``) and
  decoder stack are then put in from elsewhere. Applying a plan, materialising, the pruned plain
  model, the speculative draft and the checkpoint loader all build their models this way.
- ``slot_param_roles`` / ``top_params``: the role of every parameter, decided by the type of the
  module that holds it rather than by its name: a block weight (stored once, run by every slot of
  that block), a slot's adapter factor (inside a ``SharedLoraLinear``, outside its base layer), a
  slot's output feature norm (the norm of an ``OutputNorm``), a slot's private block norm (a norm of
  the layout when the slot owns its norms), or a top-module parameter. Verification, trainable
  sets, materialisation and the compact format all ask these functions.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from flexigpt.shared.engine.adapters import OutputNorm, SharedLoraLinear
from flexigpt.shared.engine.layout import ArchLayout, get_layout
from flexigpt.shared.engine.plan import SlotSpec

BLOCK = "shared"
"""A block weight: the same Parameter in every slot that runs the block."""
ADAPTER = "adapter"
"""A slot's LoRA factor."""
OUT_NORM = "out_norm"
"""A slot's output feature norm gamma."""
OWN_NORM = "own_norm"
"""A slot's private copy of a block norm (input / post-attention norm)."""
TOP = "top"
"""A parameter of a top module (embeddings, final norm, head), outside the decoder stack."""
SLOT_ROLES: tuple[str, ...] = (ADAPTER, OUT_NORM, OWN_NORM)
"""The roles of the parameters a slot owns (everything but block weights)."""


# ---------------------------------------------------------------------------------------------
# skeleton
# ---------------------------------------------------------------------------------------------
def skeleton(
    cls: type[PreTrainedModel],
    config: PretrainedConfig,
    *,
    top: nn.Module | None = None,
    copy_top: bool = False,
    layers: nn.ModuleList | None = None,
) -> PreTrainedModel:
    """A `cls` model of `config` built on the meta device, then given its real parts.

    Args:
        cls: the CausalLM class to build (a source class or its shared-block subclass).
        config: its config (layer count and per-layer fields already those of the stack).
        top: a model of the same family whose top modules are put in: the very module objects,
            or deep copies with ``copy_top`` (copied together, so a tied head stays tied). None
            leaves the top modules' parameters on the meta device for the caller to fill (a
            checkpoint loader) and rebuilds the buffer-only modules (rotary embedding) from the
            config, since no file stores their buffers.
        copy_top: deep-copy the top modules of `top` instead of sharing them.
        layers: the decoder stack to put in; None leaves the meta layers of `config`.

    Returns:
        The model (its training mode and generation config are the caller's to set).

    Raises:
        RuntimeError: `top` and `layers` were given but a tensor is still on the meta device
            (the architecture's layout does not list every top module).
    """
    layout = get_layout(config)
    with torch.device("meta"):
        model = cls(config)
    if top is not None:
        modules = [top.get_submodule(path) for path in layout.top_modules]
        if copy_top:
            modules = copy.deepcopy(modules)
        for path, module in zip(layout.top_modules, modules, strict=True):
            model.set_submodule(path, module)
    else:
        for path in layout.buffer_modules:
            model.set_submodule(path, type(model.get_submodule(path))(config=config))
    if layers is not None:
        model.set_submodule(layout.layers_path, layers)
        if top is not None:
            left = [
                n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"
            ]
            if left:
                raise RuntimeError(
                    f"{cls.__name__}: tensors {left[:5]} were not carried over (the {layout.model_type} "
                    "layout's top_modules miss a module)"
                )
    return model


# ---------------------------------------------------------------------------------------------
# parameter roles
# ---------------------------------------------------------------------------------------------
def _module_roles(layer: nn.Module, spec: SlotSpec, layout: ArchLayout) -> dict[int, str]:
    """Role of the parameters held directly by each module of a slot's layer (by module id)."""
    roles: dict[int, str] = {}
    for module in layer.modules():
        if isinstance(module, SharedLoraLinear):
            # Everything a LoRA layer holds beside its base layer (the shared linear) is the adapter.
            base = {id(m) for m in module.base_layer.modules()}
            roles.update((id(m), ADAPTER) for m in module.modules() if id(m) not in base)
        elif isinstance(module, OutputNorm):
            roles.update((id(m), OUT_NORM) for m in module.out_norm.modules())
    # The block norms are found by the layout's paths, not by their class: a model may use the same
    # norm class elsewhere in a layer (Qwen3's q_norm / k_norm), which no slot owns.
    for path in layout.norms:
        roles[id(layer.get_submodule(path))] = OWN_NORM if spec.own_norms else BLOCK
    return roles


def slot_param_roles(
    layer: nn.Module, spec: SlotSpec, layout: ArchLayout
) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(name inside the layer, role, parameter) for every parameter of a slot's decoder layer.

    The names are ``layer.named_parameters()``'s (wrappers included: ``o_proj.base_layer.weight``);
    the role is ``BLOCK``, ``ADAPTER``, ``OUT_NORM`` or ``OWN_NORM``.
    """
    roles = _module_roles(layer, spec, layout)
    for module_name, module in layer.named_modules():
        role = roles.get(id(module), BLOCK)
        for name, p in module.named_parameters(prefix=module_name, recurse=False):
            yield name, role, p


def top_params(model: nn.Module, layout: ArchLayout) -> Iterator[tuple[str, nn.Parameter]]:
    """(model-level name, parameter) of the top modules (role ``TOP``); a tied head's weight once."""
    seen: set[int] = set()
    for path in layout.top_modules:
        for name, p in model.get_submodule(path).named_parameters(prefix=path):
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p
