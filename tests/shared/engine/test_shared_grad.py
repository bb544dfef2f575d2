"""Shared weights' gradients summed inside the GEMMs: the same gradients as plain autograd, one hand-over."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flexigpt.shared.engine.apply import apply_plan, materialize, set_trainable
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.shared_grad import SharedLinear, set_grad_accumulation
from flexigpt.shared.engine.tiny import tiny_model

BATCHES = [torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]


def _model(arch: str = "llama2", rule: str = "all") -> nn.Module:
    """6 slots over 4 blocks; block 1 runs three times (twice with adapters), block 2 twice."""
    targets = (
        ("q", "k", "v", "o", "up", "down") if arch == "opt" else ("q", "k", "v", "o", "gate", "up", "down")
    )
    ad = AdapterSpec(4, targets=targets, init="lora")
    reuse = dict(adapter=ad, out_norm=OutNormSpec(0.1), own_norms=True)
    slots = (
        SlotSpec(0),
        SlotSpec(1),
        SlotSpec(1, **reuse),
        SlotSpec(2),
        SlotSpec(2, **reuse),
        SlotSpec(1, **reuse),
    )
    model = apply_plan(tiny_model(arch, num_layers=4), Plan(tiny_model(arch).config.model_type, 4, slots))
    with torch.no_grad():  # non-zero adapters: every use of a block sees a different input
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    set_trainable(model, rule)
    set_grad_accumulation(model, True)
    return model.train()


def _grads(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for x in batches:  # several backwards: gradient accumulation
        model(x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# qwen2: q/k/v biases shared too; opt: a bias on every linear, no gate, LayerNorms with biases
@pytest.mark.parametrize("arch", ["llama2", "qwen2", "opt"])
def test_gradients_match_plain_autograd_over_accumulation_steps(arch: str) -> None:
    stack = apply_plan(tiny_model(arch), Plan.identity(tiny_model(arch).config.model_type, 4))
    assert not any(isinstance(m, SharedLinear) for m in stack.modules())  # no block runs twice
    model = _model(arch)
    plain = copy.deepcopy(model)
    set_grad_accumulation(plain, False)
    n_linears = 6 if arch == "opt" else 7
    assert (
        sum(isinstance(m, SharedLinear) for m in model.modules()) == n_linears * 5
    )  # the slots of blocks 1, 2
    want, got = _grads(plain, BATCHES), _grads(model, BATCHES)
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    # and they are the sum over the slots: the dense copy's per-slot gradients add up to them
    dense = materialize(model, keep_output_norm=True).train()
    dense.zero_grad(set_to_none=True)
    dense(BATCHES[0], labels=BATCHES[0]).loss.backward()
    one = _grads(model, BATCHES[:1])
    path = "model.decoder.layers.{}.fc1.weight" if arch == "opt" else "model.layers.{}.mlp.up_proj.weight"
    name = path.format(1)
    parts = [dense.get_parameter(path.format(i)).grad for i in (1, 2, 5)]
    torch.testing.assert_close(one[name], sum(parts), rtol=1e-5, atol=1e-7)


def test_the_weight_gradient_is_handed_over_once_per_backward() -> None:
    model = _model()
    w = model.get_parameter("model.layers.1.self_attn.q_proj.weight")
    calls = []
    w.register_post_accumulate_grad_hook(lambda p: calls.append(p.grad.clone()))
    plain = copy.deepcopy(model)
    set_grad_accumulation(plain, False)
    first = _grads(plain, BATCHES[:1])["model.layers.1.self_attn.q_proj.weight"]
    _grads(model, BATCHES)
    assert len(calls) == 2  # one per backward, with the sum of three slots each time
    torch.testing.assert_close(calls[0], first, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(calls[1], w.grad)


def test_retained_graph_backward_twice_doubles_the_gradient() -> None:
    model = _model()
    model.zero_grad(set_to_none=True)
    loss = model(BATCHES[0], labels=BATCHES[0]).loss
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss.backward()
    for n, p in model.named_parameters():
        if n in first:
            torch.testing.assert_close(p.grad, 2 * first[n], msg=n)


def test_frozen_shared_weights_and_checkpointing_take_plain_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    from flexigpt.shared.engine import shared_grad

    model = _model(rule="adapters+norms")
    seen = []
    forward = shared_grad._SharedLinearFn.forward

    def counted(*args):  # noqa: ANN002, ANN202
        seen.append(1)
        return forward(*args)

    monkeypatch.setattr(shared_grad._SharedLinearFn, "forward", staticmethod(counted))
    _grads(model, BATCHES[:1])
    assert not seen  # frozen block: nothing extra runs
    set_trainable(model, "all")
    want = _grads(model, BATCHES[:1])
    assert len(seen) == 7 * 5
    seen.clear()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = _grads(model, BATCHES[:1])
    assert not seen  # recomputation replays forward inside backward: plain linear throughout
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_a_backward_out_of_stack_order_raises_instead_of_dropping_a_slot() -> None:
    model = _model()
    w = model.get_parameter("model.layers.2.self_attn.q_proj.base_layer.weight")
    layers = model.model.layers
    x = torch.randn(1, 4, w.shape[1])
    grad_pass = layers[1].self_attn.q_proj.grad_pass
    grad_pass.open(model.model)
    first = layers[1].self_attn.q_proj(x)  # use 1
    second = layers[2].self_attn.q_proj.base_layer(x)  # use 2, independent of use 1
    grad_pass.close()
    with pytest.raises(RuntimeError, match="use 1 of a shared weight ran backward where use 2 was due"):
        first.sum().backward()
    del second


def test_a_backward_from_a_middle_slot_raises_and_the_plain_path_serves_it() -> None:
    model = _model()
    x = BATCHES[0]
    # slot 3's output: block 2 runs in slot 3 and in slot 4 above it (block 1 in slots 1, 2 and 5)
    middle = model(x, output_hidden_states=True).hidden_states[4]
    with pytest.raises(RuntimeError, match="ran backward where use 2 was due"):
        middle.sum().backward()
    set_grad_accumulation(model, False)
    model.zero_grad(set_to_none=True)
    model(x, output_hidden_states=True).hidden_states[4].sum().backward()
    assert model.get_parameter("model.layers.1.mlp.up_proj.weight").grad.abs().sum() > 0
