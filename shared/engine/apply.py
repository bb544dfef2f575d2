"""The shared-block engine: apply a plan to a source model, verify it, materialise it.

``apply_plan`` builds a model of the source family whose decoder stack is the plan's slots. Every
slot is its own decoder-layer module with its own ``layer_idx`` (so the KV cache is right), but the
block weights it runs are the *same* ``nn.Parameter`` objects as every other slot running that
block: a block is stored once. Slot-owned parameters (LoRA factors ``lora_A``/``lora_B``, output
norm ``out_norm``, private norms) are distinct per slot.

The result is an instance of ``Shared<Family>ForCausalLM``, a thin subclass of the source class
that only changes how it is saved (the compact format) and knows its plan; everything else
(forward, ``generate``, losses) is transformers' own code.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace as dc_replace

import torch
from torch import nn
from transformers import (
    LlamaForCausalLM,
    MistralForCausalLM,
    OPTForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2ForCausalLM,
)

from flexigpt.shared.engine.adapters import OutputNorm, SharedLoraLinear, init_lora, lora_factors, make_lora
from flexigpt.shared.engine.layout import ArchLayout, get_layout
from flexigpt.shared.engine.parts import ADAPTER, BLOCK, OUT_NORM, skeleton, slot_param_roles
from flexigpt.shared.engine.plan import BlockShape, OutNormSpec, Plan, PlanError, SlotSpec
from flexigpt.shared.engine.shared_grad import install_shared_linears


class VerifyError(AssertionError):
    """A shared model breaks one of the engine's invariants."""


class SharedModelMixin:
    """What a shared-block model adds to its source CausalLM class."""

    plan: Plan
    source_config: PretrainedConfig
    idle_block_norms: dict[str, torch.Tensor]
    """``<block>.<norm>.weight`` -> the block's own norm, for blocks whose every slot has private
    norms: no slot runs them, yet the compact format stores every block whole."""

    def save_pretrained(self, save_directory: str, tokenizer: object | None = None, **kwargs: object) -> None:
        """Write the compact format (each physical block once); see ``checkpoint.save_compact``.

        transformers' ``is_main_process``, ``state_dict``, ``max_shard_size`` and
        ``safe_serialization`` are honoured; options the compact format cannot follow are refused.
        """
        from flexigpt.shared.engine.checkpoint import save_pretrained_compact

        save_pretrained_compact(self, save_directory, tokenizer=tokenizer, **kwargs)


class SharedLlamaForCausalLM(SharedModelMixin, LlamaForCausalLM):
    """LLaMA-2 / LLaMA-3 / TinyLlama with shared blocks."""


class SharedMistralForCausalLM(SharedModelMixin, MistralForCausalLM):
    """Mistral with shared blocks."""


class SharedQwen2ForCausalLM(SharedModelMixin, Qwen2ForCausalLM):
    """Qwen2 with shared blocks."""


class SharedOPTForCausalLM(SharedModelMixin, OPTForCausalLM):
    """OPT (pre-LN) with shared blocks."""


SHARED_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llama": SharedLlamaForCausalLM,
    "mistral": SharedMistralForCausalLM,
    "qwen2": SharedQwen2ForCausalLM,
    "opt": SharedOPTForCausalLM,
}
SOURCE_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "opt": OPTForCausalLM,
}


def output_norm_message(model_type: str, slots: Sequence[int]) -> str:
    """Why a model with output feature norms has no plain checkpoint (export and save say the same)."""
    return (
        f"slots {list(slots)} have output feature norms, which the plain {model_type} architecture "
        "cannot express; save the compact format instead (the shared model's save_pretrained, or "
        "'flexigpt-train export' without --materialize)"
    )


def check_plain_exportable(plan: Plan) -> None:
    """Refuse, before anything is written, a plan whose model has no plain checkpoint.

    Raises:
        PlanError: slots of the plan have output feature norms (``output_norm_message``).
    """
    with_norm = [i for i, s in enumerate(plan.slots) if s.out_norm is not None]
    if with_norm:
        raise PlanError(output_norm_message(plan.model_type, with_norm))


