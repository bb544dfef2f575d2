"""The prune command as library calls: measure, choose, build every variant once, hand over to the trainer.

``output_dir`` of a prune run holds

- ``prune_recipe.yaml`` (the resolved recipe) and ``prune_settings.json`` (what decides the removed
  blocks and the bases: source, ratio, metric, calibration, selection options); a rerun with other
  settings is refused;
- ``importance.json`` / ``importance.png``: one score per block, removed blocks in red;
- ``selection.json`` / ``selection.png``: block distances and picks (flexigpt variant only);
- ``source_ppl.json``: the unpruned model's perplexity on the same text as the variants';
- ``summary.json``: removed blocks, picks, every variant's stored parameters and start perplexity,
  peak resident memory of the pruning step;
- ``<variant>/`` for each of flexigpt, shortgpt, shortgpt_lora:
  ``initial/`` (the pruned model, compact format; ShortGPT also ``initial_plain/``, a plain HF
  model with fewer layers), ``plan.json`` (written once ``initial/`` is complete: the completion
  mark), ``start_ppl.json``, ``gamma.json`` (flexigpt with ``gamma: calibrate`` or ``measured``), and
  what the trainer writes there (``recipe.yaml``, ``checkpoints/``, ``tb/``, ``final/``); with
  ``replace.norm_after`` also ``phase1/``, ``initial_normed/`` and ``gamma_late.json``
  (``late_norm``).

Run again with the same recipe, every finished step is read back instead of redone and the
trainer resumes each variant from its newest checkpoint. A variant whose plan differs from the one
on disk is refused; a variant added to the recipe later is built from the saved importance scores.
"""

from __future__ import annotations

import json
import resource
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from flexigpt.prune.depth.build import PruneError, build_variant, export_plain
from flexigpt.prune.depth.gamma import (
    MEASURED,
    NONE,
    GammaCalibration,
    calibrate_gamma,
    candidate_order,
    measure_gamma,
)
from flexigpt.prune.depth.importance import ImportanceResult, n_blocks_to_remove
from flexigpt.prune.depth.plots import plot_distances, plot_importance
from flexigpt.prune.depth.recipe import PruneRecipe
from flexigpt.prune.depth.replace import build_plan
from flexigpt.prune.depth.selection import SelectionResult
from flexigpt.prune.depth.steps import (
    SourceModel,
    StartPerplexity,
    calibration_stream,
    gamma_tensors,
    importance_step,
    resolve_device,
    resolve_dtype,
    selection_step,
)
from flexigpt.prune.depth.streamed import StreamedSourceModel
from flexigpt.prune.depth.summary import PruneSummary, summary_table, variant_entry, write_summary
from flexigpt.shared.command import handoff_train_recipe, load_command_tokenizer, read_source_config
from flexigpt.shared.engine.apply import expected_trainable
from flexigpt.shared.engine.checkpoint import load_compact, save_compact
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import Plan, PlanError
from flexigpt.shared.files import write_text_atomic
from flexigpt.shared.recipe import TrainRecipe

INITIAL, PLAIN = "initial", "initial_plain"


