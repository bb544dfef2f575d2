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

A recipe of kind ``tailor`` runs GPTailor instead (docs/tailor.md): a resumable search over layers
cut from the base and stitched in from its fine-tuned variants, the chosen model exported as a plain
model, and, when the recipe has a ``train:`` section (and without ``--prune-only``), its plain
recovery training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from flexigpt.prune.depth.build import PruneError
from flexigpt.prune.depth.recipe import VARIANTS, PruneRecipe
from flexigpt.prune.tailor.recipe import TailorRecipe
from flexigpt.prune.tailor.stitch import StitchError
from flexigpt.shared.command import command_parser, run_command, signal_exit_status
from flexigpt.shared.engine.plan import PlanError
from flexigpt.shared.evaluate.zeroshot import ZeroShotError
from flexigpt.shared.recipe import RecipeError


def _parser() -> argparse.ArgumentParser:
    p = command_parser(
        "flexigpt-prune",
        "prune",
        f"Prune a model by block importance, build the variants {', '.join(VARIANTS)}, then train their "
        "recovery. See docs/pruning.md.",
    )
    p.add_argument(
        "--prune-only",
        action="store_true",
        help="stop after building, saving and measuring the variants (no training)",
    )
    return p


def _run(recipe: PruneRecipe, args: argparse.Namespace, log: Any) -> int:
    from flexigpt.prune.depth.run import run

    result = run(recipe, prune_only=args.prune_only, log=log)
    if args.prune_only:
        return 0
    stopped = None
    for name, r in result.items():
        log(f"[{name}] done: step {r.step}, {r.tokens_seen:,} tokens, last loss {r.last_loss}", flush=True)
        stopped = stopped or r.interrupted_by
    return signal_exit_status(stopped)


def _run_tailor(recipe: TailorRecipe, args: argparse.Namespace, log: Any) -> int:
    from flexigpt.prune.tailor.run import recovery_recipe, run

    run(recipe, log=log)
    if recipe.train is None or args.prune_only:
        return 0
    from flexigpt.shared.train.trainer import train

    r = train(recovery_recipe(recipe))
    log(f"[recovery] done: step {r.step}, {r.tokens_seen:,} tokens, last loss {r.last_loss}", flush=True)
    return signal_exit_status(r.interrupted_by)


# recipe kind -> (its schema, what runs it); a recipe of another kind is refused by run_command
KINDS: dict[str, tuple[type, Any]] = {"prune": (PruneRecipe, _run), "tailor": (TailorRecipe, _run_tailor)}


def _recipe_kind(argv: list[str]) -> str:
    """The ``kind`` the command line asks for (a ``kind=`` override, else the recipe file's); ``prune`` when unreadable."""
    kind = None
    positional = [a for a in argv if not a.startswith("-")]
    for a in positional[1:]:
        if a.startswith("kind="):
            kind = a.split("=", 1)[1].strip()
    if kind is None and positional:
        try:
            raw = yaml.safe_load(Path(positional[0]).read_text())
            kind = raw.get("kind") if isinstance(raw, dict) else None
        except (OSError, yaml.YAMLError):
            kind = None
    return kind if kind in KINDS else "prune"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2: bad recipe or refused run; 128 + signal when stopped by one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_cls, run_fn = KINDS[_recipe_kind(argv)]
    return run_command(
        "flexigpt-prune",
        recipe_cls,
        _parser(),
        argv,
        run_fn,
        (PruneError, PlanError, RecipeError, StitchError, ZeroShotError),
    )
