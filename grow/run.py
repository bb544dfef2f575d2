"""The grow command as library calls: plan, check the run directory, build once, hand over to the trainer.

``output_dir`` of a grow run holds

- ``initial/``: the grown model before training (compact format for the shared strategies, a plain
  HF model for the dense baselines), with the tokenizer;
- ``plan.json`` (shared strategies) or ``dense_plan.json`` (dense baselines): the growth plan, written
  after ``initial/`` is complete, so its presence means the grow step is done;
- ``grow_recipe.yaml``: the resolved grow recipe;
- what the trainer writes: ``recipe.yaml`` (a ``train`` recipe whose ``model.source`` is
  ``initial/``; ``flexigpt-train output_dir/recipe.yaml`` therefore resumes the run too),
  ``checkpoints/``, ``tb/``, ``final/``.

Run again with the same recipe, the grow step finds its plan and ``initial/`` and goes straight
to the trainer, which resumes from the newest checkpoint. A recipe whose plan differs from the one
on disk is refused: the started run is never overwritten.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from flexigpt.shared.command import handoff_train_recipe, load_command_tokenizer, read_source_config
from flexigpt.shared.engine.checkpoint import load_model, save_compact
from flexigpt.shared.engine.plan import Plan
from flexigpt.shared.engine.tokenizer_files import save_tokenizer
from flexigpt.shared.files import write_text_atomic
from flexigpt.shared.recipe import TrainRecipe

from .build import ParamCounts, check_fits, grow_model, param_counts
from .recipe import GrowRecipe
from .strategies import DensePlan, GrowError, build_plan

INITIAL = "initial"
PLAN_FILES = {"shared": "plan.json", "dense": "dense_plan.json"}


@dataclass(frozen=True)
class GrowSetup:
    """What the grow step decided before touching weights."""

    plan: Plan | DensePlan
    counts: ParamCounts
    output_dir: Path

    @property
    def kind(self) -> str:
        return "shared" if isinstance(self.plan, Plan) else "dense"

    @property
    def plan_file(self) -> Path:
        return self.output_dir / PLAN_FILES[self.kind]

    @property
    def initial_dir(self) -> Path:
        return self.output_dir / INITIAL


def source_config(recipe: GrowRecipe) -> PretrainedConfig:
    """The source model's config (a hub id downloads only ``config.json``).

    Raises:
        GrowError: the source is a compact (shared-block) checkpoint.
    """
    return read_source_config(
        recipe.model.source, GrowError, "grow a plain model (export it materialised first)"
    )


def plan_for(recipe: GrowRecipe, config: PretrainedConfig) -> GrowSetup:
    """Build and check the growth plan of `recipe` for a source of `config`; no weights are loaded."""
    plan = build_plan(
        recipe.grow.strategy, config.model_type, config.num_hidden_layers, recipe.grow.options()
    )
    # the source is part of the plan's identity: a rerun with another source must not reuse initial/
    plan.notes["source"] = recipe.model.source
    check_fits(plan, config)
    return GrowSetup(plan, param_counts(plan, config), Path(recipe.output_dir))


def _load_plan(path: Path) -> Plan | DensePlan:
    raw = json.loads(path.read_text())
    return DensePlan.from_dict(raw) if path.name == PLAN_FILES["dense"] else Plan.from_dict(raw)


def existing_state(setup: GrowSetup) -> str:
    """``fresh`` (nothing grown yet) or ``ready`` (initial model and an equal plan on disk).

    Raises:
        GrowError: ``output_dir`` holds a run with another plan, or of the other kind (shared / dense).
    """
    mine = setup.plan_file
    # a dense run's trainer writes an identity plan.json beside dense_plan.json, so dense_plan.json
    # tells the kinds apart
    dense_run = (setup.output_dir / PLAN_FILES["dense"]).is_file()
    other_kind = not dense_run and (setup.output_dir / PLAN_FILES["shared"]).is_file()
    if (setup.kind == "shared" and dense_run) or (setup.kind == "dense" and other_kind):
        theirs = "dense" if dense_run else "shared-block"
        raise GrowError(
            f"output_dir={str(setup.output_dir)!r} holds a {theirs} run; strategy {setup.plan.notes['strategy']!r} "
            "makes the other kind. Use another output_dir"
        )
    if not mine.is_file():
        return "fresh"
    if _load_plan(mine).to_dict() != setup.plan.to_dict():
        raise GrowError(
            f"output_dir={str(setup.output_dir)!r} was grown with another plan ({mine}); refusing to overwrite a "
            f"started run. Use another output_dir, or the recipe of that run ({setup.output_dir / 'grow_recipe.yaml'})"
        )
    return "ready" if (setup.initial_dir / "config.json").is_file() else "fresh"


def build_initial(recipe: GrowRecipe, setup: GrowSetup, tokenizer: Any = None) -> Path:
    """Load the source, grow it, save ``initial/`` and then the plan file (the completion mark).

    Args:
        recipe: the grow recipe (model section: source, attention kernel).
        setup: the plan from ``plan_for``.
        tokenizer: saved beside the model when given.

    Returns:
        The ``initial/`` directory.
    """
    source = load_model(recipe.model.source, attn_implementation=recipe.model.attn_implementation)
    model = grow_model(source, setup.plan, seed=recipe.train.seed)
    setup.output_dir.mkdir(parents=True, exist_ok=True)
    if setup.kind == "shared":
        save_compact(model, setup.initial_dir, tokenizer=tokenizer)
    else:
        _save_plain(model, setup.initial_dir, tokenizer)
    write_text_atomic(setup.output_dir / "grow_recipe.yaml", recipe.to_yaml())
    setup.plan.save(setup.plan_file)
    return setup.initial_dir


def _save_plain(model: Any, out: Path, tokenizer: Any) -> None:
    # written to a sibling first and renamed, so a killed run never leaves a half-written initial/
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier attempt
    model.save_pretrained(tmp)
    if tokenizer is not None:
        save_tokenizer(tokenizer, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def train_recipe(recipe: GrowRecipe, setup: GrowSetup) -> TrainRecipe:
    """The ``train`` recipe the trainer runs: the grow recipe's sections, starting from ``initial/``.

    A plan that trains only some layers (LLaMA-Pro) says which in ``train.trainable_layers``.
    """
    train: dict[str, Any] = {}
    if isinstance(setup.plan, DensePlan) and setup.plan.trainable == "inserted":
        train["trainable_layers"] = list(setup.plan.inserted)
    return handoff_train_recipe(recipe, setup.initial_dir, train=train)


def run(recipe: GrowRecipe, *, plan_only: bool = False, log: Any = print) -> Any:
    """The grow command: plan, report, build ``initial/`` once (rank 0), then train on every rank.

    Args:
        recipe: a validated grow recipe.
        plan_only: stop after printing the plan and the parameter counts (nothing is written and no
            weights are loaded).
        log: where the report lines go (rank 0 only).

    Returns:
        The setup when `plan_only`, else the trainer's result.

    Raises:
        GrowError: the plan does not fit the source, or ``output_dir`` holds another run.
    """
    config = source_config(recipe)
    setup = plan_for(recipe, config)
    if plan_only:
        log(setup.plan.summary())
        log(setup.counts.describe())
        return setup
    from flexigpt.shared.train.components import init_distributed
    from flexigpt.shared.train.launch import rank0_step

    state = existing_state(setup)  # on every rank, before anything is written: all refuse alike

    def grow_step() -> None:
        log(setup.plan.summary())
        log(setup.counts.describe())
        if state == "ready":
            log(f"{setup.initial_dir} and {setup.plan_file.name} match this recipe: continuing with training")
        else:
            log(f"growing {recipe.model.source} -> {setup.initial_dir}")
            tokenizer = load_command_tokenizer(
                recipe.model, GrowError, "the trainer needs one: set model.tokenizer"
            )
            build_initial(recipe, setup, tokenizer=tokenizer)

    # before any process group: the others wait outside every collective, so its timeout cannot cut
    # the build short
    rank0_step("the grow step", grow_step, GrowError, recipe.train.rank0_wait_s)
    init_distributed(recipe.train.cpu_shm_comm, recipe.train.dist_timeout_s)
    # every rank starts from the saved initial model, so all ranks (and every restart) agree exactly
    from flexigpt.shared.train.trainer import train

    return train(train_recipe(recipe, setup))