class RunDir:
    """The files of one prune run (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.recipe = root / "prune_recipe.yaml"
        self.settings = root / "prune_settings.json"
        self.importance = root / "importance.json"
        self.importance_png = root / "importance.png"
        self.selection = root / "selection.json"
        self.selection_png = root / "selection.png"
        self.source_ppl = root / "source_ppl.json"
        self.summary = root / "summary.json"

    def variant(self, name: str) -> Path:
        return self.root / name


# ----------------------------------------------------------------------------------- settings
def source_config(recipe: PruneRecipe) -> PretrainedConfig:
    """The source model's config (a hub id downloads only ``config.json``).

    Raises:
        PruneError: the source is a compact (shared-block) checkpoint.
    """
    return read_source_config(recipe.model.source, PruneError, "prune a plain model")


def blocks_to_remove(recipe: PruneRecipe, config: PretrainedConfig) -> int:
    """How many blocks ``prune.ratio`` removes under ``prune.ratio_rule``."""
    try:
        return n_blocks_to_remove(recipe.prune.ratio, config.num_hidden_layers, recipe.prune.ratio_rule)
    except ValueError as e:
        raise PruneError(f"prune.ratio / prune.ratio_rule: {e}") from e


def run_settings(recipe: PruneRecipe, n_removed: int) -> dict[str, Any]:
    """Everything that decides the removed blocks and the bases, keyed by recipe key."""
    p = recipe.prune
    return {
        "model.source": recipe.model.source,
        "model.tokenizer": recipe.model.tokenizer,
        "prune.ratio": p.ratio,
        "prune.ratio_rule": p.ratio_rule,
        "n_removed": n_removed,
        "prune.metric": p.metric,
        "text": recipe.text.model_dump(mode="json"),
        "prune.calibration": {
            # the gamma text decides gamma only, which the plan records
            **p.calibration.model_dump(mode="json", exclude={"stream", "gamma_stream", "gamma_samples"}),
            "stream": calibration_stream(recipe).model_dump(mode="json"),
        },
        # read_from only says where the same weights are read from
        "prune.selection": p.selection.model_dump(mode="json", exclude={"read_from"}),
    }


def check_settings(rd: RunDir, settings: dict[str, Any]) -> None:
    """Refuse a run directory pruned with other settings (names the keys that differ)."""
    if not rd.settings.is_file():
        return
    old = json.loads(rd.settings.read_text())
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise PruneError(
            f"output_dir={str(rd.root)!r} was pruned with other values of {', '.join(diff)}; refusing to mix two "
            f"runs. Use another output_dir, or the recipe of that run ({rd.recipe})"
        )


# ------------------------------------------------------------------------------------- plans
def variant_plan(
    recipe: PruneRecipe,
    config: PretrainedConfig,
    kind: str,
    removed: list[int],
    selection: SelectionResult | None,
    gamma: GammaCalibration | None = None,
    *,
    late: bool = False,
) -> Plan:
    """The plan of one variant; with a measured or calibrated gamma, the chosen one is the plan's
    (``none``: no output norm; ``measured``: the plan records the mean of the per-feature gammas,
    which the saved model holds). With ``replace.norm_after`` the variant starts without output
    norms; `late` gives the plan they are added with."""
    options = recipe.prune.options()
    late_norm = kind == "flexigpt" and recipe.prune.replace.norm_after is not None
    if late_norm and not late:
        options = dc_replace(options, out_norm=False, gamma=0.0)
    if gamma is not None and gamma.gamma == NONE:
        options = dc_replace(options, out_norm=False, gamma=0.0)
    elif gamma is not None:
        value = gamma.measured_mean if gamma.gamma == MEASURED else gamma.gamma
        options = dc_replace(options, gamma=round(float(value), 6))
    try:
        plan = build_plan(kind, config, selection if kind == "flexigpt" else removed, options)
    except PlanError as e:
        raise PruneError(f"prune.replace: {e}") from e
    p = recipe.prune
    plan.notes.update(
        {"source": recipe.model.source, "ratio": p.ratio, "ratio_rule": p.ratio_rule, "importance": p.metric}
    )
    if gamma is not None and p.replace.gamma == "calibrate":
        plan.notes["gamma_calibration"] = {
            "rule": p.replace.gamma_rule,
            "candidates": candidate_order(p.replace.gamma_candidates),
            "gamma": gamma.gamma,
        }
    if gamma is not None and gamma.gamma == MEASURED:
        plan.notes["gamma_measured"] = {"mean": gamma.measured_mean, "per_feature": True}
    if late_norm:  # a rerun with another step is another plan
        plan.notes["norm_after"] = p.replace.norm_after
    return plan


def _saved_gamma(vdir: Path) -> GammaCalibration | None:
    path = vdir / "gamma.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return GammaCalibration(
        d["gamma"], d["target_ppl"], [tuple(x) for x in d["table"]], d.get("measured_mean")
    )


def plans_for(
    recipe: PruneRecipe, config: PretrainedConfig, rd: RunDir, removed: list[int], sel: SelectionResult | None
) -> dict[str, Plan]:
    """Every variant's plan (a calibrated or measured gamma is read back from its ``gamma.json``)."""
    calibrate = measures_gamma(recipe)
    return {
        v: variant_plan(
            recipe,
            config,
            v,
            removed,
            sel,
            _saved_gamma(rd.variant(v)) if v == "flexigpt" and calibrate else None,
        )
        for v in recipe.prune.variants
    }


