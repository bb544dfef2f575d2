"""train.stop_at_step: a run cut into slices ends bit-identical to one uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexigpt.shared.recipe import recipe_from_dict
from flexigpt.shared.train.export import consolidated_state_dict
from flexigpt.shared.train.state import list_checkpoints
from flexigpt.shared.train.trainer import train

from .trainkit import recipe_dict, workspace

pytestmark = pytest.mark.deepspeed


def test_a_run_stopped_at_a_step_and_resumed_equals_the_uninterrupted_run(tmp_path: Path, capsys) -> None:
    ws = workspace(tmp_path / "ws")
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    full = train(recipe_from_dict(recipe_dict(ws, whole, export="compact")))
    first = train(recipe_from_dict(recipe_dict(ws, sliced, export="compact", stop_at_step=3)))
    # stopped after step 3 with its checkpoint (off the checkpoint_every=4 grid), nothing exported
    assert first.step == 3 and first.interrupted_by is None
    assert [p.name for p in list_checkpoints(sliced / "checkpoints")] == ["step_00000003"]
    assert not (sliced / "final").exists() and "stopped at step 3 of 8" in capsys.readouterr().out
    # a step at or past the end runs to the end; the run resumes at 3 with the same schedule
    rest = train(recipe_from_dict(recipe_dict(ws, sliced, export="compact", stop_at_step=8)))
    assert rest.step == 8 and "resumed from" in capsys.readouterr().out
    assert (sliced / "final" / "model.safetensors").is_file()
    a = consolidated_state_dict(whole / "checkpoints" / "step_00000008")
    b = consolidated_state_dict(sliced / "checkpoints" / "step_00000008")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rest.tokens_seen == full.tokens_seen and rest.last_loss == full.last_loss
