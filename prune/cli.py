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
rank 0 prunes outside the process group's timeout while the others wait. Every knob is a recipe
field (``--help-recipe`` lists them).

The recipe's ``kind`` picks the method: ``prune`` (depth pruning, above), ``surgeon`` (the LLM
Surgeon, ``prune/surgeon/cli.py``, docs/surgeon.md), ``tailor`` (GPTailor, ``prune/tailor/cli.py``,
docs/tailor.md) or ``compare`` (methods side by side, ``prune/compare/cli.py``,
docs/comparison.md); ``flexigpt-prune --help-recipe KIND`` lists a kind's fields.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import yaml

from flexigpt.prune.depth.recipe import VARIANTS, PruneRecipe
from flexigpt.shared.command import command_parser, run_command, signal_exit_status
from flexigpt.shared.engine.plan import PlanError
from flexigpt.shared.recipe import RecipeError


def _parser() -> argparse.ArgumentParser:
    p = command_parser(
        "flexigpt-prune",
        "prune",
        f"Prune a model by block importance, build the variants {', '.join(VARIANTS)}, then train their "
        "recovery (docs/pruning.md). The recipe's kind picks the method: prune (this one), surgeon (the LLM "
        "Surgeon, docs/surgeon.md), tailor (GPTailor, docs/tailor.md) or compare (methods side by side, "
        "docs/comparison.md); 'flexigpt-prune --help-recipe KIND' lists a kind's fields.",
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


# Recipe kind -> the module whose ``main`` runs it; kind ``prune`` (depth pruning) is run here.
METHOD_COMMANDS: dict[str, str] = {
    "surgeon": "flexigpt.prune.surgeon.cli",
    "tailor": "flexigpt.prune.tailor.cli",
    "compare": "flexigpt.prune.compare.cli",
}


def _method_kind(argv: list[str]) -> str | None:
    """The kind of the recipe `argv` names (``--help-recipe KIND`` too), when another module runs it."""
    if argv[:1] == ["--help-recipe"]:
        return argv[1] if len(argv) > 1 and argv[1] in METHOD_COMMANDS else None
    kind = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("kind=")), None)
    if kind is None and argv and Path(argv[0]).is_file():
        try:
            raw = yaml.safe_load(Path(argv[0]).read_text())
        except (OSError, yaml.YAMLError):
            return None  # the normal path reports the unreadable recipe
        kind = raw.get("kind") if isinstance(raw, dict) else None
    return kind if kind in METHOD_COMMANDS else None


def _known_errors() -> tuple[type[Exception], ...]:
    # PruneError lives beside the torch code that raises it; asked for only once a run has failed
    from flexigpt.prune.depth.build import PruneError

    return (PruneError, PlanError, RecipeError)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2: bad recipe or refused run; 128 + signal when stopped by one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kind = _method_kind(argv)
    if kind is not None:
        return importlib.import_module(METHOD_COMMANDS[kind]).main(
            argv[:1] if argv[0] == "--help-recipe" else argv
        )
    return run_command("flexigpt-prune", PruneRecipe, _parser(), argv, _run, _known_errors)
