"""The tailor command as library calls: sources, warm starts, the resumable search, final scores,
export, report.

Files in ``output_dir``: ``recipe.yaml``; ``importance.json`` (Block Influence of the base, for
the warm start); ``study.journal`` (the Optuna study, every trial as it finishes); ``trials.jsonl``
and the PNGs of the report; ``stitch_plan.yaml`` (the chosen configuration) and, for
``combine: pareto``, ``pareto/plan_<trial>.yaml``; ``model/`` (the chosen model as a plain model of
the source architecture, with its tokenizer and stitch plan); ``summary.json`` (full-budget scores
of the chosen model, of the base, of Block-Influence removal at the same ratio, and whether the
exported model reproduces the in-memory scores).
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flexigpt.prune.tailor.recipe import TailorRecipe
from flexigpt.prune.tailor.search import (
    best_trials,
    finished,
    make_objective,
    mean_at,
    open_study,
    recover,
    run_trials,
)
from flexigpt.prune.tailor.stitch import StitchError, StitchPlan, identity_plan

# Recipe keys that do not change what the search finds (free to change on a rerun).
FREE_KEYS: tuple[str, ...] = (
    "trials",
    "export",
    "device",
    "cache_blocks",
    "recovery",
    "replace",
    "selection",
)


def fingerprint(recipe: TailorRecipe) -> dict[str, Any]:
    """What a study is bound to: the base, and the search part of the ``tailor:`` section."""
    t = recipe.tailor.model_dump(mode="json")
    for k in FREE_KEYS:
        t.pop(k)
    t["objective"].pop("batch_size")
    t["objective"].pop("final_limit")
    flat = {"model.source": recipe.model.source}
    for k, v in t.items():
        if isinstance(v, dict):
            flat.update({f"tailor.{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[f"tailor.{k}"] = v
    return json.loads(json.dumps(flat))


def calibration_texts(patterns: list[str]) -> Iterator[str]:
    """The documents of ``tailor.warm_start.calibration_files`` (txt: one per line; jsonl: its ``text``)."""
    files = sorted({f for p in patterns for f in glob.glob(p)})
    if not files:
        raise StitchError(f"tailor.warm_start.calibration_files={patterns}: no file matches")
    for f in files:
        for line in Path(f).read_text().splitlines():
            if f.endswith(".jsonl"):
                if line.strip():
                    yield str(json.loads(line).get("text", ""))
            else:
                yield line


def calibration_tensors(recipe: TailorRecipe, tok: Any) -> Iterator[Any]:
    """The calibration windows of ``tailor.warm_start`` (Block Influence; the measured output-norm gamma)."""
    from flexigpt.prune.depth.importance import calibration_samples

    ws = recipe.tailor.warm_start
    return calibration_samples(
        calibration_texts(ws.calibration_files),
        lambda s: tok(s, add_special_tokens=False)["input_ids"],
        num_samples=ws.calibration_samples,
        seq_len=ws.calibration_seq_len,
        pack=False,
        bos_id=tok.bos_token_id,
    )


def removal_orders(
    recipe: TailorRecipe, sources: Any, tok: Any, dtype: Any, device: str, out: Path, log: Any
) -> dict:
    """Each warm-start heuristic's removal order (Block Influence measured once, kept in importance.json)."""
    from flexigpt.prune.tailor.space import removal_order

    ws = recipe.tailor.warm_start
    L = sources.num_layers
    scores = None
    if "block_influence" in ws.heuristics:
        path = out / "importance.json"
        if path.is_file():
            scores = json.loads(path.read_text())["scores"]
        else:
            from transformers import AutoModelForCausalLM

            from flexigpt.prune.depth.importance import compute_importance

            model = AutoModelForCausalLM.from_pretrained(sources.base.path, dtype=dtype).to(device)
            samples = calibration_tensors(recipe, tok)
            res = compute_importance(model, samples, "block_influence", progress=False)
            res.save(path)
            scores = res.scores
            del model
        log(f"Block Influence of the base: {[round(s, 4) for s in scores]}", flush=True)
    return {h: removal_order(h, L, scores) for h in ws.heuristics}


def _objective(recipe: TailorRecipe, model: Any, tok: Any) -> Any:
    """The recipe's objective tasks over `model` (the stitched candidate or the full base)."""
    from flexigpt.prune.tailor.objective import TaskObjective

    o = recipe.tailor.objective
    return TaskObjective(
        model,
        tok,
        o.tasks,
        include_path=o.include_path,
        include_defaults=o.include_defaults,
        batch_size=o.batch_size,
    )


