"""The parts of a model: roles by module type, and the meta skeleton with transplanted top modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexigpt.shared.engine.adapters import OutputNorm, SharedLoraLinear
from flexigpt.shared.engine.apply import SOURCE_CLASSES, apply_plan
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.parts import (
    ADAPTER,
    BLOCK,
    OUT_NORM,
    OWN_NORM,
    skeleton,
    slot_param_roles,
    top_params,
)
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model


def _plan(model_type: str) -> Plan:
    """Block 1 runs twice (the copy adapted, normed, with private norms); block 2 once, adapted."""
    ad = AdapterSpec(4, init="lora")
    return Plan(
        model_type,
        4,
        (
            SlotSpec(0),
            SlotSpec(1),
            SlotSpec(1, adapter=ad, out_norm=OutNormSpec(0.1), own_norms=True),
            SlotSpec(2, adapter=AdapterSpec(2, ("q", "down"), init="lora")),
            SlotSpec(3, out_norm=OutNormSpec(0.2)),
        ),
    )


def test_roles_follow_the_module_that_holds_the_parameter(arch: str) -> None:
    source = tiny_model(arch)
    model = apply_plan(source, _plan(source.config.model_type))
    layout = get_layout(model.config)
    for i, (spec, layer) in enumerate(zip(model.plan.slots, model.model.layers, strict=True)):
        roles: dict[str, set[int]] = {BLOCK: set(), ADAPTER: set(), OUT_NORM: set(), OWN_NORM: set()}
        for _, role, p in slot_param_roles(layer, spec, layout):
            roles[role].add(id(p))
        assert sum(map(len, roles.values())) == len(list(layer.parameters())), f"slot {i}"
        lora = [m for m in layer.modules() if isinstance(m, SharedLoraLinear)]
        assert roles[ADAPTER] == {id(p) for m in lora for d in (m.lora_A, m.lora_B) for p in d.parameters()}
        assert bool(roles[ADAPTER]) == bool(spec.adapter)
        assert roles[OUT_NORM] == {
            id(m.out_norm.weight) for m in layer.modules() if isinstance(m, OutputNorm)
        }
        assert len(roles[OUT_NORM]) == (2 if spec.out_norm else 0)
        norms = {id(p) for n in layout.norms for p in layer.get_submodule(n).parameters()}
        assert roles[OWN_NORM] == (norms if spec.own_norms else set())
        # A block weight is the source block's very Parameter (its norms too, unless the slot owns
        # private copies); nothing else is.
        src = source.model.layers[spec.block]
        src_norms = {id(p) for n in layout.norms for p in src.get_submodule(n).parameters()}
        want = {id(p) for p in src.parameters()} - (src_norms if spec.own_norms else set())
        assert roles[BLOCK] == want, f"slot {i}"
    # Top modules: every parameter outside the decoder stack, a tied head once.
    names = [n for n, _ in top_params(model, layout)]
    assert names == [n for n, _ in model.named_parameters() if not n.startswith("model.layers.")]
    assert ("lm_head.weight" in names) != model.config.tie_word_embeddings


def test_skeleton_takes_the_top_modules_and_layers_it_is_given() -> None:
    source = tiny_model("llama3")  # tied embeddings
    cls, layout = SOURCE_CLASSES["llama"], get_layout(source.config)
    view = skeleton(cls, source.config, top=source, layers=source.model.layers)
    assert all(
        view.get_submodule(p) is source.get_submodule(p) for p in (*layout.top_modules, layout.layers_path)
    )
    copied = skeleton(cls, source.config, top=source, copy_top=True, layers=source.model.layers)
    assert copied.model.embed_tokens is not source.model.embed_tokens
    assert copied.lm_head.weight is copied.model.embed_tokens.weight, "copied together, the head stays tied"
    assert torch.equal(copied.model.embed_tokens.weight, source.model.embed_tokens.weight)
    # Without a donor, only the buffer modules are real: a loader fills the rest.
    bare = skeleton(cls, source.config)
    assert bare.model.rotary_emb.inv_freq.device.type == "cpu"
    assert {p.device.type for p in bare.parameters()} == {"meta"}
    with torch.device("meta"):
        meta_layers = nn.ModuleList(type(source.model.layers[0])(source.config, i) for i in range(4))
    with pytest.raises(RuntimeError, match=r"were not carried over"):
        skeleton(cls, source.config, top=source, layers=meta_layers)
