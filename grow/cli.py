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
import os
import sys

from flexigpt.shared.recipe import RecipeError, describe_recipe, load_recipe

from .recipe import GrowRecipe
from .strategies import STRATEGIES, GrowError


def _parser() -> argparse.ArgumentParser:
    strategies = ", ".join(f"{k} ({v.kind})" for k, v in STRATEGIES.items())
    p = argparse.ArgumentParser(
        prog="flexigpt-grow",
        description=f"Grow a model in depth, then continue pre-training it. Strategies: {strategies}. "
        "See docs/growing.md.",
    )
    p.add_argument("recipe", help="YAML recipe (kind: grow)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, validated like the file")
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="print the plan and parameter counts; load no weights, write nothing",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2: bad recipe or plan; 128 + signal when stopped by one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--help-recipe"]:
        print(describe_recipe(GrowRecipe))
        return 0
    args = _parser().parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if not isinstance(recipe, GrowRecipe):
            raise RecipeError(f"{args.recipe}: kind={recipe.kind!r}; flexigpt-grow runs kind 'grow' recipes")
    except RecipeError as e:
        print(f"flexigpt-grow: {e}", file=sys.stderr)
        return 2
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        print(f"# resolved recipe ({args.recipe})\n{recipe.to_yaml()}", flush=True)
    from .run import run

    try:
        result = run(recipe, plan_only=args.plan_only, log=print if main_rank else (lambda *_: None))
    except GrowError as e:
        print(f"flexigpt-grow: {e}", file=sys.stderr)
        return 2
    if args.plan_only:
        return 0
    if main_rank:
        print(
            f"done: step {result.step}, {result.tokens_seen:,} tokens, last loss {result.last_loss}",
            flush=True,
        )
    return 128 + result.interrupted_by if result.interrupted_by else 0
