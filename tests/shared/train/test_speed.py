"""The trainer's speed options on CPU (gloo): fused AdamW under ZeRO-1/2/3 steps like the foreach
implementation and resumes its checkpoints; compiled slots train like eager ones (slow). The
refused values and combinations are in test_train_bad_input.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flexigpt.shared.recipe import recipe_from_dict
from flexigpt.shared.train.export import consolidated_state_dict
from flexigpt.shared.train.trainer import train

from .trainkit import recipe_dict, workspace

pytestmark = pytest.mark.deepspeed
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture(autouse=True)
def _no_leaked_launcher_env():
    before = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    assert {k: os.environ.get(k) for k in DIST_ENV} == before


def _losses(tb: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(tb)).Reload().Scalars("train/loss")]


def _train(ws: dict[str, Path], out: Path, **kw) -> dict[str, torch.Tensor]:
    base = {"trainable": "all", "lr": 3e-3, "max_steps": 4, "log_every": 1, "checkpoint_every": 4}
    d = recipe_dict(ws, out, **{**base, **kw})
    result = train(recipe_from_dict(d))
    assert result.step == 4
    return consolidated_state_dict(result.checkpoint)


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_fused_adamw_steps_like_foreach_under_zero(
    stage: str, ws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # count the calls of PyTorch's fused AdamW kernel (AdamW looks it up on `torch` at each step)
    calls = []
    kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    cfg = f"ds_configs/zero{stage}.json"
    runs, fused_calls = {}, {}
    for impl in ("foreach", "fused"):
        before = len(calls)
        weights = _train(ws, tmp_path / impl, ds_config=cfg, optimizer_impl=impl)
        runs[impl] = (_losses(tmp_path / impl / "tb"), weights)
        fused_calls[impl] = len(calls) - before
    # one call per parameter group and step (decay and no-decay groups, 4 steps)
    assert fused_calls == {"foreach": 0, "fused": 8}, fused_calls
    (loss_a, w_a), (loss_b, w_b) = runs["foreach"], runs["fused"]
    assert len(loss_a) == 4 and loss_a == pytest.approx(loss_b, rel=1e-5, abs=0), (loss_a, loss_b)
    assert sorted(w_a) == sorted(w_b)
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_foreach_checkpoint_resumes_with_fused_adamw(ws, tmp_path: Path) -> None:
    # optimizer_impl changes kernels, not the optimizer state: a run may switch it when it resumes
    whole = _train(ws, tmp_path / "whole", checkpoint_every=2, optimizer_impl="foreach")
    d = recipe_dict(
        ws, tmp_path / "split", trainable="all", lr=3e-3, max_steps=4, log_every=1, checkpoint_every=2
    )
    first = train(
        recipe_from_dict({**d, "train": {**d["train"], "stop_at_step": 2, "optimizer_impl": "foreach"}})
    )
    assert first.step == 2
    second = train(recipe_from_dict({**d, "train": {**d["train"], "optimizer_impl": "fused"}}))
    assert second.step == 4
    split = consolidated_state_dict(second.checkpoint)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-5, atol=1e-6, msg=k)


def test_optimizer_impl_picks_the_implementation() -> None:
    from flexigpt.shared.train.speed import adamw_kwargs

    assert adamw_kwargs("auto", torch.device("cuda", 0)) == {"fused": True}
    assert adamw_kwargs("auto", torch.device("cpu")) == {}
    assert adamw_kwargs("fused", torch.device("cpu")) == {"fused": True}
    assert adamw_kwargs("foreach", torch.device("cuda", 0)) == {"foreach": True}


@pytest.mark.slow
def test_compiled_slots_train_like_eager_and_checkpoint_the_same_names(ws, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    eager = _train(ws, tmp_path / "eager", checkpoint_every=2)
    # the compiled run stops at step 2 and resumes from its checkpoint (the compiled model loads it)
    kw = {"compile": True, "checkpoint_every": 2, "export": "compact"}
    d = recipe_dict(ws, tmp_path / "compiled", trainable="all", lr=3e-3, max_steps=4, log_every=1, **kw)
    counters.clear()
    first = train(recipe_from_dict({**d, "train": {**d["train"], "stop_at_step": 2}}))
    assert first.step == 2
    result = train(recipe_from_dict(d))
    assert result.step == 4
    # the slots did compile, whole: a plain slot and a reusing slot are distinct structures, and
    # evaluation-free training needs no more than a few graphs for them
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"], dict(
        counters["graph_break"]
    )
    compiled = consolidated_state_dict(result.checkpoint)
    assert list(compiled) == list(eager)  # no `_orig_mod.` or other wrapper names
    loss_e, loss_c = _losses(tmp_path / "eager" / "tb"), _losses(tmp_path / "compiled" / "tb")
    assert len(loss_c) == 4 and loss_c == pytest.approx(loss_e, rel=1e-4, abs=0), (loss_e, loss_c)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)
    final = AutoModelForCausalLM.from_pretrained(result.exported[0])
    assert final.plan.num_slots == 6
