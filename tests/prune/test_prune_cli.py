"""The prune command end to end on recipes/prune/local-tiny.yaml: importance, selection, the three
variants (compact counts, the plain ShortGPT export), start perplexity, recovery, resume, refusals."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from flexigpt.prune.cli import main
from flexigpt.prune.depth.build import build_variant, export_plain
from flexigpt.prune.depth.replace import ReplacementOptions, build_plan, choose_bases
from flexigpt.prune.depth.selection import source_from_model
from flexigpt.shared.engine.apply import expected_trainable, stored_param_count
from flexigpt.shared.engine.checkpoint import export_materialized, load_compact
from flexigpt.shared.engine.plan import Plan
from flexigpt.shared.engine.tiny import tiny_model

from .conftest import prune_overrides

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(REPO_ROOT / "recipes" / "prune" / "local-tiny.yaml")
VARIANTS = ("flexigpt", "shortgpt", "shortgpt_lora")


def _prune(ws: dict[str, Path], out: Path, *extra: str) -> int:
    return main([RECIPE, *prune_overrides(ws, out, *extra)])


def _payload(path: Path) -> tuple[int, int, int]:
    """(elements, payload bytes, bytes per element) of a safetensors file, read from its header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    elements = sum(int(torch.tensor(t["shape"]).prod()) for t in header.values())
    sizes = {t["dtype"] for t in header.values()}
    assert sizes == {"F32"}, sizes
    return elements, len(raw) - 8 - n, 4


def test_bad_recipe_keys_and_values_fail_naming_the_key(prune_workspace, tmp_path, capsys):
    out = tmp_path / "r"
    assert _prune(prune_workspace, out, "prune.ratoi=0.4") == 2
    err = capsys.readouterr().err
    assert "'prune.ratoi'" in err and "did you mean 'ratio'" in err
    assert _prune(prune_workspace, out, "prune.variants=[flexigpt, shortgtp]") == 2
    err = capsys.readouterr().err
    assert "prune.variants.1" in err and "'shortgpt_lora'" in err
    assert _prune(prune_workspace, out, "prune.metric=cosine") == 2
    assert "metric='cosine' is unknown; allowed: ['angular_distance', 'block_influence', 'ppl_drop']" in (
        capsys.readouterr().err
    )
    # a misspelt key in the file itself is named with its full path and the nearest valid one
    raw = yaml.safe_load(Path(RECIPE).read_text())
    raw["prune"]["replace"]["svd_inti"] = raw["prune"]["replace"].pop("svd_init")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main([str(bad), *prune_overrides(prune_workspace, out)]) == 2
    err = capsys.readouterr().err
    assert "'prune.replace.svd_inti'" in err and "did you mean 'svd_init'" in err
    assert _prune(prune_workspace, out, "prune.replace.gamma=calibrate", "prune.replace.out_norm=false") == 2
    assert "needs replace.out_norm=true" in capsys.readouterr().err
    assert not out.exists()
    # values that only the model can check fail at run time, still naming the key
    assert _prune(prune_workspace, out, "prune.calibration.seq_len=1000", "--prune-only") == 2
    assert "prune.calibration.seq_len=1000 exceeds the model's max_position_embeddings (256)" in (
        capsys.readouterr().err
    )


def test_module_entry_point_describes_the_recipe():
    cmd = [sys.executable, "-m", "flexigpt.prune", "--help-recipe"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert "prune.replace.gamma (" in proc.stdout and "ambiguity 7" in proc.stdout


def test_variants_built_in_turn_from_one_source_equal_fresh_builds():
    # the command loads the source once and builds every variant from it: that must give exactly
    # the models that fresh sources give (the engine does not modify the source it applies a plan to)
    config = tiny_model("llama2", num_layers=6, hidden=32).config
    opts = ReplacementOptions(rank=8, metric_rank=8)
    sel = choose_bases(
        source_from_model(tiny_model("llama2", num_layers=6, hidden=32)), [1, 4], opts, progress=False
    )
    plans = {v: build_plan(v, config, sel if v == "flexigpt" else [1, 4], opts) for v in VARIANTS}
    shared_source = tiny_model("llama2", num_layers=6, hidden=32)
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    for v in (*VARIANTS, "flexigpt"):  # flexigpt again: after the others were built from the source too
        in_turn = build_variant(shared_source, plans[v], config, seed=0)
        fresh = build_variant(tiny_model("llama2", num_layers=6, hidden=32), plans[v], config, seed=0)
        a, b = in_turn.state_dict(), fresh.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), v
        assert torch.equal(in_turn(ids).logits, fresh(ids).logits), v