def measures_gamma(recipe: PruneRecipe) -> bool:
    """Whether building the FlexiGPT variant measures or calibrates gamma (not when its norm comes later)."""
    r = recipe.prune.replace
    return r.gamma in ("calibrate", MEASURED) and r.norm_after is None


def variant_state(rd: RunDir, name: str, plan: Plan) -> str:
    """``fresh`` (not built yet) or ``ready`` (initial model and an equal plan on disk).

    Raises:
        PruneError: the variant directory holds a model of another plan.
    """
    vdir = rd.variant(name)
    mark = vdir / "plan.json"
    if not mark.is_file():
        return "fresh"
    # the plan initial/ was saved with: the recovery's trainer records its own plan in the mark's
    # place, which gains the output norms when they are added late (replace.norm_after)
    built = vdir / INITIAL / "plan.json"
    saved = Plan.load(built if built.is_file() else mark).to_dict()
    if saved != plan.to_dict():
        raise PruneError(
            f"{vdir} was built with another plan ({mark}); refusing to overwrite a started run. Use another "
            f"output_dir, or the recipe of that run ({rd.recipe})"
        )
    done = (vdir / INITIAL / "config.json").is_file() and (
        name != "shortgpt" or (vdir / PLAIN / "config.json").is_file()
    )
    return "ready" if done else "fresh"


def precheck(recipe: PruneRecipe, config: PretrainedConfig, rd: RunDir, n: int) -> None:
    """Refuse, before anything is computed or written, what a rerun would refuse later (every rank)."""
    check_architecture(recipe, config)
    check_settings(rd, run_settings(recipe, n))
    needs_sel = "flexigpt" in recipe.prune.variants
    if not rd.importance.is_file() or (needs_sel and not rd.selection.is_file()):
        return
    removed = ImportanceResult.load(rd.importance).least_important(n)
    sel = SelectionResult.load(rd.selection) if needs_sel else None
    for name, plan in plans_for(recipe, config, rd, removed, sel).items():
        variant_state(rd, name, plan)


def check_architecture(recipe: PruneRecipe, config: PretrainedConfig, section: str = "prune") -> None:
    """Refuse a source the engine does not run (an unknown family, post-LN OPT) and adapter targets
    its architecture lacks (OPT: gate), naming ``<section>.replace.targets``.

    Raises:
        PruneError: with the reason and what is allowed.
    """
    try:
        layout = get_layout(config)
    except PlanError as e:
        raise PruneError(f"model.source: {e}") from None
    targets = recipe.prune.replace.targets
    # the adapters (flexigpt, shortgpt_lora) and the base selection read these linears
    if set(recipe.prune.variants) - {"shortgpt"} and layout.missing_targets(targets):
        raise PruneError(layout.targets_message(f"{section}.replace.targets", targets))


