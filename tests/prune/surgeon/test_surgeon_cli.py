"""The surgeon method of flexigpt-prune end to end on recipes/prune/surgeon-local-tiny.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import flexigpt.prune.surgeon.run as surgeon_run
from flexigpt.prune.cli import main

from ..conftest import prune_overrides

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(REPO_ROOT / "recipes" / "prune" / "surgeon-local-tiny.yaml")


def _surgeon(ws: dict[str, Path], out: Path, *extra: str) -> int:
    return main([RECIPE, *prune_overrides(ws, out, *extra)])


def test_the_command_prunes_shrinks_saves_and_measures(prune_workspace, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert _surgeon(prune_workspace, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    names = {f"{m}-{s}" for m in ("surgeon", "k_obd", "magnitude") for s in (80, 70)}
    assert set(summary["variants"]) == names
    dense = summary["dense"]["stored_params"]
    for name, v in summary["variants"].items():
        vdir = out / name
        assert v["stored_params"] < dense, name
        assert v["decoder_linear_zero_fraction"] <= 1 - v["target_size"] + 1e-9
        assert v["decoder_linear_zero_fraction"] > 1 - v["target_size"] - 0.05
        assert (vdir / "sparsity.png").stat().st_size > 0
        assert len(json.loads((vdir / "sparsity.json").read_text())) == 6 * 7
        model = AutoModelForCausalLM.from_pretrained(vdir / "model", attn_implementation="eager")
        assert sum(p.numel() for p in model.parameters()) == v["stored_params"]
        assert model.plan.block_shapes, name  # something was cut out of the matrices
    model = AutoModelForCausalLM.from_pretrained(out / "surgeon-70" / "model", attn_implementation="eager")
    plain = AutoModelForCausalLM.from_pretrained(out / "surgeon-70" / "plain", attn_implementation="eager")
    assert sum(p.numel() for p in plain.parameters()) == dense
    ids = torch.randint(3, 40, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    # a finished run reruns at once; another schedule in the same directory is refused
    assert _surgeon(prune_workspace, out) == 0
    capsys.readouterr()
    assert _surgeon(prune_workspace, out, "surgeon.damp_g=0.1") == 2
    assert "settings" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [False, True])
def test_a_rerun_resumes_after_the_last_finished_shot(prune_workspace, tmp_path, monkeypatch, lora) -> None:
    extra = ("surgeon.methods=[surgeon]", "surgeon.save_plain=false")
    if lora:  # the correction is part of a finished shot: resumed, the run gets the same bytes
        extra += ("surgeon.lora.enabled=true", "surgeon.lora.samples=2", "surgeon.lora.lr=0.001")
    assert _surgeon(prune_workspace, tmp_path / "straight", *extra) == 0
    real = surgeon_run.prune_shot
    calls = []

    def stop_at_third(model, samples, target, opts, log):
        calls.append(target)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, samples, target, opts, log)

    monkeypatch.setattr(surgeon_run, "prune_shot", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        _surgeon(prune_workspace, tmp_path / "resumed", *extra)
    state = json.loads((tmp_path / "resumed" / "surgeon" / "state.json").read_text())
    assert state["shot"] == 2 and (tmp_path / "resumed" / "surgeon-80" / "variant.json").is_file()
    monkeypatch.setattr(surgeon_run, "prune_shot", real)
    assert _surgeon(prune_workspace, tmp_path / "resumed", *extra) == 0
    a = load_file(str(tmp_path / "straight" / "surgeon-70" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "surgeon-70" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = json.loads((tmp_path / "resumed" / "surgeon" / "state.json").read_text())["results"]
    assert [("correction" in r, "final_correction" in r) for r in results] == [(lora, False)] * 2 + [
        (lora, lora)
    ]


def test_a_diverging_correction_stops_the_run_before_its_shot_is_saved(
    prune_workspace, tmp_path, capsys
) -> None:
    out = tmp_path / "diverged"
    extra = ("surgeon.methods=[surgeon]", "surgeon.lora.enabled=true", "surgeon.lora.lr=1e30")
    assert _surgeon(prune_workspace, out, *extra) == 2
    err = capsys.readouterr().err
    assert "shot 1" in err and "surgeon.lora.lr" in err and "Traceback" not in err
    assert not (out / "surgeon" / "state.json").exists()  # the shot is not finished: a rerun redoes it
    assert not list((out / "surgeon").glob("weights-*"))


def test_bad_surgeon_values_fail_naming_the_key(prune_workspace, tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    assert _surgeon(prune_workspace, out, "surgeon.save_sizes=[0.85]") == 2
    assert "save_sizes" in capsys.readouterr().err
    assert _surgeon(prune_workspace, out, "surgeon.methods=[obs]") == 2
    assert "surgeon.methods" in capsys.readouterr().err
    assert _surgeon(prune_workspace, out, "surgeon.calibration.seq_len=100000") == 2
    assert "surgeon.calibration.seq_len" in capsys.readouterr().err
    assert _surgeon(prune_workspace, out, "surgeon.lora.enabled=true", "surgeon.lora.samples=9") == 2
    assert "surgeon.lora.samples=9 exceeds surgeon.calibration.num_samples=8" in capsys.readouterr().err
    assert _surgeon(prune_workspace, out, "surgeon.lora.targets=[qkv]") == 2
    assert "surgeon.lora.targets" in capsys.readouterr().err
    assert _surgeon(prune_workspace, out, "surgeon.max_correlate=0") == 2
    assert "surgeon.max_correlate" in capsys.readouterr().err
    assert not out.exists()  # a refused run writes nothing
    assert main(["--help-recipe", "surgeon"]) == 0
    assert "surgeon.update" in capsys.readouterr().out
