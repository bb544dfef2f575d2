"""A block run by two slots, every parameter trained, through a ZeRO-2 / ZeRO-3 checkpoint and back.

Shared weights are a known trap of ZeRO consolidation: stage 2 stores a tied parameter under one
name only, and re-tying by storage address fails once stage 3 has partitioned the tensors. The
round trip here goes through DeepSpeed's own ``zero_to_fp32`` and the trainer's export, and
compares with the weights the engine trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexigpt.shared.recipe import recipe_from_dict
from flexigpt.shared.train.trainer import train

from .trainkit import REPO_ROOT, recipe_dict, workspace

pytestmark = pytest.mark.deepspeed


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return workspace(tmp_path_factory.mktemp("ws"))


@pytest.mark.parametrize("stage", ["2", "3"])
def test_shared_block_round_trips_through_a_zero_checkpoint(stage: str, ws, tmp_path: Path) -> None:
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    from flexigpt.shared.engine.apply import verify
    from flexigpt.shared.train.components import build_model

    ds_config = json.loads((REPO_ROOT / f"ds_configs/zero{stage}.json").read_text())
    # partition every tensor, however small (the default keeps small ones whole on every rank)
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    d = recipe_dict(
        ws,
        tmp_path / "run",
        ds_config=str(tmp_path / "ds.json"),
        trainable="all",
        lr=1e-2,
        max_steps=3,
        checkpoint_every=3,
        export="compact",
    )
    recipe = recipe_from_dict(d)
    model = build_model(recipe.model, torch.float32)
    # block 1 is run by slot 1 and by slot 4 (with an adapter): one Parameter, two names
    q1, q4 = "model.layers.1.self_attn.q_proj.weight", "model.layers.4.self_attn.q_proj.base_layer.weight"
    names = dict(model.named_parameters(remove_duplicate=False))
    assert names[q1] is names[q4]
    before = names[q1].detach().clone()
    res = train(recipe, model=model)
    assert res.step == 3 and res.checkpoint is not None

    # what the engine trained (stage 3 keeps only partitions in the module: gather them)
    assert (names[q1].numel() == 0) == (stage == "3")
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        live = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    assert not torch.equal(live[q1], before)  # the shared block did train

    # DeepSpeed's own consolidation: every name of every parameter, shared aliases included
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(res.checkpoint.parent), tag=res.checkpoint.name)
    missing = sorted(set(live) - set(fp32))
    assert not missing, missing
    for name, value in live.items():
        assert torch.equal(fp32[name], value), name

    # the trainer's export: the compact model has the trained values and the sharing back
    final = AutoModelForCausalLM.from_pretrained(res.exported[0])
    verify(final)
    loaded = dict(final.named_parameters(remove_duplicate=False))
    assert loaded[q1] is loaded[q4]
    assert len({id(p) for p in loaded.values()}) == len({id(p) for p in names.values()})
    for name, value in live.items():
        assert torch.equal(loaded[name].detach(), value), name