# ------------------------------------------------------------------------------------- the step
def prune(recipe: PruneRecipe, config: PretrainedConfig, log: Callable = print) -> PruneSummary:
    """The pruning step: importance, selection, every variant built, saved and measured once.

    Args:
        recipe: a validated prune recipe.
        config: the source config (``source_config``).
        log: where the report lines go.

    Returns:
        The summary (also written to ``output_dir/summary.json``).

    Raises:
        PruneError: a refused rerun, or a recipe value that does not fit the model or the data.
    """
    started = time.perf_counter()
    rd, p = RunDir(Path(recipe.output_dir)), recipe.prune
    n = blocks_to_remove(recipe, config)
    settings = run_settings(recipe, n)
    precheck(recipe, config, rd, n)
    device = resolve_device(recipe)
    kind = StreamedSourceModel if p.memory == "per_block" else SourceModel
    source = kind(recipe, device, resolve_dtype(recipe, device), log)  # per_block: refused before any write
    rd.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(rd.settings, json.dumps(settings, indent=1) + "\n")
    recipe.save(rd.recipe)
    tokenizer = load_command_tokenizer(recipe.model, PruneError)

    imp = importance_step(recipe, rd.importance, source, tokenizer, settings["prune.calibration"], log)
    removed = imp.least_important(n)
    log(
        f"removing {n} of {config.num_hidden_layers} blocks (ratio {p.ratio}, rule {p.ratio_rule}): {removed}"
    )
    if not rd.importance_png.is_file():
        plot_importance(imp, rd.importance_png, removed=removed)
    sel = None
    if "flexigpt" in p.variants:
        sel = selection_step(recipe, rd.selection, source, removed, device, settings["prune.selection"], log)
        if not rd.selection_png.is_file():
            plot_distances(sel, rd.selection_png)
    plans = plans_for(recipe, config, rd, removed, sel)
    states = {v: variant_state(rd, v, plan) for v, plan in plans.items()}
    _log_plans(recipe, config, plans, states, log)

    ppl = StartPerplexity(recipe, tokenizer)
    summary = PruneSummary(removed, dict(sel.picks) if sel else {}, plans)
    summary.texts = {
        "text rule": ppl.rule.to_dict(),
        "importance measured on": imp.extra.get("text", {}).get("described", "(not recorded)"),
        "start perplexities measured on": ppl.text,
    }
    gamma_file = rd.variant("flexigpt") / "gamma.json"
    src_ppl = _measure(ppl, source, "unpruned", source.get, None, rd.source_ppl, log)
    summary.source = {
        "path": recipe.model.source,
        "layers": config.num_hidden_layers,
        "start_ppl": src_ppl.ppl,
    }
    for name in p.variants:
        vdir = rd.variant(name)
        if states[name] == "fresh":
            log(f"[{name}] building {vdir / INITIAL}")
            built, plans[name] = _build(recipe, config, rd, name, plans[name], sel, source, ppl, log)
            get_model: Callable[[], Any] = lambda m=built: m  # noqa: E731
        elif source.streamed:
            # the saved model would be loaded whole: its plan is built again over the streamed source
            log(f"[{name}] {vdir / INITIAL} and plan.json match this recipe: not saved again")
            get_model = lambda pl=plans[name]: build_variant(  # noqa: E731
                source.get(), pl, config, seed=recipe.train.seed, blocks=source.blocks
            )
        else:
            log(f"[{name}] {vdir / INITIAL} and plan.json match this recipe: not rebuilt")
            get_model = lambda d=vdir / INITIAL: load_compact(d).to(device)  # noqa: E731
        slot_blocks = [s.block for s in plans[name].slots]
        result = _measure(ppl, source, name, get_model, slot_blocks, vdir / "start_ppl.json", log)
        built = get_model = None  # the variant is on disk; drop it before the next one is built
        summary.variants[name] = variant_entry(
            config,
            plans[name],
            vdir,
            PLAIN if name == "shortgpt" else None,
            result.ppl,
            name in trained_variants(recipe),
        )
    if "flexigpt" in p.variants and measures_gamma(recipe) and gamma_file.is_file():
        text = json.loads(gamma_file.read_text()).get("text", {}).get("described", "(not recorded)")
        summary.texts["gamma chosen on"] = text
    source.free()
    summary.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    summary.wall_s = time.perf_counter() - started
    write_summary(rd.summary, imp, summary)
    log(summary_table(summary))
    return summary


def _measure(
    ppl: StartPerplexity,
    source: SourceModel,
    name: str,
    get_model: Callable[[], Any],
    blocks: list[int] | None,
    path: Path,
    log: Callable,
) -> Any:
    """``ppl.measure``, the model running as the source says (block by block for a streamed one)."""
    with ExitStack() as stack:

        def ready() -> Any:
            return stack.enter_context(source.running(get_model(), blocks))

        return ppl.measure(name, ready, path, log)