class KeptOutputNormMixin:
    """A materialised model that still holds output norms: it runs in memory but is never saved.

    Plain transformers would load such a directory as another model (the norm weights unexpected,
    nothing to apply them), so saving it is refused with the message of the plain export.
    """

    def save_pretrained(self, *_: object, **__: object) -> None:
        """Refuse: see the class docstring.

        Raises:
            PlanError: always, naming the slots with output norms.
        """
        layers = _layers(self, get_layout(self.config))  # type: ignore[arg-type]
        slots = [
            i for i, layer in enumerate(layers) if any(isinstance(m, OutputNorm) for m in layer.modules())
        ]
        raise PlanError(output_norm_message(self.config.model_type, slots))  # type: ignore[attr-defined]


KEPT_NORM_CLASSES: dict[str, type[PreTrainedModel]] = {
    mt: type(
        f"OutputNorm{cls.__name__}", (KeptOutputNormMixin, cls), {"__doc__": KeptOutputNormMixin.__doc__}
    )
    for mt, cls in SOURCE_CLASSES.items()
}


# ---------------------------------------------------------------------------------------------
# parameter naming
# ---------------------------------------------------------------------------------------------
def canonical_name(name: str) -> str:
    """A layer parameter's name with the wrappers removed (``o_proj.base_layer.weight`` -> ``o_proj.weight``)."""
    return name.replace(".base_layer", "")


def _set_param(module: nn.Module, path: str, value: nn.Parameter | torch.Tensor) -> None:
    owner_path, _, leaf = path.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if isinstance(value, nn.Parameter):
        setattr(owner, leaf, value)
    else:
        owner.register_buffer(leaf, value, persistent=leaf in owner.state_dict())


def _layers(model: nn.Module, layout: ArchLayout) -> nn.ModuleList:
    return model.get_submodule(layout.layers_path)


def stack_config(
    source_config: PretrainedConfig, blocks: Sequence[int], layout: ArchLayout
) -> PretrainedConfig:
    """The config of a stack whose layer i runs layer ``blocks[i]`` of the stack `source_config` describes.

    The layer count and every per-layer config list (Qwen2 ``layer_types``) follow ``blocks``;
    shared and dense (copied) stacks, and the speculative draft's view over some slots of a shared
    stack, are described the same way.
    """
    config = copy.deepcopy(source_config)
    config.num_hidden_layers = len(blocks)
    for field in layout.per_layer_config:
        values = getattr(source_config, field, None)
        if values is not None:
            setattr(config, field, [values[b] for b in blocks])
    return config


def _slot_config(source_config: PretrainedConfig, plan: Plan, layout: ArchLayout) -> PretrainedConfig:
    return stack_config(source_config, [s.block for s in plan.slots], layout)


# ---------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------
def check_plan_fits(plan: Plan, config: PretrainedConfig) -> ArchLayout:
    """Validate `plan` against a source config; returns the architecture layout."""
    layout = get_layout(config)
    if plan.model_type != config.model_type:
        raise PlanError(
            f"model_type={plan.model_type!r} does not match the source model ({config.model_type!r})"
        )
    if plan.num_source_layers != config.num_hidden_layers:
        raise PlanError(
            f"num_source_layers={plan.num_source_layers} does not match the source model "
            f"({config.num_hidden_layers} layers)"
        )
    plan.validate(layout.matrix_shapes(config))
    whole = layout.full_shape(config)
    full = (whole.intermediate_size, whole.num_attention_heads, whole.num_key_value_heads)
    for b, shape in plan.block_shapes.items():
        sizes = (shape.intermediate_size, shape.num_attention_heads, shape.num_key_value_heads)
        if any(n > m for n, m in zip(sizes, full, strict=True)):
            raise PlanError(
                f"block_shapes[{b}]={shape} is wider than the source model "
                f"(intermediate_size, heads, kv heads = {full})"
            )
        if shape.num_attention_heads // shape.num_key_value_heads != full[1] // full[2]:
            raise PlanError(
                f"block_shapes[{b}]: {shape.num_attention_heads} heads over {shape.num_key_value_heads} kv heads "
                f"breaks the source's {full[1] // full[2]} query heads per kv head"
            )
    return layout


