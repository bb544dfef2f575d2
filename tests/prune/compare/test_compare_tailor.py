"""GPTailor as the method ``tailor`` of the comparison: the tailor command's search at the comparison's
ratio on the tiny GPTailor setting (a base, its fine-tuned variants colour and home, their local tasks),
then the same recovery and judges as ShortGPT; a cut-only search; refusals before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from flexigpt.prune.cli import main
from flexigpt.prune.tailor.stitch import StitchPlan
from flexigpt.shared.engine.checkpoint import load_model

from ..tailor.tailorkit import NUM_LAYERS, build_setting

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(REPO_ROOT / "recipes" / "prune" / "compare-local-tiny.yaml")
SEARCH = "trials: 6, budgets: {min: 4, max: 12, eta: 3, pruner: hyperband}"


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_setting(tmp_path_factory.mktemp("tailor_setting"))


def _objective(s: dict[str, Path]) -> str:
    return f"{{tasks: [colour_facts, home_facts], include_path: [{s['tasks']}], include_defaults: false, batch_size: 64}}"


def _args(s: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """compare-local-tiny.yaml on the setting's base, its calibration text as the corpus, 2 recovery steps."""
    return [
        RECIPE,
        f"model.source={s['base']}",
        f"model.tokenizer={s['base']}",
        f"data.files=[{s['calib']}]",
        f"data.eval.files=[{s['calib']}]",
        "data.seq_len=16",
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "train.lr=1.0e-3",
        f"output_dir={out}",
        *extra,
    ]


def test_tailor_row_beside_shortgpt_one_budget_rerun_reuses(setting, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    variants = f"{{colour: {setting['colour']}, home: {setting['home']}}}"
    args = _args(
        setting,
        out,
        "compare.methods=[shortgpt, tailor]",
        f"compare.tailor={{variants: {variants}, objective: {_objective(setting)}, {SEARCH}}}",
        f"compare.zeroshot={{tasks: [colour_facts], include_path: [{setting['tasks']}], include_defaults: false, "
        "batch_size: 64}",
    )
    assert main(args) == 0
    card = json.loads((out / "comparison.json").read_text())
    rows = {m["name"]: m for m in card["methods"]}
    assert sorted(rows) == ["shortgpt", "tailor"]
    tailor, short = rows["tailor"], rows["shortgpt"]
    # both plain models of L - n layers: the same stored parameters, the same recovery
    assert tailor["layers"] == short["layers"] == NUM_LAYERS - 2 and tailor["layers_removed"] == 2
    assert tailor["params"] == short["params"] < card["source"]["params"]
    assert tailor["recovery_tokens"] == short["recovery_tokens"] == 2 * 2 * 2 * 16
    assert tailor["recovery_trainable"] == "all, lr 0.001"
    # method.json: the chosen plan's removed layers in source numbering, full fine-tuning
    info = json.loads((out / "tailor" / "method.json").read_text())
    plan = StitchPlan.load(out / "tailor-run" / "stitch_plan.yaml")
    assert info["removed"] == sorted(plan.removed) and len(info["removed"]) == 2 and info["train"] == {}
    assert info["notes"]["trials"] == 6 and set(info["notes"]["best_objective_scores"]) == {
        "colour_facts",
        "home_facts",
    }
    # the initial model is the search's export, tokenizer included; the final model loads and runs
    initial = AutoModelForCausalLM.from_pretrained(out / "tailor" / "initial")
    assert initial.config.num_hidden_layers == NUM_LAYERS - 2
    assert (out / "tailor" / "initial" / "tokenizer.json").is_file()
    final = load_model(tailor["path"])
    assert torch.isfinite(final(torch.tensor([[4, 7, 20]])).logits).all()
    # the search optimised the very task the zero-shot column reports: the header says so
    md = (out / "comparison.md").read_text()
    assert "| tailor |" in md and "recovery tokens equal for every method" in md
    assert "chose the model by colour_facts" in md and "not held out" in md
    # a rerun reuses the search, the model and the measurements
    stamp = (out / "tailor" / "method.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "tailor" / "method.json").stat().st_mtime_ns == stamp
    again = {m["name"]: m for m in json.loads((out / "comparison.json").read_text())["methods"]}
    assert again["tailor"]["ppl"] == tailor["ppl"]
    # a changed search for the finished model is refused, naming the key
    capsys.readouterr()
    assert main([*args, "compare.tailor.seed=1"]) == 2
    err = capsys.readouterr().err
    assert "compare.tailor.seed" in err and "Traceback" not in err


def test_cut_only_search_at_a_ratio_the_tailor_rounds_otherwise(setting, tmp_path) -> None:
    out = tmp_path / "cut"
    # 0.3125 x 8 = 2.5: the comparison's floor removes 2, the tailor's rounding would remove 3
    args = _args(
        setting,
        out,
        "compare.methods=[tailor]",
        "compare.ratio=0.3125",
        "compare.ratio_rule=paper_params",
        "compare.recovery=none",
        f"compare.tailor={{variants: {{}}, objective: {_objective(setting)}, {SEARCH}, "
        "warm_start: {heuristics: [top]}}",
    )
    assert main(args) == 0
    info = json.loads((out / "tailor" / "method.json").read_text())
    assert info["notes"]["tailor_ratio"] == 0.25 and len(info["removed"]) == 2
    assert {p["source"] for p in info["notes"]["positions"]} == {"base"}
    row = json.loads((out / "comparison.json").read_text())["methods"][0]
    assert row["layers"] == NUM_LAYERS - 2 and row["recovery_tokens"] == 0
    md = (out / "comparison.md").read_text()
    assert "variants: none" in md and "not held out" not in md
    assert yaml.safe_load((out / "tailor-run" / "recipe.yaml").read_text())["tailor"]["recovery"] == "none"


@pytest.mark.parametrize(
    ("tailor", "want"),
    [
        ("{variants: {}}", "tailor.objective"),
        ("{variants: {colour: /nowhere/colour}, objective: OBJ}", "compare.tailor.variants.colour"),
        ("{objective: {tasks: [no_such_task], include_defaults: false}}", "compare.tailor.objective.tasks"),
    ],
)
def test_bad_tailor_settings_are_refused_before_anything_is_written(
    setting, tmp_path, capsys, tailor, want
) -> None:
    out = tmp_path / "refused"
    tailor = tailor.replace("OBJ", _objective(setting))
    args = _args(setting, out, "compare.methods=[shortgpt, tailor]", f"compare.tailor={tailor}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err
    assert not out.exists()
