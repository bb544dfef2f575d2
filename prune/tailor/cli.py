"""The tailor method of ``flexigpt-prune``: a recipe of ``kind: tailor`` (GPTailor).

    flexigpt-prune recipes/prune/tailor-local-tiny.yaml [key.path=value ...] [--prune-only]

A resumable search over layers cut from the base and stitched in from its fine-tuned variants;
the chosen model is exported as a plain model and, when the recipe has a ``train:`` section (and
without ``--prune-only``), trained for recovery by the same trainer: as it is (``tailor.recovery:
plain``) or with its removed positions filled by shared replacement slots (``flexigpt``). Every knob is a recipe field
(``flexigpt-prune --help-recipe tailor`` lists them); docs/tailor.md describes the method.
"""

from __future__ import annotations

import argparse
from typing import Any

from flexigpt.prune.tailor.recipe import TailorRecipe
from flexigpt.shared.command import command_parser, run_command, signal_exit_status
from flexigpt.shared.engine.plan import PlanError
from flexigpt.shared.recipe import RecipeError


def _run(recipe: TailorRecipe, args: argparse.Namespace, log: Any) -> int:
    from flexigpt.prune.tailor.recovery import recovery_recipe
    from flexigpt.prune.tailor.run import run

    run(recipe, log=log)
    if recipe.train is None or recipe.tailor.recovery == "none" or args.prune_only:
        return 0
    from flexigpt.shared.train.trainer import train

    r = train(recovery_recipe(recipe, log))
    log(f"[recovery] done: step {r.step}, {r.tokens_seen:,} tokens, last loss {r.last_loss}", flush=True)
    return signal_exit_status(r.interrupted_by)


def _known_errors() -> tuple[type[Exception], ...]:
    # these live beside the torch code that raises them: imported only once a run has failed
    from flexigpt.prune.tailor.stitch import StitchError
    from flexigpt.shared.evaluate.zeroshot import ZeroShotError

    return (StitchError, ZeroShotError, PlanError, RecipeError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a tailor recipe; returns the exit status (2: bad recipe or refused run)."""
    parser = command_parser(
        "flexigpt-prune",
        "tailor",
        "Cut and stitch layers across fine-tuned variants with GPTailor's search. See docs/tailor.md.",
    )
    parser.add_argument(
        "--prune-only",
        action="store_true",
        help="stop after the search and the export (no recovery training)",
    )
    return run_command("flexigpt-prune", TailorRecipe, parser, argv, _run, _known_errors)
