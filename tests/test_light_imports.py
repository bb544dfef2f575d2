"""What a command imports before it needs to: ``--help``, ``--help-recipe`` and recipe errors load no
torch, transformers, peft, DeepSpeed, lm-eval or datasets; the plan module is pure data; and the
Auto-class registration still happens before transformers loads any model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexigpt.shared.engine.apply import apply_plan
from flexigpt.shared.engine.plan import AdapterSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "deepspeed", "lm_eval", "datasets")
CLIS = {
    "flexigpt-prune": "flexigpt.prune.cli",
    "flexigpt-grow": "flexigpt.grow.cli",
    "flexigpt-train": "flexigpt.shared.train.cli",
    "flexigpt-eval": "flexigpt.shared.evaluate.cli",
}

# Runs a command's main in a fresh interpreter, then reports its exit status and which of the heavy
# packages it had imported by then (argparse's --help exits through SystemExit).
PROBE = f"""
import importlib, json, sys
module, args = sys.argv[1], sys.argv[2:]
try:
    rc = importlib.import_module(module).main(args)
except SystemExit as e:
    rc = e.code
heavy = sorted(h for h in {HEAVY!r} if h in sys.modules)
print(json.dumps({{"rc": rc, "heavy": heavy}}), file=sys.stderr)
"""


def _probe(module: str, *args: str) -> tuple[dict, str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, module, *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    *err, last = proc.stderr.strip().splitlines()
    return json.loads(last), proc.stdout, "\n".join(err)


@pytest.mark.parametrize("prog", list(CLIS))
def test_help_imports_nothing_heavy_and_names_help_recipe(prog):
    result, out, _ = _probe(CLIS[prog], "--help")
    assert result == {"rc": 0, "heavy": []}
    assert out.startswith(f"usage: {prog}")
    assert "--help-recipe" in out
    assert f"'{prog} --help-recipe' lists them" in out  # one line, not split at its hyphens


def test_help_recipe_imports_nothing_heavy():
    result, out, _ = _probe(CLIS["flexigpt-prune"], "--help-recipe")
    assert result == {"rc": 0, "heavy": []}
    assert "prune.replace.gamma (" in out
    result, out, _ = _probe(CLIS["flexigpt-eval"], "--help-recipe")
    assert result == {"rc": 0, "heavy": []}
    assert "perplexity.stride (" in out


@pytest.mark.parametrize(
    ("prog", "args", "message"),
    [
        (
            "flexigpt-prune",
            ["recipes/prune/local-tiny.yaml", "prune.metric=cosine"],
            "metric='cosine' is unknown",
        ),
        ("flexigpt-prune", ["recipes/prune/local-tiny.yaml", "prune.ratoi=0.4"], "'prune.ratoi'"),
        ("flexigpt-grow", ["recipes/grow/local-tiny.yaml", "grow.strategy=blocky"], "strategy='blocky'"),
        ("flexigpt-train", ["recipes/train/tiny_local.yaml", "train.lr=-1"], "train.lr"),
        ("flexigpt-eval", ["models.a=x", "output_dir=x", "perplexity.strid=3"], "'perplexity.strid'"),
    ],
)
def test_recipe_errors_import_nothing_heavy(prog, args, message):
    result, _, err = _probe(CLIS[prog], *args)
    assert result == {"rc": 2, "heavy": []}
    assert err.startswith(f"{prog}: ") and message in err


@pytest.mark.parametrize(
    "module",
    [
        "flexigpt.shared",
        "flexigpt.shared.engine.plan",
        "flexigpt.shared.recipe",
        "flexigpt.shared.command",
        "flexigpt.grow.recipe",
        "flexigpt.prune.depth.recipe",
        "flexigpt.shared.evaluate.cli",
    ],
)
def test_plan_and_recipe_modules_import_nothing_heavy(module):
    code = f"import sys, {module}; print(sorted(h for h in {HEAVY!r} if h in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    plan = Plan(
        "llama", 4, (SlotSpec(0), SlotSpec(1), SlotSpec(1, adapter=AdapterSpec(4)), SlotSpec(2), SlotSpec(3))
    )
    model = apply_plan(tiny_model("llama2"), plan)
    out = tmp_path_factory.mktemp("compact") / "model"
    model.save_pretrained(out)
    with torch.no_grad():
        torch.save(model(torch.arange(3, 19).unsqueeze(0)).logits, out.parent / "logits.pt")
    return out


# Each line: the imports a user's script starts with, in the order it makes them.
ORDERS = {
    "package first": "import flexigpt.shared\nfrom transformers import AutoModelForCausalLM",
    "transformers first": "from transformers import AutoModelForCausalLM\nimport flexigpt.shared",
    "probed first": "import flexigpt.shared, importlib.util\n"
    "assert importlib.util.find_spec('transformers.models.auto.modeling_auto')\n"
    "from transformers import AutoModelForCausalLM",
    "config class first": "import flexigpt.shared\nfrom transformers import AutoConfig\n"
    "assert AutoConfig.from_pretrained(DIR).model_type == 'flexigpt'\n"
    "from transformers import AutoModelForCausalLM",
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_import_flexigpt_shared_then_auto_class_loads_a_compact_dir(compact_dir, order):
    code = f"""
import sys
DIR = {str(compact_dir)!r}
{ORDERS[order]}
import torch
assert "flexigpt.shared.engine.checkpoint" not in sys.modules  # registered without it
model = AutoModelForCausalLM.from_pretrained(DIR, attn_implementation="eager")
assert type(model).__name__.startswith("Shared"), type(model)
want = torch.load(DIR + "/../logits.pt")
with torch.no_grad():
    got = model(torch.arange(3, 19).unsqueeze(0)).logits
assert torch.equal(got, want), (got - want).abs().max()
print("ok", model.plan.num_slots)
"""
    if order == "package first":  # and importing the package alone loads nothing heavy
        code = code.replace(
            "import flexigpt.shared\n",
            "import flexigpt.shared\nassert not any(h in sys.modules for h in ('torch', 'transformers'))\n",
            1,
        )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "5"]


def test_the_prune_recipe_knows_every_registered_metric():
    # the recipe checks metric names without importing the registry; the two lists must agree
    from flexigpt.prune.depth.importance import IMPORTANCE_METRICS
    from flexigpt.prune.depth.recipe import BUILTIN_METRICS, importance_metric_names

    assert set(BUILTIN_METRICS) <= set(IMPORTANCE_METRICS)
    assert set(importance_metric_names()) == set(BUILTIN_METRICS) | set(IMPORTANCE_METRICS)