def _log_plans(
    recipe: PruneRecipe,
    config: PretrainedConfig,
    plans: dict[str, Plan],
    states: dict[str, str],
    log: Callable,
) -> None:
    source = expected_trainable(Plan.identity(config.model_type, config.num_hidden_layers), config, "all")
    r = recipe.prune.replace
    for name, plan in plans.items():
        stored = expected_trainable(plan, config, "all")
        # a plan still holding the placeholder gamma would be read as the model's: printed after calibration
        pending = name == "flexigpt" and r.gamma in ("calibrate", MEASURED) and states[name] == "fresh"
        if not pending:
            log(f"[{name}] {plan.summary()}")
        log(f"[{name}] stored parameters: {stored:,} = {stored / source:.2%} of the source's {source:,}")
        # adapters of rank r cost r x (rows + columns) per matrix: they can outgrow the block they replace
        if stored >= source:
            msg = (
                f"[{name}] the pruned model does not shrink: {stored:,} stored parameters, {stored / source:.0%} of "
                f"the source's {source:,}. Lower prune.replace.rank={recipe.prune.replace.rank} well below the "
                f"hidden size ({config.hidden_size})"
            )
            log(f"WARNING: {msg}")
            warnings.warn(msg, stacklevel=2)
        if pending:
            how = f"chosen from {r.gamma_candidates}" if r.gamma == "calibrate" else "measured"
            log(f"[{name}] gamma: {r.gamma} ({how} once the model is built; its plan follows then)")


def _build(
    recipe: PruneRecipe,
    config: PretrainedConfig,
    rd: RunDir,
    name: str,
    plan: Plan,
    sel: SelectionResult | None,
    source: SourceModel,
    ppl: StartPerplexity,
    log: Callable,
) -> tuple[Any, Plan]:
    """Build one variant from the loaded source, save ``initial/`` (and the plain export), then the plan.

    With ``gamma: calibrate`` or ``measured`` gamma is chosen on the gamma text, which holds none of
    the documents the start perplexities (`ppl`) are measured on, and the plan is printed once it
    holds that gamma.
    """
    vdir, tokenizer = rd.variant(name), ppl.tokenizer
    model = build_variant(source.get(), plan, config, seed=recipe.train.seed, blocks=source.blocks)
    if name == "flexigpt" and measures_gamma(recipe):
        model, plan = _choose_gamma(recipe, config, name, plan, model, sel, source, ppl, log)
    save_compact(
        model, vdir / INITIAL, tokenizer=tokenizer, max_shard_size=source.shard_size, read=source.read
    )
    log(f"[{name}] saved -> {vdir / INITIAL}")
    if name == "shortgpt":
        export_plain(
            model, vdir / PLAIN, tokenizer=tokenizer, read=source.read, max_shard_size=source.shard_size
        )
        log(f"[{name}] plain HF export ({plan.num_slots} layers) -> {vdir / PLAIN}")
    plan.save(vdir / "plan.json")
    return model, plan


def _choose_gamma(
    recipe: PruneRecipe,
    config: PretrainedConfig,
    name: str,
    plan: Plan,
    model: Any,
    sel: SelectionResult | None,
    source: SourceModel,
    ppl: StartPerplexity,
    log: Callable,
) -> tuple[Any, Plan]:
    """Measure or calibrate gamma on the gamma text, write ``gamma.json``; the model and plan that hold it."""
    r, vdir = recipe.prune.replace, RunDir(Path(recipe.output_dir)).variant(name)
    ppl.tokens()  # reads the start-perplexity documents, which the gamma text must leave out
    samples, text = gamma_tensors(
        recipe, ppl.tokenizer, getattr(config, "max_position_embeddings", None), ppl.documents
    )
    if r.gamma == MEASURED:
        with source.running(model, [s.block for s in plan.slots]):
            gammas = measure_gamma(model, samples)
        cal = GammaCalibration(MEASURED, None, [], float(torch.cat(gammas).mean()))
        log(f"[{name}] gamma measured: per feature, mean {cal.measured_mean:.4g} on {text['described']}")
    else:
        with source.running(model, [s.block for s in plan.slots]):
            cal = calibrate_gamma(model, samples, candidates=r.gamma_candidates, rule=r.gamma_rule)
        tried = ", ".join(f"{_label(g)}: {p:.2f}" for g, p in cal.table)
        log(
            f"[{name}] gamma calibrated: {_label(cal.gamma)} (ShortGPT ppl {cal.target_ppl:.2f}; tried {tried}) "
            f"on {text['described']}"
        )
    vdir.mkdir(parents=True, exist_ok=True)
    record = {
        "gamma": cal.gamma,
        "target_ppl": cal.target_ppl,
        "table": cal.table,
        "measured_mean": cal.measured_mean,
    }
    write_text_atomic(vdir / "gamma.json", json.dumps({**record, "text": text}, indent=1) + "\n")
    plan = variant_plan(recipe, config, name, list(plan.removed_blocks), sel, cal)
    if cal.gamma == NONE:
        # exactly the no-norm model
        model = build_variant(source.get(), plan, config, seed=recipe.train.seed, blocks=source.blocks)
    else:
        model.plan = plan  # only gamma's initial value differs, and it is in the model already
    log(f"[{name}] {plan.summary()}")
    return model, plan


