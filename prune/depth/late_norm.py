"""Recovery of a pruned variant, with FlexiGPT's output norm added after a first phase (``norm_after``).

With ``prune.replace.norm_after: K`` the FlexiGPT model is built without output norms, so its
SVD-initialised slots start as they are (the no-norm model), and its recovery runs in two phases
of one schedule:

1. ``<variant>/phase1/``: the trainer runs the recipe's schedule (``max_steps``, warm-up, decay) but
   stops after step K with a checkpoint (``train.stop_at_step``);
2. ``<variant>/initial_normed/``: the model of that checkpoint with an output norm on every
   replacement slot, gamma from ``replace.gamma``: ``measured`` sets it per feature from the trained
   slots' own outputs on the gamma text (so the norm starts near identity in scale), a number sets
   every entry; ``gamma_late.json`` records it, with the gamma-text perplexity before and after;
3. ``<variant>/``: the trainer continues from step K of phase 1 with that model: a weights-only
   resume of phase 1's checkpoint (the norms keep their new values), so the learning rate follows
   the one schedule and the data stream continues where phase 1 stopped; the optimizer moments
   start again (the parameter set changed). The final model lands in ``<variant>/final`` as usual,
   and the recovery has seen the same tokens as every other variant.

Every phase resumes: a rerun skips what is finished (phase 1 once ``initial_normed/`` exists) and
the trainer resumes an interrupted phase from its own checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flexigpt.prune.depth.build import PruneError
from flexigpt.prune.depth.gamma import MEASURED, GammaCalibration, measure_gamma, norms_bypassed, output_norms
from flexigpt.prune.depth.recipe import PruneRecipe
from flexigpt.prune.depth.run import INITIAL, RunDir, source_config, train_recipe, variant_plan
from flexigpt.prune.depth.selection import SelectionResult
from flexigpt.prune.depth.steps import StartPerplexity, gamma_tensors, resolve_device
from flexigpt.shared.command import load_command_tokenizer
from flexigpt.shared.engine.apply import add_output_norms
from flexigpt.shared.engine.checkpoint import load_compact, save_compact
from flexigpt.shared.engine.plan import Plan
from flexigpt.shared.evaluate.perplexity import sample_perplexity
from flexigpt.shared.files import atomic_dir, write_text_atomic

PHASE1, NORMED, RECORD = "phase1", "initial_normed", "gamma_late.json"


def recover(
    recipe: PruneRecipe, name: str, overrides: dict[str, Any] | None = None, log: Callable = print
) -> Any:
    """Train one variant's recovery (on every rank): one trainer run, or the two phases of a late norm.

    Args:
        recipe: the prune recipe (or the one a comparison makes).
        name: the variant.
        overrides: ``train:`` values for this variant (a comparison's per-method learning rate).
        log: where the report lines go.

    Returns:
        The ``TrainResult`` of the run that ended the recovery (phase 2 for a late norm, or phase 1
        when a signal stopped it).

    Raises:
        PruneError: phase 1 ended before its step, or (on other ranks) adding the norms failed.
    """
    from flexigpt.shared.train.launch import rank0_step
    from flexigpt.shared.train.state import list_checkpoints, tag_for
    from flexigpt.shared.train.trainer import train

    k = recipe.prune.replace.norm_after
    if name != "flexigpt" or k is None:
        return train(train_recipe(recipe, name, overrides))
    vdir = RunDir(Path(recipe.output_dir)).variant(name)
    first = vdir / PHASE1
    ckpt = first / "checkpoints" / tag_for(k)
    if not (vdir / NORMED / "config.json").is_file():
        log(f"[{name}] recovery phase 1, without output norms, steps 0 -> {k} -> {first}")
        res = train(train_recipe(recipe, name, {**(overrides or {}), "stop_at_step": k}, output_dir=first))
        if res.interrupted_by:
            return res
        if res.step != k or not ckpt.is_dir():
            raise PruneError(f"[{name}] recovery phase 1 ended at step {res.step} without {ckpt}; run again")
    rank0_step(
        "adding the output norms",
        lambda: add_norms(recipe, name, ckpt, log),
        PruneError,
        recipe.train.rank0_wait_s,
    )
    # phase 2's own checkpoints once it has some; before that, step k of phase 1 (weights only: the
    # plan gained the norms, which keep the values initial_normed/ holds)
    resume = "auto" if list_checkpoints(vdir / "checkpoints") else str(ckpt)
    log(f"[{name}] recovery phase 2, with output norms, from step {k} -> {vdir}")
    return train(
        train_recipe(recipe, name, overrides, initial=vdir / NORMED), resume=resume, allow_plan_change=True
    )


def add_norms(recipe: PruneRecipe, name: str, ckpt: Path, log: Callable = print) -> Path:
    """Write ``initial_normed/``: phase 1's model at `ckpt` with the output norms, gamma as the recipe says.

    Returns:
        The directory (left as it is when it exists already).
    """
    from flexigpt.shared.train.export import consolidated_state_dict, load_weights

    rd = RunDir(Path(recipe.output_dir))
    vdir = rd.variant(name)
    out = vdir / NORMED
    if (out / "config.json").is_file():
        return out
    config = source_config(recipe)
    start = Plan.load(vdir / INITIAL / "plan.json")
    sel = SelectionResult.load(rd.selection)
    plan = variant_plan(recipe, config, name, list(start.removed_blocks), sel, late=True)
    tokenizer = load_command_tokenizer(recipe.model, PruneError)
    model = load_compact(vdir / INITIAL).to(resolve_device(recipe))
    load_weights(model, consolidated_state_dict(ckpt))  # strict: the phase-1 model whole
    model.eval()
    add_output_norms(model, plan)
    ppl = StartPerplexity(recipe, tokenizer)
    ppl.tokens()  # the gamma text leaves out the start-perplexity documents
    samples, text = gamma_tensors(
        recipe, tokenizer, getattr(config, "max_position_embeddings", None), ppl.documents
    )
    norms = output_norms(model)
    with norms_bypassed(norms):
        before = sample_perplexity(model, samples).ppl
    gamma, mean = recipe.prune.replace.gamma, None
    if gamma == MEASURED:
        mean = float(torch.cat(measure_gamma(model, samples)).mean())
        cal = GammaCalibration(MEASURED, None, [], mean)  # the plan records the mean, as at build time
        model.plan = variant_plan(recipe, config, name, list(start.removed_blocks), sel, cal, late=True)
    after = sample_perplexity(model, samples).ppl
    record = {
        "gamma": gamma,
        "measured_mean": mean,
        "after_checkpoint": str(ckpt),
        "gamma_text_ppl": {"without_norms": before, "with_norms": after},
        "text": text,
    }
    log(
        f"[{name}] output norms added after {ckpt.name} (gamma {gamma}"
        + (f", mean {mean:.4g}" if mean is not None else "")
        + f"): gamma-text perplexity {before:.2f} without, {after:.2f} with -> {out}"
    )
    with atomic_dir(out) as tmp:
        save_compact(model, tmp, tokenizer=tokenizer)
    write_text_atomic(vdir / RECORD, json.dumps(record, indent=1) + "\n")
    return out
