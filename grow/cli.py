"""``flexigpt-grow``: grow a model in depth from a recipe, then continue pre-training it.

    flexigpt-grow RECIPE.yaml [key.path=value ...] [--plan-only]
    flexigpt-grow --help-recipe

The same as ``python -m flexigpt.grow``. The command prints the resolved recipe, the plan and the
stored parameters against the dense equivalent, saves the grown model to ``output_dir/initial``
with ``plan.json`` (``dense_plan.json`` for the dense baselines), and hands over to the trainer.
Run again, it skips the grow step and the trainer resumes; a recipe whose plan differs from the
saved one is refused. Several ranks: ``torchrun --nproc_per_node N -m flexigpt.grow RECIPE.yaml``
(rank 0 grows, every rank trains). Every knob is a recipe field (``--help-recipe`` lists them).
"""

from __future__ import annotations

import argparse
from typing import Any

from flexigpt.shared.command import command_parser, run_command, signal_exit_status

from .recipe import GrowRecipe
from .strategies import STRATEGIES, GrowError


def _parser() -> argparse.ArgumentParser:
    strategies = ", ".join(f"{k} ({v.kind})" for k, v in STRATEGIES.items())
    p = command_parser(
        "flexigpt-grow",
        "grow",
        f"Grow a model in depth, then continue pre-training it. Strategies: {strategies}. See docs/growing.md.",
    )
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="print the plan and parameter counts; load no weights, write nothing",
    )
    return p


def _run(recipe: GrowRecipe, args: argparse.Namespace, log: Any) -> int:
    from .run import run

    result = run(recipe, plan_only=args.plan_only, log=log)
    if args.plan_only:
        return 0
    log(f"done: step {result.step}, {result.tokens_seen:,} tokens, last loss {result.last_loss}", flush=True)
    return signal_exit_status(result.interrupted_by)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2: bad recipe or plan; 128 + signal when stopped by one)."""
    return run_command("flexigpt-grow", GrowRecipe, _parser(), argv, _run, (GrowError,))
