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


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO_ROOT / "recipes")))
def test_calibrated_gamma_is_chosen_apart_from_the_perplexity_text(path: Path) -> None:
    """A shipped recipe that calibrates gamma names a gamma text other than the one it reports on."""
    _register_kinds()
    recipe = load_recipe(path)
    prune = getattr(recipe, "prune", None)
    if prune is None or getattr(getattr(prune, "replace", None), "gamma", None) != "calibrate":
        pytest.skip("no gamma calibration")
    gamma = prune.calibration.gamma_stream or prune.calibration.stream
    judged = prune.perplexity.stream if prune.perplexity is not None else recipe.data.eval
    assert gamma is not None and judged is not None
    assert (gamma.source, gamma.hub_id, gamma.split, gamma.files) != (
        judged.source,
        judged.hub_id,
        judged.split,
        judged.files,
    )


@pytest.mark.parametrize("grown", ["tinyllama-22to36-block.yaml", "tinyllama-22to36-sequential.yaml"])
def test_growth_control_trains_the_same_base_on_the_same_tokens(grown: str) -> None:
    """The control differs from a grown run only in what trains (and that set's learning rate)."""
    _register_kinds()
    control = load_recipe(REPO_ROOT / "recipes" / "train" / "tinyllama-3t-control.yaml")
    grow = load_recipe(REPO_ROOT / "recipes" / "grow" / grown)
    assert control.kind == "train" and grow.kind == "grow"
    assert control.model.source == grow.model.source
    assert control.data == grow.data and control.text == grow.text
    same = ("micro_batch", "global_batch", "grad_accum", "warmup_steps", "min_lr_ratio", "token_budget")
    same += ("max_steps", "weight_decay", "betas", "eps", "grad_clip", "seed", "precision", "ds_config")
    for key in same:
        assert getattr(control.train, key) == getattr(grow.train, key), key
    assert (control.train.trainable, grow.train.trainable) == ("all", "adapters+norms")
    assert (control.train.lr, control.train.lr_is_default, grow.train.lr) == (2e-4, True, 4e-3)
