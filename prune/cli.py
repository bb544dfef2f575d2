"""``flexigpt-prune``: prune a model from a recipe, then train every variant's recovery.

    flexigpt-prune RECIPE.yaml [key.path=value ...] [--prune-only]
    flexigpt-prune --help-recipe

The same as ``python -m flexigpt.prune``. The command prints the resolved recipe; computes block
importance on the calibration stream (``importance.json`` + PNG); removes the lowest-scoring
blocks; picks a base block for each removed one (``selection.json`` + heatmap); prints every
variant's plan (flexigpt, shortgpt, shortgpt_lora); saves each variant to
``output_dir/<variant>/initial`` (ShortGPT also as a plain HF model in ``initial_plain``); reports
the start perplexity of each variant and of the unpruned model (``summary.json``); then hands each
variant to the trainer with the same recovery budget. Run again, it skips every finished step and
the trainer resumes; a recipe whose plan differs from the saved one is refused. Several ranks:
``torchrun --nproc_per_node N -m flexigpt.prune RECIPE.yaml`` (rank 0 prunes, every rank trains);
for a 7B model run ``--prune-only`` once first, so no rank waits on the pruning step. Every knob is
a recipe field (``--help-recipe`` lists them).
"""

from __future__ import annotations

import argparse
import os
import sys

from flexigpt.shared.plan import PlanError
from flexigpt.shared.recipe import RecipeError, describe_recipe, load_recipe

from .build import PruneError
from .recipe import VARIANTS, PruneRecipe


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexigpt-prune",
        description=f"Prune a model by block importance, build the variants {', '.join(VARIANTS)}, then train "
        "their recovery. See docs/pruning.md.",
    )
    p.add_argument("recipe", help="YAML recipe (kind: prune)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, validated like the file")
    p.add_argument(
        "--prune-only",
        action="store_true",
        help="stop after building, saving and measuring the variants (no training)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2: bad recipe or refused run; 128 + signal when stopped by one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--help-recipe"]:
        print(describe_recipe(PruneRecipe))
        return 0
    args = _parser().parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if not isinstance(recipe, PruneRecipe):
            raise RecipeError(
                f"{args.recipe}: kind={recipe.kind!r}; flexigpt-prune runs kind 'prune' recipes"
            )
    except RecipeError as e:
        print(f"flexigpt-prune: {e}", file=sys.stderr)
        return 2
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        print(f"# resolved recipe ({args.recipe})\n{recipe.to_yaml()}", flush=True)
    from .run import run

    try:
        result = run(recipe, prune_only=args.prune_only, log=print if main_rank else (lambda *_: None))
    except (PruneError, PlanError, RecipeError) as e:
        print(f"flexigpt-prune: {e}", file=sys.stderr)
        return 2
    if args.prune_only:
        return 0
    stopped = None
    for name, r in result.items():
        if main_rank:
            print(
                f"[{name}] done: step {r.step}, {r.tokens_seen:,} tokens, last loss {r.last_loss}", flush=True
            )
        stopped = stopped or r.interrupted_by
    return 128 + stopped if stopped else 0
