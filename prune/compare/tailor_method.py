"""The method ``tailor`` of the comparison: GPTailor (the tailor command) at the comparison's ratio.

The tailor command runs as a library call in ``output_dir/tailor-run/`` (its own files, resumable as
the command is) with a ``tailor:`` section made from ``compare.tailor``: the ratio that removes the
comparison's n of L layers, the comparison's device, ``export: true`` and ``recovery: none`` (the
comparison gives every plain model the same recovery itself). The exported plain model becomes
``output_dir/tailor/initial/`` and ``method.json`` (written last) records what the search chose.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flexigpt.prune.compare.recipe import CompareRecipe
from flexigpt.prune.depth.build import PruneError
from flexigpt.prune.depth.importance import n_blocks_to_remove
from flexigpt.prune.tailor.recipe import TailorRecipe
from flexigpt.prune.tailor.run import fingerprint
from flexigpt.shared.files import atomic_dir, write_text_atomic
from flexigpt.shared.recipe import format_validation_error

NAME, RUN_DIR = "tailor", "tailor-run"
CALIBRATION_SUFFIXES = (".txt", ".jsonl")  # what the tailor command's calibration reader takes


def _ratio(ratio: float, n: int, num_layers: int) -> float:
    """A ``tailor.ratio`` that removes exactly `n` of `num_layers` layers under the tailor's rounding:
    the comparison's own ratio when it does, else n / L."""
    for r in (ratio, n / num_layers):
        try:
            if n_blocks_to_remove(r, num_layers) == n:
                return r
        except ValueError:
            pass
    raise PruneError(
        f"compare.ratio={ratio}: the tailor command cannot remove exactly {n} of {num_layers} layers "
        f"(allowed 1..{num_layers - 1})"
    )


def _warm_start(recipe: CompareRecipe) -> dict[str, Any]:
    """``compare.tailor.warm_start``, or the tailor's default heuristics on the comparison's calibration text."""
    t, cal = recipe.compare.tailor, recipe.compare.calibration
    if t.warm_start is not None:
        return t.warm_start.model_dump(mode="json")
    stream = cal.stream or recipe.data
    files = list(stream.files) if stream.source == "files" else []
    if not files or not all(f.endswith(CALIBRATION_SUFFIXES) for f in files):
        raise PruneError(
            "compare.tailor.warm_start: null takes Block Influence's text from compare.calibration (or data:), "
            f"which is not local {' or '.join(CALIBRATION_SUFFIXES)} files (source {stream.source!r}, files "
            f"{files}); give compare.tailor.warm_start with calibration_files, or heuristics without "
            "block_influence"
        )
    return {
        "calibration_files": files,
        "calibration_samples": cal.num_samples,
        "calibration_seq_len": cal.seq_len,
    }


def tailor_recipe(recipe: CompareRecipe, n: int, num_layers: int) -> TailorRecipe:
    """The tailor command's recipe of the method (in ``output_dir/tailor-run``).

    Raises:
        PruneError: the tailor command refuses the values of ``compare.tailor``.
    """
    c, t = recipe.compare, recipe.compare.tailor
    assert t.objective is not None  # the compare recipe asks for it when tailor is named
    raw = recipe.model_dump(mode="json")
    raw.pop("compare")
    raw.pop("train", None)
    raw.update(kind="tailor", output_dir=str(Path(recipe.output_dir) / RUN_DIR))
    raw["tailor"] = {
        "variants": t.variants,
        "ratio": _ratio(c.ratio, n, num_layers),
        "merge_methods": t.merge_methods,
        "objective": t.objective.model_dump(mode="json"),
        "budgets": t.budgets.model_dump(mode="json"),
        "warm_start": _warm_start(recipe),
        "trials": t.trials,
        "sampler": t.sampler,
        "seed": t.seed,
        "device": c.device,
        "export": True,
        "recovery": "none",
    }
    try:
        return TailorRecipe.model_validate(raw)
    except ValidationError as e:
        lines = re.sub(
            r"(?<![\w.])tailor(?=[.:])", "compare.tailor", format_validation_error(e, TailorRecipe)
        )
        raise PruneError(f"compare.tailor: the tailor command refuses these values\n{lines}") from e


def _local(value: str) -> bool:
    """Whether a source names a local path (a hub id is ``owner/name``)."""
    return value.startswith(("/", ".", "~")) or value.count("/") != 1


def search_key(tr: TailorRecipe) -> dict[str, Any]:
    """What decides the method's model: the tailor run's fingerprint and its number of trials."""
    return {**fingerprint(tr), "tailor.trials": tr.tailor.trials}


