"""The shape every command shares: flags anywhere among the overrides, a one-line answer when a hub id
cannot be fetched, and the CPU thread note."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flexigpt.grow.cli import _parser as grow_parser
from flexigpt.grow.cli import main as grow_main
from flexigpt.prune.cli import _parser as prune_parser
from flexigpt.prune.cli import main as prune_main
from flexigpt.shared.train.cli import _train_parser
from flexigpt.shared.train.cli import main as train_main

from .kit import workspace_overrides, write_workspace

REPO_ROOT = Path(__file__).resolve().parents[1]
GROW = str(REPO_ROOT / "recipes" / "grow" / "local-tiny.yaml")
PRUNE = str(REPO_ROOT / "recipes" / "prune" / "local-tiny.yaml")
TRAIN = str(REPO_ROOT / "recipes" / "train" / "tiny_local.yaml")


def test_flags_parse_anywhere_among_the_overrides():
    args = prune_parser().parse_intermixed_args([PRUNE, "--prune-only", "a.b=1", "c=2"])
    assert args.prune_only and args.recipe == PRUNE and args.overrides == ["a.b=1", "c=2"]
    args = grow_parser().parse_intermixed_args([GROW, "a=1", "--plan-only", "b=2"])
    assert args.plan_only and args.overrides == ["a=1", "b=2"]
    args = _train_parser().parse_intermixed_args(
        [TRAIN, "a=1", "--resume", "never", "b=2", "--allow-plan-change"]
    )
    assert (args.resume, args.allow_plan_change, args.overrides) == ("never", True, ["a=1", "b=2"])


def test_commands_accept_a_flag_before_the_overrides(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the thread note then names the user's setting
    ws = write_workspace(tmp_path / "ws", num_layers=4)
    out = tmp_path / "run"
    # grow: the flag first, then the overrides; the plan is printed and nothing is written
    assert grow_main([GROW, "--plan-only", *workspace_overrides(ws, out)]) == 0
    text = capsys.readouterr().out
    assert "stored parameters: 65,312" in text and "CPU threads: 1 (OMP_NUM_THREADS)" in text
    assert not out.exists()
    # prune and train: the recipe is validated (the override is read as an override, not refused by argparse)
    assert prune_main([PRUNE, "--prune-only", "prune.ratoi=0.4", f"output_dir={out}"]) == 2
    assert "unknown key 'prune.ratoi'" in capsys.readouterr().err
    assert train_main([TRAIN, "--resume", "never", "train.lr=-1", f"output_dir={out}"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert not out.exists()


# Runs each command's main on a recipe whose model is a hub id, offline, in one fresh interpreter
# (huggingface_hub reads HF_HUB_OFFLINE when it is imported), and reports status and stderr.
HUB_PROBE = """
import contextlib, io, json, sys
from flexigpt.grow.cli import main as grow
from flexigpt.prune.cli import main as prune
from flexigpt.shared.train.cli import main as train
out = sys.argv[1]
runs = {
    "grow": (grow, ["recipes/grow/tinyllama-22to36-block.yaml", "--plan-only", f"output_dir={out}/g"]),
    "prune": (prune, ["recipes/prune/llama2-7b-30.yaml", "--prune-only", f"output_dir={out}/p"]),
    "train": (train, ["recipes/train/tinyllama_slimpajama.yaml", f"output_dir={out}/t"]),
}
result = {}
for name, (main, args) in runs.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
    result[name] = [rc, err.getvalue()]
print(json.dumps(result))
"""


def test_hub_ids_that_cannot_be_fetched_are_answered_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", HUB_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, source in (
        ("grow", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"),
        ("prune", "meta-llama/Llama-2-7b-hf"),
        ("train", "TinyLlama/TinyLlama_v1.1"),
    ):
        rc, err = result[name]
        assert rc == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"flexigpt-{name}: "), (name, err)
        assert f"model.source={source!r}" in err and "HF_HUB_OFFLINE is set" in err, (name, err)
        assert "model.source=/path/to/model" in err, (name, err)
    # the config is what grow and prune read first: they say so and name nothing else
    assert "the config could not be fetched from the Hugging Face hub" in result["grow"][1]
    assert "the config could not be fetched from the Hugging Face hub" in result["prune"][1]
    assert not any(tmp_path.iterdir())  # nothing half-written
