"""Depth pruning of OPT end to end: recipes/prune/local-tiny.yaml on a tiny OPT, --prune-only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, OPTForCausalLM

import flexigpt.shared  # noqa: F401  (registers the compact format with the Auto classes)
from flexigpt.prune.cli import main
from flexigpt.shared.engine.tiny import tiny_model

from ...kit import write_workspace
from ..conftest import prune_overrides

RECIPE = str(Path(__file__).resolve().parents[3] / "recipes" / "prune" / "local-tiny.yaml")
OPT_TARGETS = "prune.replace.targets=[q,k,v,o,up,down]"


def test_opt_prunes_to_every_variant_and_gate_is_refused_first(tmp_path, capsys) -> None:
    ws = write_workspace(tmp_path / "ws", num_layers=6, arch="opt")
    out = tmp_path / "run"
    # the recipe's default targets name gate: refused before anything is computed or written
    assert main([RECIPE, *prune_overrides(ws, out, "--prune-only")]) == 2
    err = capsys.readouterr().err
    assert "prune.replace.targets=" in err and "allowed: ['q', 'k', 'v', 'o', 'up', 'down']" in err
    assert not out.exists()
    tiny_model("opt", num_layers=6, hidden=32, do_layer_norm_before=False).save_pretrained(tmp_path / "post")
    post = (f"model.source={tmp_path / 'post'}", OPT_TARGETS, "--prune-only")
    assert main([RECIPE, *prune_overrides(ws, out, *post)]) == 2
    assert "do_layer_norm_before=false, as facebook/opt-350m" in capsys.readouterr().err
    assert not out.exists()

    assert main([RECIPE, *prune_overrides(ws, out, OPT_TARGETS, "--prune-only")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["removed"]) == 2
    ids = torch.randint(3, 40, (1, 20), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("flexigpt", "shortgpt", "shortgpt_lora"):
        model = AutoModelForCausalLM.from_pretrained(out / name / "initial", attn_implementation="eager")
        assert type(model).__name__ == "SharedOPTForCausalLM"
        assert sum(p.numel() for p in model.parameters()) == summary["variants"][name]["stored_params"]
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits
        assert torch.isfinite(logits[name]).all()
    plain = OPTForCausalLM.from_pretrained(out / "shortgpt" / "initial_plain", attn_implementation="eager")
    assert plain.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, logits["shortgpt"], rtol=1e-5, atol=1e-5)


def test_compare_refuses_gate_on_opt_before_writing(tmp_path, capsys) -> None:
    ws = write_workspace(tmp_path / "ws", num_layers=6, arch="opt")
    recipe = str(Path(RECIPE).with_name("compare-local-tiny.yaml"))
    out = tmp_path / "cmp"
    assert main([recipe, *prune_overrides(ws, out, "compare.recovery=none")]) == 2
    assert "compare.replace.targets=" in capsys.readouterr().err
    assert not out.exists()


def test_opt_per_block_with_measured_gamma_writes_the_whole_runs_files(tmp_path) -> None:
    """prune.memory: per_block on OPT (learned positions, LayerNorms with biases), gamma measured."""
    from safetensors.torch import load_file, save_file

    ws = write_workspace(tmp_path / "ws", num_layers=6, arch="opt")
    extra = (
        OPT_TARGETS,
        "prune.replace.gamma=measured",
        "prune.variants=[flexigpt,shortgpt]",
        "--prune-only",
    )
    for mode in ("whole", "per_block"):
        assert main([RECIPE, *prune_overrides(ws, tmp_path / mode, f"prune.memory={mode}", *extra)]) == 0
    # the hub's original OPT files name their tensors without "model." (transformers loads both)
    original = tmp_path / "original"
    shutil.copytree(ws["model"], original)
    tensors = load_file(original / "model.safetensors")
    assert all(k.startswith("model.") for k in tensors)
    save_file(
        {k.removeprefix("model."): t for k, t in tensors.items()},
        original / "model.safetensors",
        {"format": "pt"},
    )
    orig = (f"model.source={original}", "prune.memory=per_block")
    assert main([RECIPE, *prune_overrides(ws, tmp_path / "per_block_original", *orig, *extra)]) == 0
    for mode in ("per_block", "per_block_original"):
        for rel in ("source_ppl.json", "flexigpt/start_ppl.json", "shortgpt/start_ppl.json"):
            a, b = (json.loads((tmp_path / m / rel).read_text())["result"]["ppl"] for m in ("whole", mode))
            assert abs(a - b) <= 1e-5 * a, (mode, rel)
        for v in ("flexigpt/initial", "shortgpt/initial", "shortgpt/initial_plain"):
            x, y = ({} for _ in range(2))
            for d, into in ((tmp_path / "whole" / v, x), (tmp_path / mode / v, y)):
                for f in sorted(d.glob("*.safetensors")):
                    into.update(load_file(f))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (mode, v)
