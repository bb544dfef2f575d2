"""The compare command end to end on recipes/prune/compare-local-tiny.yaml: every method built from one
source, one recovery budget, the table / JSON / figure, zero-shot with acc and acc_norm, resume, refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from flexigpt.prune.cli import main
from flexigpt.prune.compare.card import param_counts
from flexigpt.prune.compare.recipe import BASELINE_METHODS, COMMAND_METHODS, METHODS
from flexigpt.prune.depth.baselines import BASELINES
from flexigpt.shared.engine.checkpoint import load_model
from flexigpt.shared.engine.plan import Plan
from flexigpt.shared.evaluate.zeroshot import write_choice_task

from ..conftest import prune_overrides

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(REPO_ROOT / "recipes" / "prune" / "compare-local-tiny.yaml")


def _task(d: Path) -> Path:
    rng = random.Random(0)
    nouns = ["cat", "dog", "bird", "fish", "tree", "river"]
    docs = [
        {
            "query": f"the {rng.choice(nouns)} sat on the",
            "choices": ["tree .", "ran and", "stone ."],
            "label": 0,
        }
        for _ in range(6)
    ]
    write_choice_task(d, "toy_choice", docs)
    return d


def test_registered_baselines_are_the_recipe_methods() -> None:
    assert set(BASELINE_METHODS) == set(BASELINES)
    assert len(METHODS) == len(set(METHODS)) == 13 + len(COMMAND_METHODS)


def _recipe_methods() -> list[str]:
    return yaml.safe_load(Path(RECIPE).read_text())["compare"]["methods"]


def test_compare_every_method_one_budget_one_table(prune_workspace, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    tasks = _task(tmp_path / "tasks")
    wino = tmp_path / "winogrande.jsonl"  # lm-eval's own winogrande task over a local copy
    wino.write_text(
        "".join(
            json.dumps({"sentence": f"The {a} sat on the {b} because _ was tired.", "option1": a, "option2": b, "answer": "1"})
            + "\n"
            for a, b in (("cat", "tree"), ("dog", "river"), ("bird", "fish"))
        )
    )  # fmt: skip
    extra = [
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "compare.lr={shortgpt: 1.0e-3, reverse: 5.0e-4}",
        f"compare.zeroshot={{tasks: [toy_choice, winogrande], include_path: [{tasks}], include_defaults: false, "
        f"batch_size: 4, local_data: {{winogrande: {wino}}}}}",
    ]
    assert main([RECIPE, *prune_overrides(prune_workspace, out, *extra)]) == 0
    card = json.loads((out / "comparison.json").read_text())
    rows = {m["name"]: m for m in card["methods"]}
    assert sorted(rows) == sorted(_recipe_methods())
    tokens = {r["recovery_tokens"] for r in rows.values()}
    assert tokens == {2 * 2 * 2 * 32}  # steps x micro x accum x seq_len: one budget for every method
    # compare.lr reaches each named method's trainer; the others train at train.lr
    assert rows["reverse"]["recovery_trainable"] == "layers [2, 3] + head, lr 0.0005"
    assert rows["shortgpt"]["recovery_trainable"] == "all, lr 0.001"
    assert rows["flexigpt"]["recovery_trainable"] == "adapters+norms, lr 0.01"
    assert json.loads((out / "prune" / "shortgpt" / "recovery.json").read_text())["lr"] == 1e-3
    assert yaml.safe_load((out / "prune" / "shortgpt" / "recipe.yaml").read_text())["train"]["lr"] == 1e-3
    assert rows["streamline"]["method_tokens"] > 0
    # sizes three ways, recounted from the saved models
    for name, r in rows.items():
        model = load_model(r["path"])
        assert (r["params"], r["params_non_embedding"], r["params_decoder_linear"]) == param_counts(model), (
            name
        )
        assert r["layers_removed"] == 2
        assert set(r["zeroshot"]["toy_choice"]) == {"acc", "acc_norm", "paper"}
        assert set(r["zeroshot"]["winogrande"]) == {"acc", "paper"}  # lm-eval reports acc only
        paper = (r["zeroshot"]["toy_choice"]["acc_norm"] + r["zeroshot"]["winogrande"]["acc"]) / 2
        assert r["zeroshot_avg"] == pytest.approx(paper)
        assert r["speed"]["decode_ms_per_token"] > 0 and r["ppl"]["data.eval"] > 1
    assert rows["shortgpt"]["params"] < card["source"]["params"]
    assert rows["flexigpt"]["layers"] == 6 and rows["replaceme"]["layers"] == 4
    # FlexiGPT with the paper's gamma: the same slots and parameters, another start
    assert rows["flexigpt_gamma_paper"]["params"] == rows["flexigpt"]["params"]
    assert rows["flexigpt_gamma_paper"]["ppl_start"] != rows["flexigpt"]["ppl_start"]
    md = (out / "comparison.md").read_text()
    assert "toy_choice acc / acc_norm" in md and "recovery tokens equal for every method" in md
    assert "compare.lr: shortgpt 0.001, reverse 0.0005" in md
    assert "text rule:" in md and all(f"| {m} |" in md for m in _recipe_methods())
    assert (out / "comparison.png").stat().st_size > 10_000
    # every baseline is a plain model that plain transformers loads
    for m in BASELINE_METHODS:
        plain = AutoModelForCausalLM.from_pretrained(out / m / "initial")
        assert plain.config.num_hidden_layers == 4
    # a rerun reuses the models, the recovery runs and the measurements
    stamps = {m: (out / m / "method.json").stat().st_mtime_ns for m in BASELINE_METHODS}
    capsys.readouterr()
    assert main([RECIPE, *prune_overrides(prune_workspace, out, *extra)]) == 0
    assert stamps == {m: (out / m / "method.json").stat().st_mtime_ns for m in BASELINE_METHODS}
    again = json.loads((out / "comparison.json").read_text())
    assert [m["ppl"] for m in again["methods"]] == [m["ppl"] for m in card["methods"]]
    # another ratio in the same directory is refused, naming the key, with nothing written
    capsys.readouterr()
    assert main([RECIPE, *prune_overrides(prune_workspace, out, *extra, "compare.ratio=0.5")]) == 2
    err = capsys.readouterr().err
    assert "compare.ratio" in err and "Traceback" not in err


def test_unknown_method_is_refused_naming_the_allowed_ones(prune_workspace, tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    assert main([RECIPE, *prune_overrides(prune_workspace, out, "compare.methods=[replaceme, slep]")]) == 2
    err = capsys.readouterr().err
    assert "compare.methods" in err and "'sleb'" in err
    assert not out.exists()


def test_bad_learning_rates_and_duplicate_options_are_refused(prune_workspace, tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    for values, want in (
        (["compare.lr={slep: 1.0e-3}"], "compare.lr"),
        (["compare.lr={shortgpt: 0}"], "each with an lr > 0"),
        (["compare.methods=[shortgpt]", "compare.lr={sleb: 1.0e-3}"], "name methods of compare.methods"),
    ):
        assert main([RECIPE, *prune_overrides(prune_workspace, out, *values)]) == 2
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err, err
    twice = "compare.methods=[flexigpt, flexigpt_measured]"
    assert main([RECIPE, *prune_overrides(prune_workspace, out, twice)]) == 2
    assert "flexigpt built twice" in capsys.readouterr().err
    assert not out.exists()


def test_late_norm_method_gets_the_same_budget_and_its_norms_midway(prune_workspace, tmp_path) -> None:
    out = tmp_path / "late"
    methods = "compare.methods=[flexigpt, flexigpt_no_norm, flexigpt_late_norm]"
    extra = [methods, "train.max_steps=4", "train.checkpoint_every=2", "compare.speed=null"]
    assert main([RECIPE, *prune_overrides(prune_workspace, out, *extra)]) == 0
    rows = {m["name"]: m for m in json.loads((out / "comparison.json").read_text())["methods"]}
    late = rows["flexigpt_late_norm"]
    # half of max_steps without norms, then with them; the budget is everyone's
    assert late["recovery_trainable"] == "adapters; adapters+norms from step 2, lr 0.01"
    assert rows["flexigpt_no_norm"]["recovery_trainable"] == "adapters, lr 0.01"
    assert late["recovery_tokens"] == rows["flexigpt"]["recovery_tokens"] == 4 * 2 * 2 * 32
    # it starts as the no-norm model and ends with flexigpt's parameters (the norms added)
    assert late["ppl_start"] == rows["flexigpt_no_norm"]["ppl_start"]
    assert late["params"] == rows["flexigpt"]["params"] > rows["flexigpt_no_norm"]["params"]
    assert (out / "prune-late-norm" / "flexigpt" / "gamma_late.json").is_file()


@pytest.mark.parametrize(
    ("values", "want"),
    [
        (["compare.methods=[flexigpt_late_norm]", "compare.recovery=none"], "needs compare.recovery: equal"),
        (["compare.methods=[flexigpt_late_norm]", "compare.norm_after=4"], "must be below train.max_steps=4"),
        (["compare.replace.norm_after=2"], "compare.replace.norm_after: leave it null"),
    ],
)
def test_bad_late_norm_settings_are_refused(prune_workspace, tmp_path, capsys, values, want) -> None:
    out = tmp_path / "bad"
    assert main([RECIPE, *prune_overrides(prune_workspace, out, *values)]) == 2
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err and not out.exists()


def test_local_task_data_is_checked_with_the_recipe(prune_workspace, tmp_path, capsys) -> None:
    """compare.zeroshot.local_data goes through the evaluation's checks: a file without the task's
    fields is refused naming the key, before anything is built."""
    out = tmp_path / "bad"
    (tmp_path / "piqa.jsonl").write_text(json.dumps({"goal": "To dry hands", "sol1": "a towel"}) + "\n")
    bad = f"compare.zeroshot.local_data.piqa={tmp_path / 'piqa.jsonl'}"
    assert main([RECIPE, *prune_overrides(prune_workspace, out, bad)]) == 2
    err = capsys.readouterr().err
    assert "compare.zeroshot.local_data" in err and "lacks ['sol2', 'label']" in err, err
    assert "Traceback" not in err and not out.exists()


def test_training_free_comparison_trains_nothing(prune_workspace, tmp_path) -> None:
    out = tmp_path / "free"
    methods = "[shortgpt, flexigpt_no_norm, flexigpt_gamma_paper, flexigpt_calibrated, replaceme, reverse]"
    extra = ["compare.recovery=none", f"compare.methods={methods}"]
    assert main([RECIPE, *prune_overrides(prune_workspace, out, *extra)]) == 0
    card = json.loads((out / "comparison.json").read_text())
    assert {m["name"]: m["recovery_tokens"] for m in card["methods"]} == {
        "shortgpt": 0,
        "flexigpt_no_norm": 0,
        "flexigpt_gamma_paper": 0,
        "flexigpt_calibrated": 0,
        "replaceme": 0,
        "reverse": 0,
    }
    # the output-norm options: the paper's gamma, no norm (the same slots without norm parameters), and
    # a calibration among numbers, measured and none
    rows = {m["name"]: m for m in card["methods"]}
    paper = Plan.load(out / "prune-gamma-paper" / "flexigpt" / "plan.json")
    assert {s.out_norm.gamma for s in paper.slots if s.out_norm} == {0.01}
    assert rows["flexigpt_no_norm"]["layers"] == rows["flexigpt_gamma_paper"]["layers"] == 6
    assert rows["flexigpt_no_norm"]["params"] < rows["flexigpt_gamma_paper"]["params"]
    assert (
        rows["flexigpt_no_norm"]["params_decoder_linear"]
        == rows["flexigpt_gamma_paper"]["params_decoder_linear"]
    )
    cal = json.loads((out / "prune-calibrated" / "flexigpt" / "gamma.json").read_text())
    assert [g for g, _ in cal["table"]] == [0.001, 0.003, 0.01, 0.03, 0.1, "measured", "none"]
    assert not (out / "reverse" / "checkpoints").exists()
    md = (out / "comparison.md").read_text()
    assert "recovery: none" in md and "weights sha256" in md  # the source is pinned by its weights
    # the judged models are the ones as built
    assert all(m["path"].endswith(("initial", "initial_plain")) for m in card["methods"])
