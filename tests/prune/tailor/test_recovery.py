"""FlexiGPT-style recovery of the stitched model: the removed positions become shared replacement
slots (a kept block of the chosen model plus SVD-initialised adapters and an output norm), trained
by the project's trainer with the recipe's train: and data: sections."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from flexigpt.prune.cli import main
from flexigpt.prune.tailor.stitch import StitchPlan
from flexigpt.shared.engine.plan import Plan

from .conftest import tailor_overrides
from .tailorkit import NUM_LAYERS

REPO = Path(__file__).resolve().parents[3]
RECIPE = str(REPO / "recipes" / "prune" / "tailor-local-tiny.yaml")


def _train(setting: dict[str, Path]) -> list[str]:
    return [
        "train={max_steps: 2, micro_batch: 2, grad_accum: 1, warmup_steps: 1, lr: 1.0e-3, export: compact}",
        "data.source=files",
        f"data.files=[{setting['calib']}]",
        "data.seq_len=16",
        "data.shuffle_buffer=4",
        "data.tokenize_batch=4",
    ]


def test_flexigpt_recovery_fills_the_removed_positions_with_reusing_slots_and_trains(
    tailor_setting, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    search = ["tailor.trials=8", "tailor.warm_start.heuristics=[top]"]
    recovery = ["tailor.recovery=flexigpt", "tailor.replace.rank=4", "tailor.selection.rank=8"]
    args = [RECIPE, *tailor_overrides(tailor_setting, out, *search, *recovery), *_train(tailor_setting)]
    assert main(args) == 0
    assert "[recovery] done: step 2" in capsys.readouterr().out

    chosen = StitchPlan.load(out / "stitch_plan.yaml")
    plan = Plan.load(out / "flexigpt" / "initial" / "plan.json")
    assert plan.num_slots == NUM_LAYERS and len(chosen.removed) == 2
    kept = [p.layer for p in chosen.positions]
    for i, slot in enumerate(plan.slots):
        # a reusing slot: a kept block, adapters from the removed layer, an output norm
        if i in chosen.removed:
            assert slot.block in kept and slot.adapter is not None and slot.adapter.svd_from == i
            assert slot.adapter.rank == 4 and slot.out_norm is not None
        else:
            assert slot.block == i and slot.adapter is None
    assert plan.notes["stitch_plan"]["positions"] == chosen.to_dict()["positions"]
    # the default gamma is measured on the calibration text: the norms start at the slots' own scale
    assert plan.notes["gamma_measured"]["mean"] > 0.05
    initial = AutoModelForCausalLM.from_pretrained(out / "flexigpt" / "initial")
    gammas = [p for n, p in initial.named_parameters() if "out_norm" in n and n.endswith("weight")]
    assert gammas and all(not torch.allclose(g, torch.ones_like(g)) for g in gammas)

    # the trained model is saved compact (the blocks stored once) and loads with from_pretrained
    final = out / "flexigpt" / "final"
    assert (
        json.loads((final / "plan.json").read_text())["slots"]
        == json.loads((out / "flexigpt" / "initial" / "plan.json").read_text())["slots"]
    )
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.plan.removed_blocks == tuple(sorted(chosen.removed))
    assert len(model.model.layers) == NUM_LAYERS
    assert torch.isfinite(model(torch.tensor([[4, 7, 20]])).logits).all()

    # a rerun keeps the finished search and the initial model, and the training resumes, not restarts
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "already in" in text and json.loads((out / "summary.json").read_text())["trials_run_now"] == 0


def test_recovery_keys_are_checked(tailor_setting, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    cases = [
        (["tailor.recovery=flexigpt"], "tailor.recovery=flexigpt trains the replacement slots"),
        (["tailor.recovery=lora"], "tailor.recovery"),
        (["tailor.replace.gamma=calibrate"], "replace.gamma='calibrate' is not offered"),
        (["tailor.replace.norm_after=2"], "replace.norm_after is not offered"),
        (
            [
                "tailor.recovery=flexigpt",
                "tailor.warm_start.heuristics=[top]",
                "tailor.warm_start.calibration_files=[]",
            ],
            "replace.gamma='measured' measures the output norms on warm_start.calibration_files",
        ),
        (["tailor.selection.read_from=safetensors"], "selection.read_from"),
    ]
    for override, expected in cases:
        capsys.readouterr()
        assert main([RECIPE, *tailor_overrides(tailor_setting, out), *override]) == 2, override
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (override, err)
        assert not out.exists(), override
