"""``flexigpt-train``: continued pre-training from a recipe, and checkpoint export.

    flexigpt-train RECIPE.yaml [key.path=value ...] [--resume auto|never|restart|DIR]
                   [--allow-plan-change] [--allow-world-size-change] [--allow-schedule-change]
    flexigpt-train export CHECKPOINT OUT_DIR [--materialize] [--peft] [--dtype float32|bfloat16|float16]
    flexigpt-train --help-recipe

The same as ``python -m flexigpt.shared.train``. Several ranks: ``torchrun --nproc_per_node N -m
flexigpt.shared.train RECIPE.yaml`` or ``deepspeed --num_gpus N --module flexigpt.shared.train
RECIPE.yaml`` (its ``--local_rank`` is accepted and becomes ``LOCAL_RANK``). Running the same command
again resumes from the newest valid checkpoint in ``output_dir``. Every training knob is a recipe
field (``--help-recipe`` lists them); the flags above only say how to treat existing checkpoints.

Exit status: 0 done; 2 a refused run (bad recipe, path, corpus or checkpoint, another run in
``output_dir``), with one line naming the key or file; 1 a run that failed once started (it
diverged, or a checkpoint could not be written), with what to change; 128 + N stopped by signal N
after its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from flexigpt.shared.command import HelpFormatter, command_parser, refusal_message, wants_recipe_help
from flexigpt.shared.recipe import RECIPE_KINDS, RecipeError, describe_recipe, load_recipe
from flexigpt.shared.threads import configure_cpu_threads


def _train_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "flexigpt-train",
        "train",
        "Continued pre-training with DeepSpeed ZeRO on a streamed corpus (see docs/training.md).",
    )
    p.epilog = (
        f"{p.epilog} Subcommand: 'flexigpt-train export CHECKPOINT OUT_DIR [--materialize]' "
        "('flexigpt-train export --help')."
    )
    p.add_argument(
        "--resume",
        default="auto",
        help="auto (default): newest valid checkpoint (refused if checkpoints exist and none is usable); "
        "never: refuse if checkpoints exist; restart: set existing checkpoints aside and start at step 0; "
        "or a checkpoint dir",
    )
    p.add_argument(
        "--allow-plan-change", action="store_true", help="resume a checkpoint of another plan (weights only)"
    )
    p.add_argument(
        "--allow-world-size-change",
        action="store_true",
        help="resume a checkpoint of another world size (weights only)",
    )
    p.add_argument(
        "--allow-schedule-change",
        action="store_true",
        help="resume although train.max_steps / token_budget / lr / warmup_steps / min_lr_ratio, the batch "
        "sizes or the data settings (seq_len, seed, sources, shuffle) changed; prints each change, and "
        "the data streams start again",
    )
    # The stock `deepspeed` launcher passes --local_rank=N to every rank (and sets LOCAL_RANK too).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def use_local_rank(local_rank: int | None) -> None:
    """Make a launcher's ``--local_rank`` the ``LOCAL_RANK`` the run reads (DeepSpeed and the device do).

    Raises:
        RecipeError: the flag and an already set ``LOCAL_RANK`` disagree.
    """
    if local_rank is None:
        return
    env = os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if env != str(local_rank):
        raise RecipeError(f"--local_rank={local_rank} disagrees with the environment's LOCAL_RANK={env}")


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexigpt-train export",
        description="Write the model of a training checkpoint (compact format), without a training engine.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", help="output_dir/checkpoints/step_N, or output_dir/checkpoints (newest)")
    p.add_argument("out_dir", help="directory of the compact model")
    p.add_argument(
        "--materialize", action="store_true", help="also write a plain HF model to OUT_DIR_materialized"
    )
    p.add_argument(
        "--peft",
        action="store_true",
        help="also write a plain base and a peft LoRA adapter to OUT_DIR_peft/{base,adapter} "
        "(plans whose slots each run their own block once, without output norms: ShortGPT+LoRA)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (128 + signal number when stopped by a signal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        args = _export_parser().parse_intermixed_args(argv[1:])
        configure_cpu_threads()
        return _guarded("flexigpt-train export", lambda: _export(args))
    if wants_recipe_help(argv):
        for kind, cls in RECIPE_KINDS.items():
            print(f"# kind: {kind}\n{describe_recipe(cls)}\n")
        return 0
    args = _train_parser().parse_intermixed_args(argv)
    try:
        use_local_rank(args.local_rank)
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"flexigpt-train: {e}", file=sys.stderr)
        return 2
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        print(f"# resolved recipe ({args.recipe})\n{recipe.to_yaml()}", flush=True)
    configure_cpu_threads(print if main_rank else None)
    return _guarded("flexigpt-train", lambda: _train(recipe, args), recipe)


def _train(recipe: object, args: argparse.Namespace) -> int:
    from flexigpt.shared.train.trainer import train

    result = train(
        recipe,
        resume=args.resume,
        allow_plan_change=args.allow_plan_change,
        allow_world_size_change=args.allow_world_size_change,
        allow_schedule_change=args.allow_schedule_change,
    )
    if result.interrupted_by is not None:
        return 128 + int(result.interrupted_by)
    return 0


def _export(args: argparse.Namespace) -> int:
    from flexigpt.shared.train.export import export_checkpoint

    for d in export_checkpoint(
        args.checkpoint, args.out_dir, materialize=args.materialize, peft=args.peft, dtype=args.dtype
    ):
        print(f"wrote {d}")
    return 0


def _guarded(prog: str, fn: Callable[[], int], recipe: object = None) -> int:
    """Run `fn`; a refused run prints one line and returns 2, a failed one prints what to change and returns 1.

    With the run's `recipe`, a failed hub download is answered in one line too (naming its hub ids).
    """
    from flexigpt.shared.engine.checkpoint import CheckpointError
    from flexigpt.shared.engine.plan import PlanError
    from flexigpt.shared.runguard import RunLockError
    from flexigpt.shared.train.data import DataError
    from flexigpt.shared.train.export import ExportError
    from flexigpt.shared.train.guards import TrainingError
    from flexigpt.shared.train.state import ResumeError

    try:
        return fn()
    except (RecipeError, DataError, ResumeError, RunLockError, ExportError, CheckpointError, PlanError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        message = refusal_message(recipe, e, ()) if recipe is not None else None
        if message is None:
            raise
        print(f"{prog}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
