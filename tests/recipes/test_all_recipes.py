"""Every YAML under recipes/ validates against the schema of its kind, and its ds_config fits it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from flexigpt.shared.recipe import RECIPE_KINDS, load_recipe
from flexigpt.shared.train.ds_config import build_ds_config, load_ds_config

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO_ROOT / "recipes").rglob("*.yaml")) + sorted((REPO_ROOT / "recipes").rglob("*.yml"))


def _register_kinds() -> None:
    """grow / prune register their recipe kinds when their recipe modules are imported."""
    for pkg in ("flexigpt.grow", "flexigpt.prune"):
        for mod in (pkg, f"{pkg}.recipe"):
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:  # a missing dependency inside the module is a real failure
                    raise


def test_there_are_recipes() -> None:
    assert any(p.parent.name == "train" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO_ROOT / "recipes")))
def test_recipe_validates(path: Path) -> None:
    _register_kinds()
    recipe = load_recipe(path)
    assert type(recipe) is RECIPE_KINDS[recipe.kind]
    t = recipe.train
    if t is None:  # a search-only kind (tailor) trains nothing
        return
    # the smallest world size the batch arithmetic allows, and the ds_config filled for it
    world = t.global_batch // (t.micro_batch * t.grad_accum) if t.global_batch and t.grad_accum else 1
    cfg = build_ds_config(load_ds_config(t.ds_config), t, world_size=world, precision="fp32")
    assert (
        cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world
        == cfg["train_batch_size"]
    )
