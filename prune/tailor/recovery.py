"""Recovery training of the chosen stitched model, by the project's trainer (``tailor.recovery``).

- ``plain``: the exported plain model (``output_dir/model``) trains in ``output_dir/recovery``.
- ``flexigpt``: every removed position gets a replacement slot, as the depth-prune command makes
  them. The chosen plan is built at full depth first: its kept positions carry the stitched blocks
  and each removed position the base layer it removed. On that model the base selection of
  ``prune/depth/selection.py`` picks a kept block per removed position, and ``build_plan("flexigpt")``
  gives each slot adapters initialised from the SVD of the removed layer minus the picked block,
  and an output norm (``tailor.replace``). The shared model is saved in the compact format to
  ``output_dir/flexigpt/initial`` and trains in ``output_dir/flexigpt``.

Both get the recipe's ``train:`` and ``data:`` sections, the same budget rules as the prune command.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flexigpt.prune.tailor.recipe import TailorRecipe
from flexigpt.prune.tailor.stitch import Position, StitchError, StitchPlan

INITIAL = "initial"


def filled_plan(plan: StitchPlan) -> StitchPlan:
    """`plan` at full depth: its kept positions as chosen, each removed position the base layer."""
    filled = list(plan.positions) + [Position(i, "base") for i in plan.removed]
    return StitchPlan(plan.base_layers, tuple(sorted(filled, key=lambda p: p.layer)), plan.top)


def flexigpt_model(
    recipe: TailorRecipe, plan: StitchPlan, tokenizer: Any, log: Callable[..., None] = print
) -> Any:
    """The shared-block model of `plan` with replacement slots at its removed positions (`tokenizer`
    reads the calibration text of a measured gamma).

    Returns:
        The model (``model.plan`` holds the slot plan; its ``notes`` the stitch plan and the picks).

    Raises:
        StitchError: the plan removes nothing, or the replacement options do not fit the model.
    """
    from flexigpt.prune.depth.build import PruneError, build_variant
    from flexigpt.prune.depth.recipe import replacement_options
    from flexigpt.prune.depth.replace import build_plan, choose_bases
    from flexigpt.prune.depth.selection import source_from_model
    from flexigpt.prune.tailor.build import Stitcher
    from flexigpt.prune.tailor.run import open_sources, tailor_device, tailor_dtype
    from flexigpt.shared.engine.plan import PlanError

    if not plan.removed:
        raise StitchError(
            "tailor.recovery=flexigpt: the chosen plan removes no layer; there is nothing to replace"
        )
    t = recipe.tailor
    device = tailor_device(t.device)
    sources = open_sources(recipe, tailor_dtype(recipe.model.dtype, device))
    full = filled_plan(plan)
    stitcher = Stitcher(
        sources, plan.base_layers, device=device, attn_implementation=recipe.model.attn_implementation
    )
    model = stitcher.build(full)
    options = replacement_options(t.replace, t.selection)
    sel = choose_bases(source_from_model(model), plan.removed, options, device=device, progress=False)
    try:
        slots = build_plan("flexigpt", model.config, sel, options)
        slots.notes.update({"stitch_plan": plan.to_dict(), "source": recipe.model.source})
        shared = build_variant(model, slots, model.config, seed=recipe.train.seed if recipe.train else None)
    except (PlanError, PruneError) as e:
        raise StitchError(f"tailor.replace: {e}") from e
    if t.replace.out_norm and t.replace.gamma == "measured":
        _measure_gamma(recipe, shared, device, tokenizer, log)
    log(f"[flexigpt] picks (removed position -> kept block): {sel.picks}; {slots.summary()}", flush=True)
    return shared


def _measure_gamma(
    recipe: TailorRecipe, model: Any, device: Any, tokenizer: Any, log: Callable[..., None]
) -> None:
    """``replace.gamma: measured``: each output norm starts at its slot's own output scale, measured on
    the warm-start calibration text (the prune command measures on its gamma text the same way)."""
    from flexigpt.prune.depth.gamma import measure_gamma
    from flexigpt.prune.tailor.run import calibration_tensors

    samples = calibration_tensors(recipe, tokenizer)
    gammas = measure_gamma(model, [x.to(device) for x in samples])
    mean = float(sum(g.mean() for g in gammas) / len(gammas))
    model.plan.notes["gamma_measured"] = {"mean": mean, "per_feature": True}
    log(f"[flexigpt] output-norm gamma measured on the calibration text: mean {mean:.3g}", flush=True)


def flexigpt_initial(recipe: TailorRecipe, log: Callable[..., None] = print) -> Path:
    """Build and save (compact format) the FlexiGPT-style model of ``output_dir/stitch_plan.yaml``.

    A saved initial model of the same stitch plan is kept as it is, so that its training resumes.

    Returns:
        ``output_dir/flexigpt/initial``.
    """
    from flexigpt.shared.command import load_command_tokenizer
    from flexigpt.shared.engine.checkpoint import save_compact

    out = Path(recipe.output_dir)
    plan = StitchPlan.load(out / "stitch_plan.yaml")
    plan = StitchPlan(plan.base_layers, plan.positions, plan.top)  # the scores are no part of the model
    initial = out / "flexigpt" / INITIAL
    plan_file = initial / "plan.json"
    if plan_file.is_file():
        notes = json.loads(plan_file.read_text()).get("notes", {})
        if notes.get("stitch_plan") == plan.to_dict():
            log(f"[flexigpt] initial model of the chosen plan already in {initial}", flush=True)
            return initial
        if (out / "flexigpt").is_dir() and any(p.name != INITIAL for p in (out / "flexigpt").iterdir()):
            raise StitchError(
                f"{out / 'flexigpt'}: its training started from another stitch plan; remove that directory "
                "to train the chosen one"
            )
    tokenizer = load_command_tokenizer(recipe.model, StitchError)
    model = flexigpt_model(recipe, plan, tokenizer, log)
    save_compact(model, initial, tokenizer=tokenizer)
    log(f"[flexigpt] initial model -> {initial}", flush=True)
    return initial


def recovery_recipe(recipe: TailorRecipe, log: Callable[..., None] = print) -> Any:
    """The ``train`` recipe of the recipe's recovery (``tailor.recovery`` plain or flexigpt)."""
    from flexigpt.prune.depth.run import compact_export
    from flexigpt.shared.command import handoff_train_recipe
    from flexigpt.shared.engine.plan import Plan

    out = Path(recipe.output_dir)
    if recipe.tailor.recovery == "plain":
        return handoff_train_recipe(recipe, out / "model", output_dir=out / "recovery")
    initial = flexigpt_initial(recipe, log)
    train = compact_export(recipe.train.export, Plan.load(initial / "plan.json"))
    return handoff_train_recipe(recipe, initial, output_dir=out / "flexigpt", train=train)
