"""How a run meets its output directory and its checkpoints: the run lock, and the resume rules.

- ``output_lock``: rank 0 holds the lock of ``output_dir``; every rank stops if it could not.
- ``resume_mode``: whether a checkpoint loads whole or only as weights (world size, plan, ZeRO stage).
- ``check_schedule``: a resume that changes the schedule or data order, refused unless allowed.
- ``none_usable``: checkpoints exist but none can be used: the run stops rather than start over.
- ``load_or_refuse``: a model or tokenizer that cannot be read becomes a message naming its key.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from flexigpt.shared.recipe import BaseRecipe, RecipeError
from flexigpt.shared.runguard import RunLockError, run_lock
from flexigpt.shared.train.guards import schedule_changes
from flexigpt.shared.train.state import CheckpointInfo, ResumeError, _all_true


@contextmanager
def output_lock(out: Path, rank: int) -> Iterator[None]:
    """Rank 0 holds the run lock of `out` while inside; every rank raises if it could not be taken."""
    error: RunLockError | None = None
    with ExitStack() as stack:
        if rank == 0:
            try:
                stack.enter_context(run_lock(out))
            except RunLockError as e:
                error = e
        if not _all_true(error is None):
            raise error or RunLockError(f"rank 0 could not lock output_dir={str(out)!r}")
        yield


def resume_mode(
    info: CheckpointInfo, world: int, plan_json: str, stage: int, allow_plan: bool, allow_world: bool
) -> str:
    """``full`` (engine state loads as is) or ``weights`` (consolidated weights only); raise if refused."""
    problems = []
    if info.world_size != world:
        if not allow_world:
            raise ResumeError(
                f"{info.path} was written by {info.world_size} ranks, this run has {world}; ZeRO partitions and "
                "stream positions are per rank. Pass --allow-world-size-change to continue from its weights "
                "(fresh optimizer state and data streams), or run with the same world size"
            )
        problems.append("world size")
    if info.plan_json is not None and json.loads(info.plan_json) != json.loads(plan_json):
        if not allow_plan:
            raise ResumeError(
                f"{info.path} was trained with another plan than this run's; pass --allow-plan-change to load the "
                "weights whose names match (fresh optimizer state), or use the plan of the checkpoint"
            )
        problems.append("plan")
    if info.zero_stage != stage:
        warnings.warn(
            f"{info.path} was written with ZeRO-{info.zero_stage}, this run uses ZeRO-{stage}: "
            "continuing from its weights with a fresh optimizer state",
            stacklevel=2,
        )
        problems.append("zero stage")
    return "weights" if problems else "full"


def load_or_refuse(fn: Any, section: Any, key: str, value: str, *args: Any) -> Any:
    """`fn(section, *args)`, with a failure to read `value` reported as a RecipeError naming `key`."""
    from flexigpt.shared.engine.plan import PlanError

    try:
        return fn(section, *args)
    except PlanError as e:  # an unsupported architecture, or a plan that does not fit the model
        raise RecipeError(f"{key}={value!r}: {e}") from None
    except (OSError, ValueError) as e:
        from flexigpt.shared.hub import hub_message

        hub = hub_message(key, value, e, "the tokenizer" if fn.__name__ == "load_tokenizer" else "the model")
        if hub is not None:
            raise RecipeError(hub) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise RecipeError(f"{key}={value!r} could not be loaded: {first}") from None


def none_usable(paths: list[Path], why: str) -> ResumeError:
    """The refusal of a run whose checkpoints all failed (`why`): it names them and the way to start over."""
    names = ", ".join(p.name for p in paths)
    return ResumeError(
        f"checkpoints exist in {paths[0].parent} but none is usable: they {why} ({names}); nothing was trained. "
        "Restore a good checkpoint, or pass --resume restart to set them aside and start again from step 0"
    )


def check_schedule(info: CheckpointInfo, recipe: BaseRecipe, allow: bool, rank: int) -> list[tuple]:
    """The schedule / data-order fields changed since `info`; refused unless `allow`, printed if allowed."""
    try:
        text = (info.path / "recipe.yaml").read_text()
    except OSError:
        return []
    changes = schedule_changes(text, recipe)
    lines = [f"  {k}: {old!r} -> {new!r}" for k, old, new in changes]
    if changes and not allow:
        raise ResumeError(
            f"{info.path} was trained with another schedule or data order; resuming would not continue that "
            "run:\n" + "\n".join(lines) + "\nrestore those values, use another output_dir, or pass "
            "--allow-schedule-change to continue with the new ones"
        )
    if rank == 0:
        for k, old, new in changes:
            print(f"schedule change on resume from {info.path.name}: {k} {old!r} -> {new!r}")
    return changes