def apply_plan(
    source: PreTrainedModel,
    plan: Plan,
    *,
    init_slot_params: bool = True,
    blocks: Callable[..., AbstractContextManager] | None = None,
) -> PreTrainedModel:
    """Build the shared-block model of `plan` from `source`.

    The source model is left unchanged, but the new model holds its very Parameters (nothing is
    copied): the two share storage, so training one changes the other. Blocks that no slot runs
    are simply not referenced; dropping the source then frees them. Several plans may be applied
    to one loaded source in turn. Only slot-owned parameters are created.

    Args:
        source: a loaded model of a supported family (see ``layout.SUPPORTED_MODEL_TYPES``).
        plan: the slot stack; validated against the source config first.
        init_slot_params: initialise adapters and private norms as the plan says (False when the
            slot parameters are loaded next; blocks the plan removed may then be absent).

    Returns:
        A ``Shared<Family>ForCausalLM`` with ``.plan`` and ``.source_config``, verified.

    Raises:
        PlanError: the plan does not fit the model (the message names the field).
    """
    layout = check_plan_fits(plan, source.config)
    src_layers = _layers(source, layout)
    config = _slot_config(source.config, plan, layout)
    slots = []
    for i, spec in enumerate(plan.slots):
        svd_from = spec.adapter.svd_from if spec.adapter and init_slot_params else None
        with blocks(spec.block, svd_from) if blocks and svd_from is not None else nullcontext():
            slots.append(
                _build_slot(
                    i, spec, config, plan.block_shapes.get(spec.block), layout, src_layers, init_slot_params
                )
            )
    model = skeleton(SHARED_CLASSES[layout.model_type], config, top=source, layers=nn.ModuleList(slots))
    install_shared_linears(model, layout.layers_path)
    model.plan = plan
    model.idle_block_norms = _idle_block_norms(plan, layout, src_layers)
    model.source_config = copy.deepcopy(source.config)
    model.generation_config = copy.deepcopy(source.generation_config)
    model.train(source.training)
    verify(model)
    return model


def _idle_block_norms(plan: Plan, layout: ArchLayout, src_layers: nn.ModuleList) -> dict[str, torch.Tensor]:
    # Plain tensors, not Parameters: no slot uses them, so they are neither trained nor counted.
    used = {s.block for s in plan.slots if not s.own_norms}
    out = {}
    for block in plan.physical_blocks:
        if block in used:
            continue
        for norm in layout.norms:
            for pname, p in src_layers[block].get_submodule(norm).named_parameters():
                if p.device.type != "meta":  # absent from a checkpoint written before they were stored
                    out[f"{block}.{norm}.{pname}"] = p.detach()
    return out


def _build_slot(
    index: int,
    spec: SlotSpec,
    config: PretrainedConfig,
    shape: BlockShape | None,
    layout: ArchLayout,
    src_layers: nn.ModuleList,
    init_slot_params: bool,
) -> nn.Module:
    src = src_layers[spec.block]
    with torch.device("meta"):
        layer = type(src)(layout.block_config(config, shape), layer_idx=index)
        layout.narrow_layer(layer, config, shape)
    # The block's weights: the very same Parameter objects (stored once, trained once), of the sizes
    # the plan gives the block (a narrowed block's tensors are smaller than the source config's).
    for name, p in src.named_parameters():
        want = layer.get_parameter(name).shape
        if p.shape != want:
            raise PlanError(
                f"slots[{index}]: block {spec.block}'s {name} has shape {tuple(p.shape)}, the plan's block shape "
                f"says {tuple(want)}"
            )
        _set_param(layer, name, p)
    for name, b in src.named_buffers():
        _set_param(layer, name, b)
    if spec.own_norms:
        # A replacement slot (svd_from = the block it replaces) starts from that block's norms,
        # so that a full-rank adapter reproduces it exactly; a copy starts from its source's.
        replaces = spec.adapter.svd_from if spec.adapter else None
        norm_src = src_layers[replaces] if init_slot_params and replaces is not None else src
        for norm in layout.norms:
            for pname, p in norm_src.get_submodule(norm).named_parameters():
                # loading fills private norms next, so a block norm a checkpoint lacks is not needed
                value = p.detach().clone() if p.device.type != "meta" else torch.empty(p.shape, dtype=p.dtype)
                _set_param(layer, f"{norm}.{pname}", nn.Parameter(value))
    if spec.adapter is not None:
        a = spec.adapter
        for target in a.targets:
            path = layout.linear_path(target)
            lora = make_lora(layer.get_submodule(path), a.rank_for(target), a.alpha)
            if init_slot_params:
                target_w = (
                    src_layers[a.svd_from].get_submodule(path).weight if a.svd_from is not None else None
                )
                init_lora(lora, a.init, target_w)
            layer.set_submodule(path, lora)
    if spec.out_norm is not None:
        _wrap_output_norms(layer, spec.out_norm, layout)
    return layer


