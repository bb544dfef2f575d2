"""The tailor command without variants: the search only chooses which base layers to cut."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from transformers import AutoModelForCausalLM

from flexigpt.prune.cli import main
from flexigpt.prune.tailor.stitch import StitchPlan

from .conftest import tailor_overrides
from .tailorkit import NUM_LAYERS

RECIPE = str(Path(__file__).resolve().parents[3] / "recipes" / "prune" / "tailor-local-tiny.yaml")


def test_no_variants_searches_the_cut_alone(tailor_setting, tmp_path) -> None:
    out = tmp_path / "cut"
    extra = [
        "tailor.variants={}",
        "tailor.trials=6",
        "tailor.budgets={min: 4, max: 12, eta: 3, pruner: hyperband}",
    ]
    assert main([RECIPE, *tailor_overrides(tailor_setting, out, *extra)]) == 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["tailor"]["variants"] == {}
    plan = StitchPlan.load(out / "stitch_plan.yaml")
    assert len(plan.removed) == 2 and {p.source for p in plan.positions} == {"base"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 6 and summary["export"]["reproduces"] is True
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == NUM_LAYERS - 2
