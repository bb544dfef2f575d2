"""The grow command end to end on recipes/grow/local-tiny.yaml: plan, grow once, train, resume, refuse."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flexigpt.grow.cli import main
from flexigpt.grow.dense import set_dense_trainable
from flexigpt.grow.strategies import DensePlan
from flexigpt.shared.engine.apply import stored_param_count
from flexigpt.shared.engine.checkpoint import load_compact, load_model
from flexigpt.shared.engine.plan import Plan

from .conftest import REPO_ROOT, local_overrides

RECIPE = str(REPO_ROOT / "recipes" / "grow" / "local-tiny.yaml")
DENSE = ("grow.adapter=null", "grow.out_norm=null", "grow.own_norms=false", "train.trainable=all")


def _grow(ws, out, *extra) -> int:
    return main([RECIPE, *local_overrides(ws, out, *extra)])


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_plan_only_prints_the_plan_and_counts_and_writes_nothing(grow_workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert _grow(grow_workspace, out, "--plan-only") == 0
    text = capsys.readouterr().out
    assert "slot   2 <- block   1  reuse  adapter r=8" in text
    assert "stored parameters: 65,312 = source 55,584 + new 9,728; dense 6-layer equivalent 79,264" in text
    assert not out.exists()


def test_bad_recipe_values_are_refused_with_the_key(grow_workspace, tmp_path, capsys):
    assert _grow(grow_workspace, tmp_path / "r", "grow.strategy=blocky", "--plan-only") == 2
    assert "strategy='blocky' is unknown" in capsys.readouterr().err
    assert _grow(grow_workspace, tmp_path / "r", "grow.end=3", "--plan-only") == 2  # 4 -> 7, target says 6
    assert "grow.target_layers=6" in capsys.readouterr().err


def test_module_entry_point_runs(grow_workspace, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "flexigpt.grow",
        RECIPE,
        *local_overrides(grow_workspace, tmp_path / "m"),
        "--plan-only",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert "plan: llama, 6 slots over 4 physical blocks" in proc.stdout


@pytest.mark.deepspeed
def test_grow_trains_resumes_and_refuses_another_plan(grow_workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        _grow(grow_workspace, out, "train.max_steps=6", "train.checkpoint_every=2", "train.keep_last=3") == 0
    )
    text = capsys.readouterr().out
    assert "growing" in text and "training 9,728 parameters" in text
    # the run directory: initial model + plan (+ the trainer's train recipe that starts from it)
    plan = Plan.load(out / "plan.json")
    assert [s.block for s in plan.slots] == [0, 1, 1, 2, 2, 3]
    assert plan.notes["source"] == str(grow_workspace["model"])
    train_recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert train_recipe["kind"] == "train" and train_recipe["model"]["source"] == str(out / "initial")
    initial = load_compact(out / "initial")
    assert initial.plan.to_dict() == plan.to_dict() and stored_param_count(initial) == 65_312
    # the originals stayed frozen: every block tensor of the final model is the source's, bit for bit;
    # the new slots' adapters and norms moved
    source, final = _state(grow_workspace["model"]), _state(out / "final")
    blocks = {k: v for k, v in final.items() if k.startswith("blocks.")}
    assert len(blocks) == 4 * 9
    for k, v in blocks.items():
        assert torch.equal(v, source["model.layers." + k.split(".", 1)[1]]), k
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(final[k], source[k])
    start = _state(out / "initial")
    moved = [k for k in final if k.startswith("slots.") and not torch.equal(final[k], start[k])]
    assert any("lora_A" in k for k in moved) and any("out_norm" in k for k in moved)

    # run again after losing the last checkpoint: the grow step is skipped, training resumes at
    # step 4 and ends with exactly the weights of the uninterrupted run
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    mtime = (out / "initial" / "model.safetensors").stat().st_mtime_ns
    assert (
        _grow(grow_workspace, out, "train.max_steps=6", "train.checkpoint_every=2", "train.keep_last=3") == 0
    )
    text = capsys.readouterr().out
    assert (
        "match this recipe: continuing with training" in text
        and "resumed from" in text
        and "at step 4" in text
    )
    assert (out / "initial" / "model.safetensors").stat().st_mtime_ns == mtime
    again = _state(out / "final")
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)

    # another plan in the same output_dir is refused before anything is touched
    assert _grow(grow_workspace, out, "grow.adapter.rank=4") == 2
    assert "grown with another plan" in capsys.readouterr().err
    assert (out / "initial" / "model.safetensors").stat().st_mtime_ns == mtime
    assert _grow(grow_workspace, out, "grow.strategy=stack", *DENSE) == 2
    assert "holds a shared-block run" in capsys.readouterr().err


@pytest.mark.deepspeed
def test_stack_baseline_trains_every_parameter_of_the_dense_model(grow_workspace, tmp_path, capsys):
    out = tmp_path / "stack"
    assert _grow(grow_workspace, out, "grow.strategy=stack", *DENSE, "train.max_steps=2") == 0
    plan = DensePlan.load(out / "dense_plan.json")
    assert plan.order == (0, 1, 2, 1, 2, 3) and plan.inserted == (3, 4)  # mergekit-style slice repeat
    dense = load_model(out / "initial")
    assert type(dense).__name__ == "LlamaForCausalLM" and dense.config.num_hidden_layers == 6
    assert f"training {sum(p.numel() for p in dense.parameters()):,} parameters" in capsys.readouterr().out
    final = load_compact(out / "final")  # the trainer saves every model it trains compactly
    assert final.config.num_hidden_layers == 6 and final.plan.is_identity()


@pytest.mark.deepspeed
def test_llama_pro_baseline_grows_identity_copies_and_trains_only_them(grow_workspace, tmp_path):
    out = tmp_path / "lp"
    rc = _grow(grow_workspace, out, "grow.strategy=llama_pro", *DENSE, "train.max_steps=2")
    plan = DensePlan.load(out / "dense_plan.json")
    assert plan.inserted == (2, 4) and plan.init == "zero_out"
    initial = load_model(out / "initial")
    assert not initial.model.layers[2].self_attn.o_proj.weight.any()
    block = sum(p.numel() for p in initial.model.layers[0].parameters())
    assert set_dense_trainable(initial, plan) == 2 * block
    assert rc == 0
    final = load_compact(out / "final").state_dict()
    for i in range(plan.num_layers):
        start = initial.model.layers[i].state_dict()
        same = all(torch.equal(v, final[f"model.layers.{i}.{k}"]) for k, v in start.items())
        assert same == (i not in plan.inserted), f"layer {i}"


@pytest.mark.deepspeed
def test_a_bad_corpus_found_while_training_is_one_line_not_a_traceback(grow_workspace, tmp_path, capsys):
    """The trainer's refusals reach the grow command's user as its own: message, exit status 2."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "c.jsonl").write_text('{"text": "the cat"}\n{"text": null}\n')
    out = tmp_path / "run"
    assert _grow(grow_workspace, out, f"data.files=[{tmp_path / 'corpus'}/*.jsonl]") == 2
    err = capsys.readouterr().err
    assert "flexigpt-grow: data.files: " in err and "c.jsonl line 2: 'text' is null" in err
    assert "Traceback" not in err and not (out / "checkpoints").exists()


def test_a_source_with_pickle_weights_is_refused_unless_allowed(grow_workspace, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(grow_workspace["model"])
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the old pickle format
    assert _grow(grow_workspace, tmp_path / "r", f"model.source={tmp_path / 'bin'}", "--plan-only") == 2
    err = capsys.readouterr().err
    assert "pickle weights (pytorch_model.bin)" in err and "model.allow_pickle_weights=true" in err
    extra = (f"model.source={tmp_path / 'bin'}", "model.allow_pickle_weights=true", "--plan-only")
    assert _grow(grow_workspace, tmp_path / "r", *extra) == 0