def _wrap_output_norms(layer: nn.Module, spec: OutNormSpec, layout: ArchLayout) -> None:
    for path in (layout.attn_out, layout.mlp_out):
        inner = layer.get_submodule(path)
        # a LoRA wrapper's .weight is its base layer's: the block's weight, as in a fresh build
        layer.set_submodule(path, OutputNorm(inner, inner.weight, spec.gamma, spec.eps))


def add_output_norms(model: PreTrainedModel, plan: Plan) -> PreTrainedModel:
    """Give a built model the output norms of `plan`, which equals ``model.plan`` but for them.

    The slots whose spec gains an ``out_norm`` get the norm (gamma filled with the spec's value)
    around their attention and MLP outputs; nothing else changes, so trained adapters and norms
    stay as they are (a norm added after a first phase of training). The model is changed in place.

    Raises:
        PlanError: `plan` differs from the model's plan in anything but added output norms.
    """
    old = model.plan
    if len(old.slots) != len(plan.slots):
        raise PlanError(f"plan has {len(plan.slots)} slots, the model {len(old.slots)}")
    for i, (a, b) in enumerate(zip(old.slots, plan.slots, strict=True)):
        if dc_replace(b, out_norm=a.out_norm) != a or (a.out_norm is not None and a.out_norm != b.out_norm):
            raise PlanError(f"slots[{i}]: the plans differ in more than an added output norm")
    layout = get_layout(model.config)
    layers = _layers(model, layout)
    for i, (a, b) in enumerate(zip(old.slots, plan.slots, strict=True)):
        if a.out_norm is None and b.out_norm is not None:
            _wrap_output_norms(layers[i], b.out_norm, layout)
    model.plan = plan
    verify(model)
    return model


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------
def verify(model: PreTrainedModel) -> None:
    """Check the invariants of a shared model; raise VerifyError naming the first broken one.

    Invariants: slot count equals the plan and ``config.num_hidden_layers``; every slot's
    ``layer_idx`` is its position; slots running the same block hold the same Parameter objects
    (same storage) for every shared tensor, and distinct ones for slot-owned tensors; adapters and
    output norms are exactly where the plan puts them, with the planned rank; no tensor is left on
    the meta device; per-layer config fields have one entry per slot.
    """
    plan: Plan = model.plan
    layout = get_layout(model.config)
    layers = _layers(model, layout)
    _check(len(layers) == plan.num_slots, f"{len(layers)} layers but the plan has {plan.num_slots} slots")
    _check(
        model.config.num_hidden_layers == plan.num_slots,
        f"config.num_hidden_layers={model.config.num_hidden_layers}, plan has {plan.num_slots} slots",
    )
    for field in layout.per_layer_config:
        values = getattr(model.config, field, None)
        _check(
            values is None or len(values) == plan.num_slots, f"config.{field} has {len(values or [])} entries"
        )
    owners: dict[int, dict[str, nn.Parameter]] = {}
    seen_owned: set[int] = set()
    for i, (spec, layer) in enumerate(zip(plan.slots, layers, strict=True)):
        for carrier in layout.layer_idx_carriers:
            idx = layer.get_submodule(carrier).layer_idx
            _check(idx == i, f"slot {i}: {carrier}.layer_idx={idx}, expected {i}")
        shared = {}
        for name, role, p in slot_param_roles(layer, spec, layout):
            _check(p.device.type != "meta", f"slot {i}: parameter {name} is still on the meta device")
            if role == BLOCK:
                shared[canonical_name(name)] = p
            else:
                _check(id(p) not in seen_owned, f"slot {i}: slot-owned parameter {name} is shared")
                seen_owned.add(id(p))
        # every shared tensor of a block is one Parameter, whichever slot runs the block
        ref = owners.setdefault(spec.block, {})
        for name, p in shared.items():
            q = ref.setdefault(name, p)
            _check(
                p is q and p.data_ptr() == q.data_ptr(),
                f"slot {i}: {name} is not the same Parameter as block {spec.block}'s",
            )
        _verify_slot_modules(i, spec, layer, layout)
    for name, p in model.named_parameters():
        _check(p.device.type != "meta", f"parameter {name} is still on the meta device")