def _label(gamma: Any) -> str:
    return gamma if isinstance(gamma, str) else f"{gamma:g}"


# ------------------------------------------------------------------------------------ training
def trained_variants(recipe: PruneRecipe) -> list[str]:
    """The variants that get a recovery run (shortgpt only with ``prune.shortgpt_recovery: all``)."""
    return [v for v in recipe.prune.variants if v != "shortgpt" or recipe.prune.shortgpt_recovery == "all"]


def train_recipe(
    recipe: PruneRecipe,
    name: str,
    overrides: dict[str, Any] | None = None,
    *,
    initial: Path | None = None,
    output_dir: Path | None = None,
) -> TrainRecipe:
    """The ``train`` recipe of one variant: the prune recipe's sections, starting from its ``initial/``.

    Every variant gets the same ``train:`` and ``data:`` (the same recovery budget); the ShortGPT model
    has no adapters, so its (optional) recovery trains every parameter. `overrides` replace ``train:``
    values (the compare command's per-method learning rate); `initial` and `output_dir` replace the
    variant's ``initial/`` and directory (the phases of a late output norm).
    """
    vdir = RunDir(Path(recipe.output_dir)).variant(name)
    initial = initial or vdir / INITIAL
    train: dict[str, Any] = dict(overrides or {})
    if name == "shortgpt":
        train["trainable"] = "all"
    train.update(compact_export(recipe.train.export, Plan.load(initial / "plan.json")))
    return handoff_train_recipe(recipe, initial, output_dir=output_dir or vdir, train=train)


def compact_export(export: str, plan: Plan) -> dict[str, Any]:
    """``train:`` values for a recovery from a model of `plan`: a plan with output norms exports compact
    only (they have no plain-model counterpart), so a ``materialized`` export is dropped."""
    if "materialized" in export and any(s.out_norm for s in plan.slots):
        return {"export": "compact"}
    return {}


def run(recipe: PruneRecipe, *, prune_only: bool = False, log: Callable = print) -> Any:
    """The prune command: prune on rank 0 (once), then train every variant's recovery on every rank.

    The pruning step runs before any process group exists: under a launcher the other ranks wait
    for it outside every collective (up to ``train.rank0_wait_s``), so the process group's timeout
    (``train.dist_timeout_s``) never limits it, and a failure on rank 0 stops them with its message.

    Args:
        recipe: a validated prune recipe.
        prune_only: stop after the pruning step (no process group, no training).
        log: where the report lines go (rank 0 only).

    Returns:
        The ``PruneSummary`` when `prune_only` (None on ranks other than 0), else
        ``{variant: TrainResult}`` of the recovery runs.

    Raises:
        PruneError: a refused rerun, a recipe value that does not fit the model or the data, or (on
            the other ranks) a pruning step that failed on rank 0.
    """
    from flexigpt.shared.train.launch import rank0_step

    config = source_config(recipe)
    rd = RunDir(Path(recipe.output_dir))
    precheck(recipe, config, rd, blocks_to_remove(recipe, config))  # every rank refuses alike
    t = recipe.train
    summary = rank0_step("the pruning step", lambda: prune(recipe, config, log), PruneError, t.rank0_wait_s)
    if prune_only:
        return summary
    from flexigpt.prune.depth.late_norm import recover
    from flexigpt.shared.train.components import init_distributed

    init_distributed(t.cpu_shm_comm, t.dist_timeout_s)
    results: dict[str, Any] = {}
    for name in trained_variants(recipe):
        log(f"[{name}] recovery training -> {rd.variant(name)}")
        # every rank starts from the saved initial model, so all ranks (and every restart) agree exactly
        results[name] = recover(recipe, name, log=log)
        if results[name].interrupted_by:
            break  # a signal stopped this run after its checkpoint: leave the next variants for the rerun
    return results
