"""The prune command's output-norm gamma options on recipes/prune/local-tiny.yaml: ``measured``
(per-feature gammas in the saved model, recorded in the plan), a calibration that keeps ``none``
(exactly the model without output norms), and refused values naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flexigpt.prune.cli import main
from flexigpt.shared.engine.checkpoint import load_compact
from flexigpt.shared.engine.plan import Plan

from .conftest import prune_overrides

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(REPO_ROOT / "recipes" / "prune" / "local-tiny.yaml")
ONLY = ("prune.variants=[flexigpt]", "--prune-only")


def _prune(ws: dict[str, Path], out: Path, *extra: str) -> int:
    return main([RECIPE, *prune_overrides(ws, out, *ONLY, *extra)])


def _norm_weights(path: Path) -> list[torch.Tensor]:
    model = load_compact(path)
    return [m.out_norm.weight.detach() for m in model.modules() if hasattr(m, "out_norm")]


def test_measured_gamma_is_saved_per_feature_and_recorded(prune_workspace, tmp_path, capsys) -> None:
    out = tmp_path / "measured"
    assert _prune(prune_workspace, out, "prune.replace.gamma=measured") == 0
    text = capsys.readouterr().out
    saved = json.loads((out / "flexigpt" / "gamma.json").read_text())
    assert saved["gamma"] == "measured" and saved["measured_mean"] > 0
    assert saved["text"]["documents_skipped"] > 0  # measured on text the start perplexity does not read
    assert text.index("gamma measured") < text.index("[flexigpt] plan:")
    plan = Plan.load(out / "flexigpt" / "plan.json")
    assert plan.notes["gamma_measured"]["mean"] == saved["measured_mean"]
    assert {s.out_norm.gamma for s in plan.slots if s.out_norm} == {round(saved["measured_mean"], 6)}
    weights = _norm_weights(out / "flexigpt" / "initial")
    assert len(weights) == 2 * len(plan.removed_blocks)
    assert all(w.std() > 0 for w in weights)  # one gamma per feature, not one number
    assert abs(torch.cat(weights).mean().item() - saved["measured_mean"]) <= 1e-5 * saved["measured_mean"]
    capsys.readouterr()
    assert _prune(prune_workspace, out, "prune.replace.gamma=measured") == 0  # the same plan: not rebuilt
    assert "plan.json match this recipe: not rebuilt" in capsys.readouterr().out


def test_calibration_that_keeps_none_builds_the_model_without_norms(
    prune_workspace, tmp_path, capsys
) -> None:
    out, plain = tmp_path / "none", tmp_path / "plain"
    extra = ("prune.replace.gamma=calibrate", "prune.replace.gamma_candidates=[none]")
    assert _prune(prune_workspace, out, *extra) == 0
    assert "gamma calibrated: none" in capsys.readouterr().out
    saved = json.loads((out / "flexigpt" / "gamma.json").read_text())
    assert saved["gamma"] == "none" and [g for g, _ in saved["table"]] == ["none"]
    plan = Plan.load(out / "flexigpt" / "plan.json")
    assert not any(s.out_norm for s in plan.slots) and plan.notes["gamma_calibration"]["gamma"] == "none"
    assert _prune(prune_workspace, plain, "prune.replace.out_norm=false") == 0
    other = Plan.load(plain / "flexigpt" / "plan.json")
    assert [s for s in plan.slots] == [s for s in other.slots]
    a, b = load_compact(out / "flexigpt" / "initial"), load_compact(plain / "flexigpt" / "initial")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    start = [json.loads((d / "flexigpt" / "start_ppl.json").read_text()) for d in (out, plain)]
    assert start[0] == start[1]
    capsys.readouterr()
    assert _prune(prune_workspace, out, *extra) == 0
    assert "plan.json match this recipe: not rebuilt" in capsys.readouterr().out


def test_bad_gamma_values_are_refused_naming_the_key(prune_workspace, tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    assert _prune(prune_workspace, out, "prune.replace.gamma=measurd") == 2
    err = capsys.readouterr().err
    assert "prune.replace.gamma" in err and "'measured'" in err and "Traceback" not in err
    assert _prune(prune_workspace, out, "prune.replace.gamma_candidates=[0.01, off]") == 2
    err = capsys.readouterr().err
    assert "prune.replace.gamma_candidates" in err and "'none'" in err
    assert _prune(prune_workspace, out, "prune.replace.gamma_candidates=[0.01, none, none]") == 2
    assert "distinct values" in capsys.readouterr().err
    assert _prune(prune_workspace, out, "prune.replace.gamma=measured", "prune.replace.out_norm=false") == 2
    assert "replace.gamma='measured' needs replace.out_norm=true" in capsys.readouterr().err
    assert not out.exists()