def _verify_slot_modules(i: int, spec: SlotSpec, layer: nn.Module, layout: ArchLayout) -> None:
    loras = {n: m for n, m in layer.named_modules() if isinstance(m, SharedLoraLinear)}
    want = {layout.linear_path(t) for t in spec.adapter.targets} if spec.adapter else set()
    have = {canonical_name(n) for n in loras}
    _check(have == want, f"slot {i}: adapters on {sorted(have)}, plan says {sorted(want)}")
    for target in spec.adapter.targets if spec.adapter else ():
        a, _, _ = lora_factors(loras[_lora_name(layer, layout.linear_path(target))])
        want_r = spec.adapter.rank_for(target)
        _check(
            a.shape[0] == want_r, f"slot {i}: adapter on {target!r} has rank {a.shape[0]}, plan says {want_r}"
        )
    norms = {canonical_name(n) for n, m in layer.named_modules() if isinstance(m, OutputNorm)}
    want_norms = {layout.attn_out, layout.mlp_out} if spec.out_norm else set()
    _check(norms == want_norms, f"slot {i}: output norms on {sorted(norms)}, plan says {sorted(want_norms)}")


def _lora_name(layer: nn.Module, path: str) -> str:
    for name, m in layer.named_modules():
        if isinstance(m, SharedLoraLinear) and canonical_name(name) == path:
            return name
    raise VerifyError(f"no adapter on {path}")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise VerifyError(message)


# ---------------------------------------------------------------------------------------------
# slot-owned parameters, trainable sets
# ---------------------------------------------------------------------------------------------
TRAINABLE_RULES: tuple[str, ...] = ("adapters", "adapters+norms", "all")


def iter_slot_params(model: PreTrainedModel) -> Iterator[tuple[int, str, str, nn.Parameter]]:
    """(slot, name inside the slot's layer, role, parameter) for every slot-owned parameter."""
    layout = get_layout(model.config)
    for i, (spec, layer) in enumerate(zip(model.plan.slots, _layers(model, layout), strict=True)):
        for name, role, p in slot_param_roles(layer, spec, layout):
            if role != BLOCK:
                yield i, name, role, p


def expected_trainable(plan: Plan, config: PretrainedConfig, rule: str) -> int:
    """Number of trainable parameters `rule` gives for `plan` on a source `config`, from the plan alone."""
    if rule not in TRAINABLE_RULES:
        raise PlanError(f"trainable rule {rule!r} is unknown; allowed: {list(TRAINABLE_RULES)}")
    layout = get_layout(config)
    h = config.hidden_size
    adapters = sum(
        s.adapter.rank_for(t) * sum(layout.matrix_shapes(config, plan.block_shapes.get(s.block))[t])
        for s in plan.slots
        if s.adapter
        for t in s.adapter.targets
    )
    # a block norm is a weight (RMSNorm) or a weight and a bias (LayerNorm); an output norm a weight
    block_norms = len(layout.norms) * layout.norm_param_count(config)
    norms = sum((2 * h if s.out_norm else 0) + (block_norms if s.own_norms else 0) for s in plan.slots)
    if rule == "adapters":
        return adapters
    if rule == "adapters+norms":
        return adapters + norms
    # A block's own norms are stored only if some slot running it uses them (own_norms=False).
    uses_block_norms = {s.block for s in plan.slots if not s.own_norms}
    blocks = sum(
        layout.block_param_count(config, plan.block_shapes.get(b)) - block_norms for b in plan.physical_blocks
    )
    return adapters + norms + blocks + block_norms * len(uses_block_norms) + layout.top_param_count(config)