def tailor_device(name: str) -> str:
    """The device of ``tailor.device`` (auto: cuda when available)."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def tailor_dtype(name: str, device: str) -> Any:
    """The torch dtype of ``model.dtype`` (auto: bfloat16 on a GPU that has it, else float32)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def open_sources(recipe: TailorRecipe, dtype: Any) -> Any:
    """The base and the variants of the recipe, indexed (nothing loaded)."""
    from flexigpt.prune.tailor.sources import MergeOptions, SourceSet

    t = recipe.tailor
    return SourceSet(
        recipe.model.source,
        t.variants,
        cache_blocks=t.cache_blocks,
        merge=MergeOptions(t.ties_density),
        dtype=dtype,
    )


def run(recipe: TailorRecipe, log: Callable[..., None] = print) -> dict[str, Any]:
    """Search, pick, score, export, report (see the module docstring for the files).

    Returns:
        The summary (also written to ``summary.json``).

    Raises:
        StitchError: bad sources or plans, or a rerun with a changed recipe.
    """
    from flexigpt.prune.depth.importance import n_blocks_to_remove
    from flexigpt.prune.tailor.build import Stitcher
    from flexigpt.prune.tailor.report import plot_layer_map, plot_search, trial_rows, write_trials
    from flexigpt.prune.tailor.space import SearchSpace, removal_plan, warm_starts
    from flexigpt.shared.command import load_command_tokenizer
    from flexigpt.shared.evaluate.zeroshot import check_tasks, get_task_manager, parse_tasks

    t0 = time.perf_counter()
    t = recipe.tailor
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise StitchError(
            "the tailor search runs in one process; run it without a launcher, then train output_dir/model "
            "with flexigpt-train on several ranks"
        )
    out = Path(recipe.output_dir)
    device = tailor_device(t.device)
    dtype = tailor_dtype(recipe.model.dtype, device)
    sources = open_sources(recipe, dtype)
    L = sources.num_layers
    try:
        n_remove = n_blocks_to_remove(t.ratio, L)
    except ValueError as e:
        raise StitchError(f"tailor.ratio: {e}") from e
    space = SearchSpace(
        L,
        n_remove,
        tuple(t.variants),
        tuple(t.merge_methods),
        tuple(t.scale_range),
        t.output_scale,
        t.conditional_space,
        t.encoding,
    )
    tok = load_command_tokenizer(recipe.model, StitchError)
    # every check that can refuse the run comes before the first file is written
    check_tasks(
        get_task_manager(t.objective.include_path or None, t.objective.include_defaults),
        parse_tasks(t.objective.tasks),
    )
    if t.warm_start.calibration_files and "block_influence" in t.warm_start.heuristics:
        next(iter(calibration_texts(t.warm_start.calibration_files)), None)
    out.mkdir(parents=True, exist_ok=True)
    combine = t.objective.combine
    budgets = t.budgets.rungs() if t.budgets.pruner != "none" else [t.budgets.max]
    study = open_study(
        out / "study.journal",
        fingerprint(recipe),
        sampler=t.sampler,
        seed=t.seed,
        startup_trials=t.startup_trials,
        prior_weight=t.prior_weight,
        pruner=t.budgets.pruner,
        budgets=budgets,
        eta=t.budgets.eta,
        n_objectives=len(t.objective.tasks) if combine == "pareto" else 1,
    )
    recipe.save(out / "recipe.yaml")
    log(
        f"GPTailor: {L} base layers, remove {n_remove}, variants {list(t.variants)}, budgets {budgets}",
        flush=True,
    )
    orders = removal_orders(recipe, sources, tok, dtype, device, out, log)
    stitcher = Stitcher(
        sources, L - n_remove, device=device, attn_implementation=recipe.model.attn_implementation
    )
    score = _objective(recipe, stitcher.model, tok)
    n_recovered = recover(study)
    if n_recovered:
        log(f"{n_recovered} trial(s) cut off by an earlier stop will run again", flush=True)
    if not study.user_attrs.get("warm_started"):
        starts = warm_starts(space, orders, t.warm_start.merge_scales)
        for label, plan in starts:
            study.enqueue_trial(space.params(plan), user_attrs={"label": label})
        study.set_user_attr("warm_started", True)
        log(f"{len(starts)} warm-start configurations enqueued", flush=True)
    done_before = len(finished(study))
    log(f"search: {done_before} of {t.trials} trials done before this run", flush=True)
    objective = make_objective(
        space,
        stitcher.build,
        score,
        budgets=budgets,
        combine=combine,
        n_tasks=len(score.tasks),
        prune=len(budgets) > 1,
        seed=t.seed,
        log=log,
    )
    ran = run_trials(study, objective, t.trials)
    search_s = time.perf_counter() - t0

    chosen = best_trials(study, budgets[-1], combine)
    best = StitchPlan.from_dict(chosen[0].user_attrs["plan"])
    final_limit = t.objective.final_limit
    finals = {"chosen": best}
    if "block_influence" in orders:
        finals["block_influence_removal"] = removal_plan(space, sorted(orders["block_influence"][:n_remove]))
    results: dict[str, Any] = {}
    for label, plan in finals.items():
        stitcher.build(plan)
        results[label] = {"plan": plan.to_dict(), "scores": score(final_limit)}
    chosen_scores = results["chosen"]["scores"]
    best = StitchPlan(
        best.base_layers, best.positions, best.top, {"trial": chosen[0].number, "scores": chosen_scores}
    )
    best.save(out / "stitch_plan.yaml")
    if combine == "pareto":
        (out / "pareto").mkdir(exist_ok=True)
        for tr in chosen:
            StitchPlan.from_dict(tr.user_attrs["plan"]).save(out / "pareto" / f"plan_{tr.number}.yaml")
    export: dict[str, Any] = {}
    if t.export:
        stitcher.build(best)
        stitcher.export(out / "model", tok)
        export = check_export(out / "model", tok, recipe, dtype, device, chosen_scores)
        log(
            f"exported to {out / 'model'}; reproduces the in-memory scores: {export['reproduces']}",
            flush=True,
        )
    # the base at full depth needs a skeleton of its own; free the stitched one first
    del score, stitcher
    full = Stitcher(sources, L, device=device, attn_implementation=recipe.model.attn_implementation)
    full.build(identity_plan(L))
    base_score = _objective(recipe, full.model, tok)
    results["base"] = {"plan": identity_plan(L).to_dict(), "scores": base_score(final_limit)}
    rows = trial_rows(study)
    write_trials(rows, out / "trials.jsonl")
    pngs = plot_search(rows, budgets[-1], out, chosen[0].number)
    maps = [("chosen", best)] + [
        (f"trial {tr.number}", StitchPlan.from_dict(tr.user_attrs["plan"])) for tr in chosen[1:4]
    ]
    if "block_influence" in orders:
        maps.append(("BI removal", StitchPlan.from_dict(results["block_influence_removal"]["plan"])))
    pngs.append(plot_layer_map(maps, sources.names(), out / "layer_map.png"))
    summary = {
        "base_layers": L,
        "removed": n_remove,
        "budgets": budgets,
        "final_limit": final_limit,
        "trials": len(rows),
        "trials_run_now": ran,
        "pruned": sum(r["state"] == "pruned" for r in rows),
        "evaluations": sum(len(r["scores"]) for r in rows),
        "trial_seconds": sum(r["seconds"] or 0.0 for r in rows),
        "wall_seconds": time.perf_counter() - t0,
        "search_seconds_this_run": search_s,
        "chosen_trial": chosen[0].number,
        "chosen_label": chosen[0].user_attrs.get("label"),
        "chosen_mean_at_top_budget": mean_at(chosen[0], budgets[-1]),
        "results": results,
        "export": export,
        "blocks_read": sources.reads,
        "merges_computed": sources.merges,
        "plots": [p.name for p in pngs],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for label, r in results.items():
        s = r["scores"]
        log(
            f"{label:>24}: "
            + ", ".join(f"{k} {100 * v:.2f}" for k, v in s.items())
            + f"; mean {100 * sum(s.values()) / len(s):.2f}"
        )
    return summary


def check_export(path: Path, tok: Any, recipe: TailorRecipe, dtype: Any, device: str, expected: dict) -> dict:
    """Load the export with plain transformers, score it through lm-eval's own entry point, compare."""
    from transformers import AutoModelForCausalLM

    from flexigpt.shared.evaluate.zeroshot import evaluate_zeroshot

    o = recipe.tailor.objective
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=recipe.model.attn_implementation
    ).to(device)
    res = evaluate_zeroshot(
        model,
        tok,
        o.tasks,
        batch_size=o.batch_size,
        limit=o.final_limit,
        include_path=o.include_path or None,
        include_defaults=o.include_defaults,
    )
    got = {k: s.value for k, s in res.scores.items()}
    return {"scores": got, "reproduces": got == expected}