def check(recipe: CompareRecipe, n: int, config: Any) -> None:
    """Refuse, before anything is written, what the tailor run would refuse later.

    Raises:
        PruneError: a variant that is not there or does not fit the source, an unknown objective task,
            or a finished method whose search ``compare.tailor`` would now change.
    """
    import torch

    from flexigpt.prune.tailor.run import open_sources
    from flexigpt.prune.tailor.sources import Source
    from flexigpt.prune.tailor.stitch import StitchError
    from flexigpt.shared.evaluate.zeroshot import ZeroShotError, check_tasks, get_task_manager, parse_tasks

    tr = tailor_recipe(recipe, n, config.num_hidden_layers)
    for name, value in tr.tailor.variants.items():
        if _local(value) and not Path(value).expanduser().is_dir():
            raise PruneError(f"compare.tailor.variants.{name}={value!r}: no such directory")
        try:
            Source(name, value)
        except StitchError as e:
            raise PruneError(f"compare.tailor.variants.{name}={value!r}: {e}") from e
    try:
        open_sources(tr, torch.float32)  # shapes and tokenizers against the source
    except StitchError as e:  # its messages name tailor.variants.<name>
        msg = str(e)
        raise PruneError(f"compare.{msg}" if msg.startswith("tailor.") else f"compare.tailor: {msg}") from e
    o = tr.tailor.objective
    try:
        check_tasks(get_task_manager(o.include_path or None, o.include_defaults), parse_tasks(o.tasks))
    except ZeroShotError as e:
        raise PruneError(f"compare.tailor.objective.tasks: {e}") from e
    done = Path(recipe.output_dir) / NAME / "method.json"
    if done.is_file():
        old, now = json.loads(done.read_text())["fingerprint"], search_key(tr)
        diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
        if diff:
            raise PruneError(
                f"compare.tailor: {done.parent} holds a tailor model searched with other values of "
                f"{', '.join(k.replace('tailor.', 'compare.tailor.', 1) for k in diff)}; use another output_dir"
            )


def build(recipe: CompareRecipe, n: int, config: Any, log: Callable) -> None:
    """Search (or resume the search), then place the chosen plain model in ``tailor/initial``.

    Raises:
        PruneError: the tailor command refused or its model does not remove `n` layers.
    """
    from flexigpt.prune.tailor.run import run as tailor_run
    from flexigpt.prune.tailor.stitch import StitchError, StitchPlan
    from flexigpt.shared.evaluate.zeroshot import ZeroShotError

    t0 = time.perf_counter()
    tr = tailor_recipe(recipe, n, config.num_hidden_layers)
    run_dir, vdir = Path(tr.output_dir), Path(recipe.output_dir) / NAME
    log(f"[{NAME}] GPTailor search ({tr.tailor.trials} trials, remove {n}) -> {run_dir}")
    try:
        summary = tailor_run(tr, log=lambda *a, **_: log(*a))
    except (StitchError, ZeroShotError) as e:
        raise PruneError(f"[{NAME}] {e}") from e
    plan = StitchPlan.load(run_dir / "stitch_plan.yaml")
    if summary["removed"] != n or len(plan.positions) != config.num_hidden_layers - n:
        raise PruneError(f"[{NAME}] the search removed {summary['removed']} layers, not {n}")
    vdir.mkdir(parents=True, exist_ok=True)
    with atomic_dir(vdir / "initial") as tmp:
        # a copy, not links: a later tailor run in run_dir rewrites its model's files in place
        shutil.copytree(run_dir / "model", tmp, dirs_exist_ok=True)
    chosen = summary["results"]["chosen"]["scores"]
    info = {
        "removed": sorted(plan.removed),
        "layers": [p.layer for p in plan.positions],
        "train": {},
        "notes": {
            "tailor_ratio": tr.tailor.ratio,
            "variants": dict(tr.tailor.variants),
            "objective_tasks": list(tr.tailor.objective.tasks),
            "best_objective_scores": chosen,
            "best_objective_mean": sum(chosen.values()) / len(chosen),
            "base_objective_scores": summary["results"]["base"]["scores"],
            "trials": summary["trials"],
            "chosen_trial": summary["chosen_trial"],
            "chosen_label": summary["chosen_label"],
            "positions": plan.to_dict()["positions"],
            "export_reproduces": summary["export"].get("reproduces"),
            "run_dir": str(run_dir),
        },
        "fingerprint": search_key(tr),
        "seconds": time.perf_counter() - t0,
    }
    if info["notes"]["export_reproduces"] is False:
        log(
            f"[{NAME}] note: the exported model's objective scores differ from the in-memory ones ({run_dir})"
        )
    write_text_atomic(vdir / "method.json", json.dumps(info, indent=1) + "\n")
    log(f"[{NAME}] removed {info['removed']}; {len(info['layers'])} layers -> {vdir / 'initial'}")


def _task(name: str) -> str:
    return name.split(":", 1)[0]


def header_lines(recipe: CompareRecipe) -> list[str]:
    """What the table's header says of the method: the search, and the tasks it optimised that the
    zero-shot columns also report (its scores on those are not held out)."""
    t, zs = recipe.compare.tailor, recipe.compare.zeroshot
    assert t.objective is not None
    done = Path(recipe.output_dir) / NAME / "method.json"
    info = json.loads(done.read_text()) if done.is_file() else {}
    tasks = [_task(x) for x in t.objective.tasks]
    variants = ", ".join(t.variants) or "none: layers cut from the source only"
    lines = [
        f"- tailor: GPTailor's search, {info.get('notes', {}).get('trials', t.trials)} trials optimising "
        f"{', '.join(tasks)} (variants: {variants}); removed source layers {info.get('removed', '-')}"
    ]
    seen = sorted(set(tasks) & {_task(x) for x in zs.tasks}) if zs is not None else []
    if seen:
        lines.append(
            f"- tailor: its search chose the model by {', '.join(seen)}, which the zero-shot columns also report: "
            "the tailor row's scores on them are not held out"
        )
    return lines