def set_trainable(model: PreTrainedModel, rule: str) -> int:
    """Freeze everything, then unfreeze by `rule`; assert the count the plan predicts.

    Rules: ``adapters`` (LoRA factors only), ``adapters+norms`` (plus output norms and private
    norms of slots), ``all`` (every parameter, shared blocks included: a shared block then gets the
    gradients of every slot that runs it).

    Returns:
        The number of trainable parameters (each shared Parameter counted once).
    """
    if rule not in TRAINABLE_RULES:
        raise PlanError(f"trainable rule {rule!r} is unknown; allowed: {list(TRAINABLE_RULES)}")
    roles = {"adapters": {"adapter"}, "adapters+norms": {"adapter", "out_norm", "own_norm"}}.get(rule)
    for p in model.parameters():
        p.requires_grad_(roles is None)
    if roles is not None:
        for _, _, role, p in iter_slot_params(model):
            p.requires_grad_(role in roles)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    want = expected_trainable(model.plan, model.source_config, rule)
    if count != want:
        raise VerifyError(f"trainable rule {rule!r}: {count} trainable parameters, the plan predicts {want}")
    return count


def stored_param_count(model: PreTrainedModel) -> int:
    """Parameters stored by the model, each shared Parameter once."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# materialise
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def materialize(model: PreTrainedModel, *, keep_output_norm: bool = False) -> PreTrainedModel:
    """A plain model of the source class: every slot gets private copies, adapters merged in.

    The shared model is not modified. Output feature norms have no counterpart in the source
    architecture (a per-token normalisation cannot be folded into a linear layer), so a plan with
    output norms is refused unless ``keep_output_norm=True``, which keeps them as extra modules:
    the result then runs in memory (evaluation, generation) but is not a plain checkpoint, and its
    ``save_pretrained`` refuses with the message of the plain export.

    Raises:
        PlanError: the plan has output norms and ``keep_output_norm`` is False.
    """
    plan: Plan = model.plan
    with_norm = [i for i, s in enumerate(plan.slots) if s.out_norm is not None]
    if with_norm and not keep_output_norm:
        raise PlanError(
            output_norm_message(plan.model_type, with_norm)
            + ", or pass keep_output_norm=True for an in-memory model"
        )
    layout = get_layout(model.config)
    config = copy.deepcopy(model.config)
    new_layers = []
    for i, (spec, layer) in enumerate(zip(plan.slots, _layers(model, layout), strict=True)):
        with torch.device("meta"):
            dense = type(layer)(config, layer_idx=i)
        full = {name: p.shape for name, p in dense.named_parameters()}
        for name, role, p in slot_param_roles(layer, spec, layout):
            if role in (ADAPTER, OUT_NORM):  # merged / re-wrapped below
                continue
            clone = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            _set_param(dense, canonical_name(name), clone)
        for name, m in layer.named_modules():
            if isinstance(m, SharedLoraLinear):
                w = dense.get_submodule(canonical_name(name)).weight
                w.add_(m.delta_weight().to(w.dtype))
        # A narrowed block gets its removed units and heads back as zeros (at the end: units and
        # heads are unordered), which the uniform plain architecture needs and which changes nothing.
        for name, shape in full.items():
            p = dense.get_parameter(name)
            if p.shape != shape:
                padded = p.new_zeros(shape)
                padded[tuple(slice(0, n) for n in p.shape)] = p
                _set_param(dense, name, nn.Parameter(padded, requires_grad=p.requires_grad))
        for name, m in layer.named_modules():
            if isinstance(m, OutputNorm):
                path = canonical_name(name)
                wrapped = OutputNorm(dense.get_submodule(path), m.out_norm.weight, 0.0, m.out_norm.eps)
                wrapped.out_norm.weight.copy_(m.out_norm.weight)
                dense.set_submodule(path, wrapped)
        new_layers.append(dense)
    # a model that keeps output norms is a class whose save_pretrained refuses: it is no plain checkpoint
    cls = (KEPT_NORM_CLASSES if with_norm else SOURCE_CLASSES)[layout.model_type]
    plain = skeleton(cls, config, top=model, copy_top=True, layers=nn.ModuleList(new_layers))
    if config.tie_word_embeddings:
        plain.get_output_embeddings().weight = plain.get_input_embeddings().weight
    plain.generation_config = copy.deepcopy(model.generation_config)
    plain.train(model.training)
    return plain
