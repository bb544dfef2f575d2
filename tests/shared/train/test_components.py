"""The trainer's arithmetic: FLOPs per token by the work done (hand counts on a tiny config), the
learning-rate schedule at known steps, and the tokens/s window."""

from __future__ import annotations

import math
import time

import pytest
import torch

from flexigpt.shared.engine.apply import apply_plan, set_trainable
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model
from flexigpt.shared.recipe import TrainSection
from flexigpt.shared.train.components import Throughput, build_scheduler, flop_count, lr_factor

# The tiny LLaMA-2 (MHA): hidden 64, 4 heads of 16, MLP 160, vocabulary 128, untied head.
T = 32
BLOCK = 4 * 64 * 64 + 3 * 64 * 160  # q, k, v, o + gate, up, down = 47,104 matrix parameters
HEAD = 128 * 64  # 8,192
ATTN = T * 64  # sequence length x heads x head_dim
R = 4
ADAPTER = R * ((64 + 64) * 4 + (64 + 160) * 3)  # rank-4 A and B on all seven projections = 4,736


def _model(slots: list[SlotSpec], rule: str):
    plan = Plan("llama", 4, tuple(slots))
    model = apply_plan(tiny_model("llama2", num_layers=4, hidden=64, heads=4, vocab=128), plan)
    set_trainable(model, rule)
    return model


def test_all_trainable_is_six_n_plus_attention() -> None:
    c = flop_count(_model([SlotSpec(b) for b in range(4)], "all"), T)
    assert c.lowest_trainable_slot == 0
    assert c.forward == 2 * (4 * BLOCK + HEAD) + 4 * 4 * ATTN
    assert c.activation_grad == 2 * (4 * BLOCK + HEAD) + 8 * 4 * ATTN
    assert c.weight_grad == 2 * (4 * BLOCK + HEAD)
    assert c.total == 6 * (4 * BLOCK + HEAD) + 12 * 4 * ATTN  # PaLM's count


def test_pruned_adapters_and_norms_count_backward_from_the_lowest_trainable_slot() -> None:
    # FlexiGPT-like: block 2 removed, slot 2 runs block 1 with adapters and an output norm
    slots = [SlotSpec(0), SlotSpec(1), SlotSpec(1, AdapterSpec(R), OutNormSpec()), SlotSpec(3)]
    c = flop_count(_model(slots, "adapters+norms"), T)
    assert c.lowest_trainable_slot == 2
    assert c.forward == 2 * (4 * BLOCK + ADAPTER + HEAD) + 4 * 4 * ATTN
    assert c.activation_grad == 2 * (2 * BLOCK + ADAPTER + HEAD) + 8 * 2 * ATTN
    assert c.weight_grad == 2 * ADAPTER  # frozen weights get no weight gradient; norms are not matmuls
    # the count it replaces: 6 x every slot's parameters, as if everything trained
    assert c.total < 0.75 * (6 * (4 * BLOCK + ADAPTER + HEAD) + 12 * 4 * ATTN)


def test_grown_model_with_only_the_new_slots_trainable() -> None:
    # 4 blocks grown to 6 slots: blocks 1 and 3 run twice, the second use (slots 2 and 5) with adapters
    new = dict(adapter=AdapterSpec(R), out_norm=OutNormSpec())
    slots = [SlotSpec(0), SlotSpec(1), SlotSpec(1, **new), SlotSpec(2), SlotSpec(3), SlotSpec(3, **new)]
    c = flop_count(_model(slots, "adapters"), T)
    assert c.lowest_trainable_slot == 2
    assert c.forward == 2 * (6 * BLOCK + 2 * ADAPTER + HEAD) + 4 * 6 * ATTN
    assert c.activation_grad == 2 * (4 * BLOCK + 2 * ADAPTER + HEAD) + 8 * 4 * ATTN
    assert c.weight_grad == 2 * 2 * ADAPTER
    # trainable 'all' on the same plan: the shared blocks' weight gradients count once per slot that runs them
    every = flop_count(_model(slots, "all"), T)
    assert every.weight_grad == 2 * (6 * BLOCK + 2 * ADAPTER + HEAD)


def test_learning_rate_at_known_steps_and_after_a_resume() -> None:
    warmup, total, floor = 10, 110, 0.1
    assert lr_factor(0, warmup, total, floor) == pytest.approx(0.1)
    assert lr_factor(warmup - 1, warmup, total, floor) == 1.0  # the warm-up ends at the peak
    assert lr_factor(warmup, warmup, total, floor) == 1.0  # and the cosine starts there
    assert lr_factor(60, warmup, total, floor) == pytest.approx(0.55)  # midpoint of the decay
    last = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 99 / 100))
    assert lr_factor(total - 1, warmup, total, floor) == pytest.approx(last)  # the last step
    assert lr_factor(total, warmup, total, floor) == pytest.approx(floor)

    train = TrainSection(lr=2e-3, warmup_steps=warmup, min_lr_ratio=floor, max_steps=total, grad_accum=1)

    def scheduler():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=train.lr)
        return opt, build_scheduler(opt, train, total)

    opt, sched = scheduler()
    for _ in range(30):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    opt2, sched2 = scheduler()  # a restart: a new optimizer and schedule, then the saved state
    sched2.load_state_dict(saved)
    for o, s in ((opt, sched), (opt2, sched2)):
        for _ in range(30):
            o.step()
            s.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.55)


def test_tokens_per_second_leaves_out_paused_time() -> None:
    w = Throughput()
    w.tokens = 1000
    time.sleep(0.05)
    with w.paused():  # an evaluation or a checkpoint
        time.sleep(0.5)
    assert w.rate() > 1000 / 0.3
    w.restart()
    assert w.tokens == 0
