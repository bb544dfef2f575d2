"""What the grow and prune commands share: the CLI main, the command recipe base, the hand-off to the trainer.

Both commands read a recipe of their own kind, build a model once on rank 0, save it to an
``initial/`` directory and hand a ``train`` recipe starting from there to the trainer on every rank.
The pieces of that shape live here so that ``grow/`` and ``prune/`` (which never import each other)
keep only what is theirs. Importing this module loads no torch or transformers: ``--help-recipe``
and a bad recipe answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import model_validator

from flexigpt.shared.recipe import (
    BaseRecipe,
    ModelSection,
    RecipeError,
    TrainRecipe,
    describe_recipe,
    load_recipe,
)
from flexigpt.shared.threads import configure_cpu_threads

if TYPE_CHECKING:
    from transformers import PretrainedConfig

RunFn = Callable[[Any, argparse.Namespace, Callable[..., None]], int]


class CommandRecipe(BaseRecipe):
    """A recipe whose command makes the model (and its plan) itself from its own section, then trains it.

    Subclasses name that section in ``command_section`` (it is dropped from the hand-off ``train``
    recipe) and say in ``plan_made`` what the command makes, for the ``model.plan`` refusal.
    """

    command_section: ClassVar[str]
    plan_made: ClassVar[str] = "the plan"

    @model_validator(mode="after")
    def _check_no_model_plan(self) -> CommandRecipe:
        # the command's own section decides the plan; a second one from model.plan would contradict it
        if self.model.plan is not None:
            s = self.command_section
            raise ValueError(
                f"model.plan: the {s} command makes {self.plan_made} itself from {s}:; set model.plan to null"
            )
        return self


def _quiet(*_: Any, **__: Any) -> None:
    """The report sink of every rank but 0."""


def is_main_rank() -> bool:
    """Whether this process is rank 0 (or runs without a launcher)."""
    return os.environ.get("RANK", "0") == "0"


HELP_RECIPE = "print every recipe field with its type, default and description, then exit"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, wrapping only at spaces: option names such as ``--help-recipe`` stay whole."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
            break_long_words=False,
        )

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


def command_parser(prog: str, kind: str, description: str) -> argparse.ArgumentParser:
    """The argument parser every recipe command starts from: ``RECIPE.yaml [key.path=value ...]``.

    The command adds its own flags; every other knob is a recipe field (the flag set stays closed).
    Flags may stand anywhere among the overrides (``run_command`` parses intermixed arguments).
    """
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=HelpFormatter,
        epilog=f"Every knob is a recipe field: '{prog} --help-recipe' lists them; override any of them "
        "as key.path=value.",
    )
    p.add_argument("recipe", help=f"YAML recipe (kind: {kind})")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, validated like the file")
    p.add_argument("--help-recipe", action="store_true", help=HELP_RECIPE)
    return p


def wants_recipe_help(argv: list[str]) -> bool:
    """Whether ``--help-recipe`` stands anywhere in `argv` (it needs no recipe, so argparse must not run first)."""
    return "--help-recipe" in argv


def refusal_message(recipe: BaseRecipe, exc: Exception, known: tuple[type[Exception], ...]) -> str | None:
    """The one-line refusal for `exc` raised by a run of `recipe`, or None when it is a bug to show in full.

    A `known` exception says what to change itself; a failed hub download gets a line naming the
    recipe's hub ids and how to use local copies instead.
    """
    if isinstance(exc, known):
        return str(exc)
    from flexigpt.shared.hub import recipe_hub_message

    return recipe_hub_message(recipe.model_dump(mode="json"), exc)


def run_command(
    prog: str,
    recipe_cls: type[BaseRecipe],
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    run_fn: RunFn,
    known_errors: tuple[type[Exception], ...] | Callable[[], tuple[type[Exception], ...]] = (),
) -> int:
    """The main of a recipe command: parse, validate, print the resolved recipe, run, map errors to exit 2.

    Args:
        prog: the command name, the prefix of every error line.
        recipe_cls: the recipe class of the command's kind; another kind is refused.
        parser: parses ``recipe`` (a path), ``overrides`` (``key.path=value``) and the command's flags.
        argv: the arguments (``sys.argv[1:]`` when None). ``--help-recipe`` first prints every field.
        run_fn: ``run_fn(recipe, args, log)`` does the work and returns the exit status; ``log`` is
            ``print`` on rank 0 and silent on the others.
        known_errors: exceptions of `run_fn` that mean a refused run: their message, exit status 2
            (or a function returning them, asked only once `run_fn` failed: classes that live beside
            torch code need not be imported for ``--help`` or a bad recipe). A failed hub download
            is answered the same way, in one line naming the recipe's hub ids.
            Exceptions with an ``exit_status`` attribute (the trainer's) print their message and
            exit with that status.

    Returns:
        The exit status: 0, 2 for a bad recipe or a refused run, or what `run_fn` returns
        (``signal_exit_status``: 128 + signal number when a signal stopped training).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_recipe_help(argv):
        print(describe_recipe(recipe_cls))
        return 0
    args = parser.parse_intermixed_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if not isinstance(recipe, recipe_cls):
            kind = recipe_cls.model_fields["kind"].default
            raise RecipeError(f"{args.recipe}: kind={recipe.kind!r}; {prog} runs kind {kind!r} recipes")
    except RecipeError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    main_rank = is_main_rank()
    log = print if main_rank else _quiet
    if main_rank:
        print(f"# resolved recipe ({args.recipe})\n{recipe.to_yaml()}", flush=True)
    configure_cpu_threads(log)
    from flexigpt.shared.runguard import RunLockError, run_lock, stop_with_launcher
    from flexigpt.shared.train.guards import check_weight_files

    stop_with_launcher()
    try:
        check_weight_files(recipe.model.source, recipe.model.allow_pickle_weights)
        # rank 0 holds output_dir for the whole command (the trainer it hands over to takes the
        # same lock again); a refused rank 0 exits 2 and the launcher stops the others. A plan-only
        # run writes nothing, so it neither creates output_dir nor waits for another run's lock.
        writes = main_rank and not getattr(args, "plan_only", False)
        with run_lock(recipe.output_dir) if writes else contextlib.nullcontext():
            return run_fn(recipe, args, log)
    except (RunLockError, RecipeError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # the trainer's refusals and failures (resume, data, divergence, a failed save) carry their
        # exit status; anything else known is refused with exit 2, the rest is a bug with its traceback
        status = getattr(e, "exit_status", None)
        if status is not None:
            print(f"{prog}: {e}", file=sys.stderr)
            return int(status)
        message = refusal_message(recipe, e, known_errors() if callable(known_errors) else known_errors)
        if message is None:
            raise
        print(f"{prog}: {message}", file=sys.stderr)
        return 2


def signal_exit_status(interrupted_by: int | None) -> int:
    """128 + the signal number that stopped training (the shell's convention), else 0."""
    return 128 + interrupted_by if interrupted_by else 0


def read_source_config(source: str, error: type[Exception], refusal: str) -> PretrainedConfig:
    """The config of the plain source model `source` (a hub id downloads only ``config.json``).

    Args:
        source: ``model.source`` of the recipe.
        error: the command's error class.
        refusal: what the command asks for instead of a compact checkpoint (ends the message).

    Raises:
        error: the source is a compact (shared-block) checkpoint, or its config cannot be read (one
            line; a hub id that cannot be fetched is told how to point ``model.source`` at a directory).
    """
    from transformers import AutoConfig

    from flexigpt.shared.engine.checkpoint import is_compact
    from flexigpt.shared.hub import hub_message

    if Path(source).is_dir() and is_compact(source):
        raise error(f"model.source={source!r} is a compact shared-block checkpoint; {refusal}")
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as e:  # transformers' answer for no network, an unknown id, a directory without config
        message = hub_message("model.source", source, e) or f"model.source={source!r}: {_first_line(e)}"
        raise error(message) from e


def load_command_tokenizer(
    model: ModelSection, error: type[Exception], advice: str = "set model.tokenizer"
) -> Any:
    """The tokenizer of the model section, or `error` naming ``model.tokenizer`` / ``model.source``.

    Raises:
        error: no tokenizer could be loaded from either (the message ends with `advice`).
    """
    from flexigpt.shared.hub import hub_message
    from flexigpt.shared.train.components import load_tokenizer

    try:
        return load_tokenizer(model)
    except (OSError, ValueError) as e:
        key = "model.tokenizer" if model.tokenizer else "model.source"
        hub = hub_message(key, model.tokenizer or model.source, e, "the tokenizer")
        if hub is not None:
            raise error(hub) from e
        raise error(
            f"model.tokenizer={model.tokenizer!r} / model.source={model.source!r}: no tokenizer "
            f"could be loaded ({_first_line(e)}); {advice}"
        ) from e


def _first_line(e: BaseException) -> str:
    # transformers' messages run to several lines of advice; the commands answer in one
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def handoff_train_recipe(
    recipe: CommandRecipe,
    initial: Path,
    *,
    output_dir: Path | None = None,
    train: dict[str, Any] | None = None,
) -> TrainRecipe:
    """The ``train`` recipe the trainer runs after a command: its sections, starting from ``initial/``.

    Args:
        recipe: the command's recipe; its ``command_section`` is dropped.
        initial: the saved model the training starts from (``model.source``).
        output_dir: the training's run directory; None keeps the recipe's ``output_dir``.
        train: ``train:`` values that replace the recipe's (e.g. ``trainable_layers``).

    Returns:
        The validated ``train`` recipe. Its tokenizer is the recipe's ``model.tokenizer``, else the
        one saved in `initial`, else the original source's; ``model.plan`` is null (`initial` carries
        its plan).
    """
    raw = recipe.model_dump(mode="json")
    raw.pop(recipe.command_section)
    raw["kind"] = "train"
    if output_dir is not None:
        raw["output_dir"] = str(output_dir)
    raw["model"]["source"] = str(initial)
    raw["model"]["tokenizer"] = recipe.model.tokenizer or (
        str(initial) if (initial / "tokenizer_config.json").is_file() else recipe.model.source
    )
    raw["model"]["plan"] = None
    if recipe.train.lr_is_default:
        raw["train"]["lr"] = None  # the default follows the trainable set, which `train` may change
    raw["train"].update(train or {})
    return TrainRecipe.model_validate(raw)


def pick_device(want: str, key: str, error: type[Exception]) -> Any:
    """The torch device a recipe's ``device`` key asks for (``auto``: cuda when available).

    Args:
        want: ``auto``, ``cpu`` or ``cuda``.
        key: the recipe key, named in the error.
        error: the command's error class.

    Raises:
        error: cuda asked for on a machine without a GPU.
    """
    import torch

    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise error(f"{key}='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(want)
