"""The compare method of ``flexigpt-prune``: a recipe of ``kind: compare``.

    flexigpt-prune recipes/prune/compare-local-tiny.yaml [key.path=value ...]

Builds every method of ``compare.methods`` from one source model at one ratio on one calibration
text (the FlexiGPT family through the prune command, the baselines in their own directories),
gives each the recipe's recovery budget, then writes ``comparison.md``, ``comparison.json`` and
``comparison.png``. Run again, finished models and recovery runs are reused. Every knob is a
recipe field (``flexigpt-prune --help-recipe compare`` lists them).
"""

from __future__ import annotations

import argparse
from typing import Any

from flexigpt.prune.compare.recipe import CompareRecipe
from flexigpt.prune.depth.baselines import BaselineError
from flexigpt.prune.depth.build import PruneError
from flexigpt.shared.command import command_parser, run_command
from flexigpt.shared.engine.plan import PlanError
from flexigpt.shared.recipe import RecipeError


def _run(recipe: CompareRecipe, _args: argparse.Namespace, log: Any) -> int:
    from flexigpt.prune.compare.run import run

    run(recipe, log=log)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of a compare recipe; returns the exit status (2: bad recipe or refused run)."""
    parser = command_parser(
        "flexigpt-prune",
        "compare",
        "Compare depth-pruning methods at one ratio with one recovery budget. See docs/comparison.md.",
    )
    return run_command(
        "flexigpt-prune",
        CompareRecipe,
        parser,
        argv,
        _run,
        (PruneError, BaselineError, PlanError, RecipeError),
    )
