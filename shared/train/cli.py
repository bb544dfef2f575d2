"""``flexigpt-train``: continued pre-training from a recipe, and checkpoint export.

    flexigpt-train RECIPE.yaml [key.path=value ...] [--resume auto|never|DIR]
                   [--allow-plan-change] [--allow-world-size-change]
    flexigpt-train export CHECKPOINT OUT_DIR [--materialize] [--peft] [--dtype float32|bfloat16|float16]
    flexigpt-train --help-recipe

The same as ``python -m flexigpt.shared.train``. Several ranks: ``torchrun --nproc_per_node N -m
flexigpt.shared.train RECIPE.yaml`` or ``deepspeed --num_gpus N --module flexigpt.shared.train
RECIPE.yaml`` (its ``--local_rank`` is accepted and becomes ``LOCAL_RANK``). Running the same command
again resumes from the newest valid checkpoint in ``output_dir``. Every training knob is a recipe
field (``--help-recipe`` lists them); the flags above only say how to treat existing checkpoints.
"""

from __future__ import annotations

import argparse
import os
import sys

from flexigpt.shared.recipe import RECIPE_KINDS, RecipeError, describe_recipe, load_recipe


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexigpt-train",
        description="Continued pre-training with DeepSpeed ZeRO on a streamed corpus (see docs/training.md).",
        epilog="Subcommand: 'flexigpt-train export CHECKPOINT OUT_DIR [--materialize]'. "
        "'--help-recipe' lists every recipe field.",
    )
    p.add_argument("recipe", help="YAML recipe (kind: train)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, validated like the file")
    p.add_argument(
        "--resume", default="auto", help="auto (default): newest valid checkpoint; never; or a checkpoint dir"
    )
    p.add_argument(
        "--allow-plan-change", action="store_true", help="resume a checkpoint of another plan (weights only)"
    )
    p.add_argument(
        "--allow-world-size-change",
        action="store_true",
        help="resume a checkpoint of another world size (weights only)",
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
    if argv[:1] == ["--help-recipe"]:
        for kind, cls in RECIPE_KINDS.items():
            print(f"# kind: {kind}\n{describe_recipe(cls)}\n")
        return 0
    if argv[:1] == ["export"]:
        args = _export_parser().parse_args(argv[1:])
        from flexigpt.shared.train.export import ExportError, export_checkpoint

        try:
            written = export_checkpoint(
                args.checkpoint, args.out_dir, materialize=args.materialize, peft=args.peft, dtype=args.dtype
            )
        except ExportError as e:
            print(f"flexigpt-train export: {e}", file=sys.stderr)
            return 2
        for d in written:
            print(f"wrote {d}")
        return 0
    args = _train_parser().parse_args(argv)
    try:
        use_local_rank(args.local_rank)
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"flexigpt-train: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"# resolved recipe ({args.recipe})\n{recipe.to_yaml()}", flush=True)
    from flexigpt.shared.train.trainer import train

    result = train(
        recipe,
        resume=args.resume,
        allow_plan_change=args.allow_plan_change,
        allow_world_size_change=args.allow_world_size_change,
    )
    if result.interrupted_by is not None:
        return 128 + int(result.interrupted_by)
    return 0


if __name__ == "__main__":
    sys.exit(main())
