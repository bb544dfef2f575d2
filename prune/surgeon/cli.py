"""The surgeon method of ``flexigpt-prune``: a recipe of ``kind: surgeon``.

    flexigpt-prune recipes/prune/surgeon-local-tiny.yaml [key.path=value ...]

Prunes the source model with every method of ``surgeon.methods`` over ``surgeon.shots`` shots,
then writes each variant (shrunk compact model, plain export, per-layer sparsity) and
``summary.json``. Run again, it resumes after the last finished shot. Every knob is a recipe
field (``flexigpt-prune --help-recipe surgeon`` lists them).
"""

from __future__ import annotations

import argparse
from typing import Any

from flexigpt.prune.surgeon.recipe import SurgeonError, SurgeonRecipe
from flexigpt.shared.command import command_parser, run_command
from flexigpt.shared.engine.plan import PlanError
from flexigpt.shared.recipe import RecipeError


def _run(recipe: SurgeonRecipe, _args: argparse.Namespace, log: Any) -> int:
    from flexigpt.prune.surgeon.run import run

    run(recipe, log=log)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of a surgeon recipe; returns the exit status (2: bad recipe or refused run)."""
    parser = command_parser(
        "flexigpt-prune", "surgeon", "Prune rows and columns with the LLM Surgeon. See docs/surgeon.md."
    )
    return run_command(
        "flexigpt-prune", SurgeonRecipe, parser, argv, _run, (SurgeonError, PlanError, RecipeError)
    )
