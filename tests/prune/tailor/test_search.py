"""The tailor command end to end on the tiny setting: the search finds a stitched model better than
the base and than Block-Influence removal at the same ratio, the export loads in plain transformers
and reproduces the in-memory scores exactly, a finished study is not rerun (and hands its model to
recovery training), a changed recipe is refused, and a killed search resumes without repeating
finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexigpt.prune.cli import main
from flexigpt.prune.tailor.search import SearchError, open_study
from flexigpt.prune.tailor.stitch import StitchPlan

from .conftest import tailor_overrides
from .tailorkit import NUM_LAYERS

REPO = Path(__file__).resolve().parents[3]
RECIPE = str(REPO / "recipes" / "prune" / "tailor-local-tiny.yaml")


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def test_search_beats_base_and_block_influence_and_exports_a_plain_model(
    tailor_setting, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    args = [RECIPE, *tailor_overrides(tailor_setting, out, "tailor.trials=24")]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    res = summary["results"]
    chosen = _mean(res["chosen"]["scores"])
    assert chosen > _mean(res["base"]["scores"]) + 0.2
    assert chosen > _mean(res["block_influence_removal"]["scores"]) + 0.2
    assert summary["trials"] == 24 and summary["pruned"] > 0  # multi-fidelity stopped some early
    rows = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["scores"] and r["plan"] for r in rows)
    assert {"search_scores.png", "search_best.png", "layer_map.png"} <= {p.name for p in out.iterdir()}

    # the export: a plain model of the source architecture with 6 layers, scoring exactly as in memory
    assert summary["export"]["reproduces"] is True
    assert summary["export"]["scores"] == res["chosen"]["scores"]
    plan = StitchPlan.load(out / "stitch_plan.yaml")
    assert plan.positions == StitchPlan.from_dict(res["chosen"]["plan"]).positions
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == NUM_LAYERS - 2
    assert torch.isfinite(model(torch.tensor([[4, 7, 20]])).logits).all()

    # a rerun of a finished study runs no trial; with a train: section it hands the chosen model to
    # plain recovery training by the same trainer
    capsys.readouterr()
    recovery = [
        "train={max_steps: 2, micro_batch: 2, grad_accum: 1, trainable: all, warmup_steps: 1, lr: 1.0e-3}",
        "data.source=files",
        f"data.files=[{tailor_setting['calib']}]",
        "data.seq_len=16",
        "data.shuffle_buffer=4",
        "data.tokenize_batch=4",
    ]
    assert main([*args, *recovery]) == 0
    assert json.loads((out / "summary.json").read_text())["trials_run_now"] == 0
    assert "[recovery] done: step 2" in capsys.readouterr().out
    assert (out / "recovery" / "final").is_dir()
    # a changed search is refused, naming the key
    assert main([*args, "tailor.ratio=0.5"]) == 2
    assert "tailor.ratio" in capsys.readouterr().err


def test_a_killed_search_resumes_without_repeating_finished_trials(tailor_setting, tmp_path) -> None:
    out = tmp_path / "run"
    args = [
        RECIPE,
        *tailor_overrides(
            tailor_setting,
            out,
            "tailor.trials=10",
            "tailor.warm_start.heuristics=[top]",
            "tailor.export=false",
        ),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flexigpt.prune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    seen = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        seen += line.strip().startswith("trial ")
        if seen == 4:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    import optuna

    def done(study) -> dict[int, dict]:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return {t.number: t.params for t in study.get_trials(states=states)}

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))
    )
    before = done(optuna.load_study(study_name="tailor", storage=storage))
    assert 3 <= len(before) < 10  # the 4th line is printed just before its trial is stored

    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    after = done(optuna.load_study(study_name="tailor", storage=storage))
    assert summary["trials_run_now"] == 10 - len(before)
    assert len(after) == 10
    assert all(after[n] == p for n, p in before.items())  # the finished trials are kept, not rerun


def test_user_mistakes_exit_2_naming_the_key_and_write_nothing(tailor_setting, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    cases = [
        (["tailor.variants={colour: /nonexistent/colour}"], "/nonexistent/colour"),
        (["tailor.objective.tasks=[colour_fact]"], "colour_fact"),
        (["tailor.merge_methods=[slerp]"], "tailor.merge_methods"),
        (["tailor.variants={base: /x}"], "variants: name 'base' is not allowed"),
        (["tailor.budgets.min=100"], "min=100 > max=36"),
        (["tailor.objective.combine=pareto"], "tailor.budgets.pruner"),
        (["tailor.encoding=onehot"], "tailor.encoding"),
        (["tailor.prior_weight=0"], "tailor.prior_weight"),
    ]
    for override, expected in cases:
        capsys.readouterr()
        args = [RECIPE, *tailor_overrides(tailor_setting, out), *override]
        assert main(args) == 2, override
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (override, err)
        assert not out.exists(), override


def test_a_study_journaled_before_the_encoding_key_continues_with_its_settings(tmp_path) -> None:
    kw = {"sampler": "tpe", "seed": 0, "pruner": "none", "budgets": [4], "eta": 3, "n_objectives": 1}
    old = {"model.source": "base", "tailor.ratio": 0.25}
    open_study(tmp_path / "study.journal", old, **kw)
    with pytest.raises(SearchError, match=r"tailor\.encoding, tailor\.prior_weight changed"):
        open_study(
            tmp_path / "study.journal", {**old, "tailor.encoding": "source", "tailor.prior_weight": 3.0}, **kw
        )
    open_study(
        tmp_path / "study.journal", {**old, "tailor.encoding": "flags", "tailor.prior_weight": 1.0}, **kw
    )