def test_plain_shortgpt_export_equals_the_materialised_one(tmp_path):
    config = tiny_model("qwen2", num_layers=5, hidden=32).config
    model = build_variant(
        tiny_model("qwen2", num_layers=5, hidden=32), build_plan("shortgpt", config, [1, 3]), config
    )
    export_plain(model, tmp_path / "plain")
    export_materialized(model, tmp_path / "copied")
    a, b = (
        load_file(tmp_path / "plain" / "model.safetensors"),
        load_file(tmp_path / "copied" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert plain.config.layer_types == [config.layer_types[i] for i in (0, 2, 4)]  # per-layer fields follow
    # the export says which source block each of its layers is, and the report shows those numbers
    assert (plain.config.flexigpt_source_blocks, plain.config.flexigpt_source_layers) == ([0, 2, 4], 5)
    from flexigpt.shared.evaluate.report import describe_model, slot_map_text

    _, slots, n_src, plan = describe_model(plain)
    assert (slot_map_text(slots), n_src, plan) == ("0 2 4", 5, None)


def test_gamma_calibration_is_recorded_in_the_plan_and_reused(prune_workspace, tmp_path, capsys):
    out = tmp_path / "cal"
    extra = ("prune.variants=[flexigpt]", "prune.replace.gamma=calibrate", "--prune-only")
    assert _prune(prune_workspace, out, *extra) == 0
    text = capsys.readouterr().out
    saved = json.loads((out / "flexigpt" / "gamma.json").read_text())
    assert saved["gamma"] in [1e-3, 3e-3, 1e-2, 3e-2, 1e-1] and len(saved["table"]) == 5
    # gamma is chosen on documents the start perplexity does not read, and the summary says so
    assert saved["text"]["documents_skipped"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["texts"]["gamma chosen on"] == saved["text"]["described"]
    # the flexigpt plan is printed once, after calibration, with the chosen gamma
    assert text.count("[flexigpt] plan:") == 1
    assert text.index("gamma calibrated") < text.index("[flexigpt] plan:")
    assert f"out_norm gamma={saved['gamma']:g}" in text
    plan = Plan.load(out / "flexigpt" / "plan.json")
    gammas = {s.out_norm.gamma for s in plan.slots if s.out_norm}
    assert gammas == {saved["gamma"]} and plan.notes["gamma_calibration"]["gamma"] == saved["gamma"]
    model = load_compact(out / "flexigpt" / "initial")
    norms = [m.out_norm.weight for m in model.modules() if hasattr(m, "out_norm")]
    assert norms and all(torch.all(w == saved["gamma"]) for w in norms)
    capsys.readouterr()
    assert _prune(prune_workspace, out, *extra) == 0  # the saved gamma makes the same plan: nothing rebuilt
    assert "plan.json match this recipe: not rebuilt" in capsys.readouterr().out


@pytest.mark.deepspeed
def test_prune_builds_measures_trains_resumes_and_refuses(prune_workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert _prune(prune_workspace, out) == 0
    text = capsys.readouterr().out
    for f in ("importance.json", "importance.png", "selection.json", "selection.png", "summary.json"):
        assert (out / f).stat().st_size > 0, f
    assert "[flexigpt] plan: llama, 6 slots over 4 physical blocks" in text
    assert "[shortgpt] plan: llama, 4 slots over 4 physical blocks" in text
    summary = json.loads((out / "summary.json").read_text())
    removed = summary["removed"]
    assert len(removed) == 2 and summary["peak_rss_mib"] > 0
    assert (
        summary["source"]["start_ppl"] > 1
        and f"start perplexity [unpruned]: ppl {summary['source']['start_ppl']:.2f}" in text
    )

    # every variant's compact checkpoint stores exactly the parameters its plan predicts
    config = AutoConfig.from_pretrained(prune_workspace["model"])
    for v in VARIANTS:
        plan = Plan.load(out / v / "plan.json")
        want = expected_trainable(plan, config, "all")
        elements, payload, size = _payload(out / v / "initial" / "model.safetensors")
        assert elements == want and payload == size * want, v
        model = load_compact(out / v / "initial")
        assert model.plan.to_dict() == plan.to_dict() and stored_param_count(model) == want, v
        assert summary["variants"][v]["stored_params"] == want and summary["variants"][v]["start_ppl"] > 1
        assert f"start perplexity [{v}]: ppl" in text
    flexi = Plan.load(out / "flexigpt" / "plan.json")
    for i in removed:  # a replacement slot at each removed position, running its picked base
        slot = flexi.slots[i]
        assert (
            slot.block == summary["picks"][str(i)]
            and slot.adapter.init == "svd"
            and slot.adapter.svd_from == i
        )
    assert expected_trainable(Plan.load(out / "shortgpt" / "plan.json"), config, "all") < expected_trainable(
        flexi, config, "all"
    )

    # the ShortGPT export is a plain transformers model with fewer layers that generates
    plain = AutoModelForCausalLM.from_pretrained(out / "shortgpt" / "initial_plain")
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in plain.model.layers] == [0, 1, 2, 3]
    ids = torch.tensor([[1, 5, 12, 20, 9, 33, 6]])
    compact = load_compact(out / "shortgpt" / "initial")
    assert torch.allclose(plain(ids).logits, compact(ids).logits, atol=1e-6)
    gen = plain.generate(ids, max_new_tokens=6, do_sample=False)
    assert gen.shape == (1, 13) and torch.equal(gen, compact.generate(ids, max_new_tokens=6, do_sample=False))

    # the recovery runs: flexigpt and shortgpt_lora with the same budget; shortgpt is not trained
    for v in ("flexigpt", "shortgpt_lora"):
        assert yaml.safe_load((out / v / "recipe.yaml").read_text())["model"]["source"] == str(
            out / v / "initial"
        )
        assert (out / v / "final" / "model.safetensors").is_file()
        # the trained run's recipe records the text rule as applied (the tokenizer's, both values set)
        assert yaml.safe_load((out / v / "recipe.yaml").read_text())["text"] == {
            "bos": False,
            "eos_between_docs": True,
        }
    assert not (out / "shortgpt" / "checkpoints").exists()
    # the summary says by which rule and on which text every figure was measured
    texts = summary["texts"]
    assert texts["text rule"]["eos_between_docs"] and texts["text rule"]["decided_by"] == "tokenizer"
    assert "packed windows" in texts["importance measured on"]
    assert "text rule doc + EOS" in texts["start perplexities measured on"]
    assert f"on {texts['start perplexities measured on']}" in text
    final = load_file(out / "flexigpt" / "final" / "model.safetensors")

    # run again after losing the last checkpoint: nothing is recomputed, training resumes at step 2
    # and ends with the weights of the uninterrupted run
    shutil.rmtree(out / "flexigpt" / "checkpoints" / "step_00000004")
    stamps = {p: p.stat().st_mtime_ns for p in (out / "importance.json", out / "selection.json")}
    stamps |= {p: p.stat().st_mtime_ns for p in (out / v / "initial" / "model.safetensors" for v in VARIANTS)}
    assert _prune(prune_workspace, out) == 0
    text = capsys.readouterr().out
    assert "importance: reusing" in text and "selection: reusing" in text and "building" not in text
    assert "resumed from" in text and "at step 2" in text
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    again = load_file(out / "flexigpt" / "final" / "model.safetensors")
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)

    # another plan, or other pruning settings, in the same output_dir are refused before anything is written
    assert _prune(prune_workspace, out, "prune.replace.rank=4") == 2
    assert "was built with another plan" in capsys.readouterr().err
    assert _prune(prune_workspace, out, "prune.ratio=0.5") == 2
    assert "other values of n_removed, prune.ratio" in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_rank_above_a_target_is_clamped_for_that_target(prune_workspace, tmp_path):
    """A rank larger than a small matrix (GQA k/v in 7B-scale recipes) is clamped per target."""
    out = tmp_path / "r"
    # rank 64 on 32-wide matrices: full-rank adapters outgrow the blocks they replace, loudly
    with pytest.warns(
        UserWarning, match=r"\[flexigpt\] the pruned model does not shrink: .* \d+% of the source"
    ):
        assert (
            _prune(prune_workspace, out, "prune.replace.rank=64", "prune.variants=[flexigpt]", "--prune-only")
            == 0
        )
    plan = Plan.load(next(out.rglob("initial/plan.json")))
    adapters = [s.adapter for s in plan.slots if s.adapter is not None]
    assert adapters and all(a.rank == 64 for a in adapters)
    for a in adapters:  # the tiny model's matrices are 32 wide: every target is clamped to its size
        assert a.rank_pattern and max(a.rank_pattern.values()) <= 32


def test_a_second_run_on_a_locked_output_dir_is_refused(prune_workspace, tmp_path, capsys):
    """The run lock covers the prune command (and its recovery runs) from the start."""
    out = tmp_path / "locked"
    hold = "import sys, time\nfrom flexigpt.shared.runguard import run_lock\nwith run_lock(sys.argv[1]):\n" \
           "    print('locked', flush=True)\n    time.sleep(600)\n"  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _prune(prune_workspace, out, "--prune-only") == 2
        err = capsys.readouterr().err
        assert f"flexigpt-prune: another run (pid {holder.pid}, host " in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == [".flexigpt.lock"]  # nothing of the prune
    finally:
        holder.kill()
        holder.wait()


def test_recovery_learning_rate_follows_each_variants_trainable_set(prune_workspace, tmp_path):
    """ShortGPT's recovery trains every parameter: a default learning rate becomes that set's default."""
    from flexigpt.shared.command import handoff_train_recipe
    from flexigpt.shared.recipe import load_recipe

    recipe = load_recipe(RECIPE, [*prune_overrides(prune_workspace, tmp_path), "train.lr=null"])
    assert (recipe.train.lr, recipe.train.lr_is_default) == (4e-3, True)
    shortgpt = handoff_train_recipe(recipe, tmp_path / "initial", train={"trainable": "all"})
    assert (shortgpt.train.lr, shortgpt.train.lr_is_default) == (2e-4, True)
    flexigpt = handoff_train_recipe(recipe, tmp_path / "initial")
    assert (flexigpt.train.lr, flexigpt.train.trainable) == (4e-3, "adapters+norms")
    fixed = load_recipe(RECIPE, [*prune_overrides(prune_workspace, tmp_path), "train.lr=1e-3"])
    assert handoff_train_recipe(fixed, tmp_path / "initial", train={"trainable": "all"}).train.lr == 1e-3
