"""Method surgeon of the compare command: the LLM Surgeon at the depth methods' decoder-linear size,
recovered and judged beside ShortGPT on recipes/prune/compare-local-tiny.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import flexigpt.prune.surgeon.run as surgeon_run
from flexigpt.prune.cli import main
from flexigpt.prune.compare.card import param_counts
from flexigpt.shared.engine.checkpoint import load_model

from ..conftest import prune_overrides

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(REPO_ROOT / "recipes" / "prune" / "compare-local-tiny.yaml")
EXTRA = (
    "compare.methods=[shortgpt, surgeon]",
    "compare.surgeon.shots=2",
    "train.max_steps=2",
    "train.checkpoint_every=2",
)


def test_surgeon_is_recovered_and_judged_beside_shortgpt(prune_workspace, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main([RECIPE, *prune_overrides(prune_workspace, out, *EXTRA)]) == 0
    card = json.loads((out / "comparison.json").read_text())
    rows = {m["name"]: m for m in card["methods"]}
    assert sorted(rows) == ["shortgpt", "surgeon"]
    surgeon, shortgpt = rows["surgeon"], rows["shortgpt"]
    info = json.loads((out / "surgeon" / "method.json").read_text())
    # 2 of 6 blocks removed: the surgeon keeps 4/6 of the decoder-linear weights, and all six layers
    assert info["notes"]["target_size"] == 4 / 6 and info["notes"]["shots"] == 2
    assert info["removed"] == [] and info["layers"] == list(range(6)) and info["train"] == {}
    assert surgeon["layers"] == 6 and surgeon["layers_removed"] == 0 and shortgpt["layers_removed"] == 2
    # Stored decoder-linear weights: zeros inside live units (columns of q, k, v, gate, up; rows of o
    # and down) stay stored, since the hidden size is the residual stream's; only dead MLP units and
    # heads are cut. So the surgeon stores at least ShortGPT's 4/6 and, on this tiny model, within 10%.
    ratio = surgeon["params_decoder_linear"] / shortgpt["params_decoder_linear"]
    assert 1.0 <= ratio < 1.10, ratio
    assert surgeon["params_decoder_linear"] < card["source"]["params_decoder_linear"] * 0.75
    # one recovery budget; the surgeon's narrowed compact model trains every parameter
    assert surgeon["recovery_tokens"] == shortgpt["recovery_tokens"] == 2 * 2 * 2 * 32
    assert surgeon["recovery_trainable"].startswith("all")
    model = load_model(out / "surgeon" / "final")
    assert model.plan.block_shapes  # still the narrowed model
    assert (surgeon["params"], surgeon["params_non_embedding"], surgeon["params_decoder_linear"]) == (
        param_counts(model)
    )
    assert surgeon["ppl"]["data.eval"] > 1 and surgeon["ppl_start"]["data.eval"] > 1
    md = (out / "comparison.md").read_text()
    assert "| surgeon | 6 (0) |" in md and "| shortgpt | 4 (2) |" in md
    assert "- surgeon: prunes rows and columns of every decoder linear to target_size 0.6667 (" in md
    assert "except where a line below says otherwise" in md
    # a rerun reuses the surgeon's model and run
    stamp = (out / "surgeon" / "method.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main([RECIPE, *prune_overrides(prune_workspace, out, *EXTRA)]) == 0
    assert (out / "surgeon" / "method.json").stat().st_mtime_ns == stamp
    assert "shot 1/2" not in capsys.readouterr().out
    # other surgeon options for the same directory are refused, naming the key
    other = [e for e in EXTRA if "shots" not in e] + ["compare.surgeon.shots=3"]
    assert main([RECIPE, *prune_overrides(prune_workspace, out, *other)]) == 2
    err = capsys.readouterr().err
    assert "other values of compare.surgeon;" in err and "Traceback" not in err, err


def test_bad_surgeon_values_are_refused_with_nothing_written(prune_workspace, tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    for value, want in (
        ("compare.surgeon.shots=0", "compare.surgeon.shots"),
        ("compare.surgeon.structures=element", "unknown key 'compare.surgeon.structures'"),
        ("compare.surgeon.fisher=exact", "compare.surgeon.fisher"),
    ):
        argv = [RECIPE, *prune_overrides(prune_workspace, out, "compare.methods=[shortgpt, surgeon]", value)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err, err
        assert not out.exists()


def test_a_surgeon_model_without_a_finite_perplexity_is_not_kept(
    prune_workspace, tmp_path, monkeypatch, capsys
) -> None:
    real = surgeon_run.run

    def broken(recipe, log):  # the real run, its perplexity then reported as NaN
        summary = real(recipe, log=log)
        for v in summary["variants"].values():
            v["perplexity"]["ppl"] = float("nan")
        return summary

    monkeypatch.setattr(surgeon_run, "run", broken)
    out = tmp_path / "nan"
    argv = [RECIPE, *prune_overrides(prune_workspace, out, "compare.methods=[surgeon]", *EXTRA[1:])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "[surgeon] the pruned model's perplexity is nan" in err and "Traceback" not in err, err
    assert not (out / "surgeon" / "method.json").exists() and not (out / "comparison.md").exists()


def test_an_interrupted_surgeon_resumes_and_judges_without_recovery(
    prune_workspace, tmp_path, monkeypatch, capsys
) -> None:
    real, calls = surgeon_run.prune_shot, []

    def stop_at_second(model, samples, target, opts, log):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, samples, target, opts, log)

    out = tmp_path / "free"
    argv = [
        RECIPE,
        *prune_overrides(
            prune_workspace, out, "compare.methods=[surgeon]", "compare.recovery=none", *EXTRA[1:]
        ),
    ]
    monkeypatch.setattr(surgeon_run, "prune_shot", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert not (out / "surgeon" / "method.json").exists()
    monkeypatch.setattr(surgeon_run, "prune_shot", real)
    capsys.readouterr()
    assert main(argv) == 0
    assert "[surgeon] resuming after shot 1 of 2" in capsys.readouterr().out
    row = json.loads((out / "comparison.json").read_text())["methods"][0]
    assert row["name"] == "surgeon" and row["path"] == str(out / "surgeon" / "initial")
    assert row["recovery_tokens"] == 0 and row["layers_removed"] == 0
    assert not (out / "surgeon" / "final").exists()
