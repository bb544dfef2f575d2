"""flexigpt-train export: refusals before anything is written, and the peft export of a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexigpt.shared.engine.plan import AdapterSpec, Plan, SlotSpec
from flexigpt.shared.recipe import recipe_from_dict
from flexigpt.shared.train.cli import main
from flexigpt.shared.train.trainer import train

from .trainkit import recipe_dict, workspace

pytestmark = pytest.mark.deepspeed


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return workspace(tmp_path_factory.mktemp("ws"))


def test_materialize_of_a_plan_with_output_norms_is_refused_before_writing(ws, tmp_path, capsys) -> None:
    # the workspace plan reuses blocks 1 and 2 with output norms (a grown / FlexiGPT-like model)
    train(recipe_from_dict(recipe_dict(ws, tmp_path / "run", max_steps=2, checkpoint_every=2)))
    ckpts = str(tmp_path / "run" / "checkpoints")
    for flag, why in (("--materialize", "have output feature norms"), ("--peft", "run by several slots")):
        assert main(["export", ckpts, str(tmp_path / "exp"), flag]) == 2
        err = capsys.readouterr().err
        assert f"flexigpt-train export: {flag}: " in err and why in err and "Traceback" not in err
        assert not (tmp_path / "exp").exists() and not list(tmp_path.glob("exp*"))
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "exp")]) == 2
    assert "neither a checkpoint directory" in capsys.readouterr().err


def test_peft_export_of_a_trained_shortgpt_lora_checkpoint(ws, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # ShortGPT+LoRA: block 2 removed, LoRA on every kept slot
    plan = Plan("llama", 4, tuple(SlotSpec(b, adapter=AdapterSpec(rank=4)) for b in (0, 1, 3)))
    plan.save(tmp_path / "plan.json")
    d = recipe_dict(ws, tmp_path / "run", max_steps=2, checkpoint_every=2, lr=0.05)
    d["model"]["plan"] = str(tmp_path / "plan.json")
    train(recipe_from_dict(d))
    assert main(["export", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "exp"), "--peft"]) == 0
    compact = AutoModelForCausalLM.from_pretrained(tmp_path / "exp", attn_implementation="eager")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "exp_peft" / "base", attn_implementation="eager")
    assert type(base).__name__ == "LlamaForCausalLM" and base.config.num_hidden_layers == 3
    tuned = PeftModel.from_pretrained(base, tmp_path / "exp_peft" / "adapter").eval()
    x = torch.arange(4, 36).view(1, 32)
    with torch.no_grad():
        want = compact(x).logits
        torch.testing.assert_close(tuned(x).logits, want, rtol=1e-5, atol=1e-5)
        with tuned.disable_adapter():  # the trained adapters are in the file
            assert (tuned(x).logits - want).abs().max() > 1e-4
