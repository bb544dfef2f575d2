"""The surgeon command: multi-shot pruning of every method, each variant shrunk, saved and measured.

Layout of ``output_dir``::

    recipe.yaml, settings.json        the resolved recipe; what a rerun must share to resume
    dense/perplexity.json             the unpruned model's perplexity
    <method>/state.json               the last finished shot (and each shot's result)
    <method>/weights-<shot>.safetensors  the decoder linears after that shot
    <method>-<size%>/model            the shrunk compact model (``from_pretrained`` loads it)
    <method>-<size%>/plain            its plain export (source architecture, removed parts as zeros)
    <method>-<size%>/sparsity.json|png  the per-layer sparsity the threshold chose
    <method>-<size%>/variant.json     stored parameters, perplexity, zeroed fraction
    summary.json                      every variant and the dense model

A rerun resumes each method after its last finished shot (weights first, then the state that
names them, both written atomically); finished variants are kept.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from flexigpt.prune.depth.importance import calibration_samples
from flexigpt.prune.surgeon.correction import CorrectionError, LoraOptions, correct
from flexigpt.prune.surgeon.curvature import decoder_linears
from flexigpt.prune.surgeon.plots import plot_sparsity
from flexigpt.prune.surgeon.recipe import SurgeonError, SurgeonRecipe
from flexigpt.prune.surgeon.shot import ShotOptions, prune_shot
from flexigpt.prune.surgeon.shrink import shrink_model
from flexigpt.shared.command import load_command_tokenizer, pick_device, read_source_config
from flexigpt.shared.engine.apply import apply_plan, stored_param_count
from flexigpt.shared.engine.checkpoint import export_materialized, load_model, save_compact
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.evaluate.perplexity import (
    encode_documents,
    perplexity,
    section_documents,
    stream_documents,
)
from flexigpt.shared.recipe import RecipeError, StreamSection
from flexigpt.shared.text import TextRule, resolve_text_rule
from flexigpt.shared.train.components import DTYPES
from flexigpt.shared.train.data import DataError


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _settings(recipe: SurgeonRecipe) -> dict[str, Any]:
    """What every shot depends on: a rerun with other values would not continue the same run."""
    s = recipe.surgeon.model_dump(mode="json")
    for key in ("methods", "save_sizes", "perplexity", "save_plain", "device"):
        s.pop(key)
    stream = recipe.surgeon.calibration.stream
    data = None if stream is not None else {k: getattr(recipe.data, k) for k in ("source", "files", "hub_id")}
    return {"model": recipe.model.source, "dtype": recipe.model.dtype, "surgeon": s, "calibration_data": data}


def _device(recipe: SurgeonRecipe) -> torch.device:
    return pick_device(recipe.surgeon.device, "surgeon.device", SurgeonError)


def _calibration(
    recipe: SurgeonRecipe, tokenizer: Any, rule: TextRule, max_positions: int | None
) -> list[torch.Tensor]:
    c = recipe.surgeon.calibration
    if max_positions is not None and c.seq_len > max_positions:
        raise SurgeonError(
            f"surgeon.calibration.seq_len={c.seq_len} exceeds the model's max_position_embeddings "
            f"({max_positions}); allowed 2..{max_positions}"
        )
    stream = c.stream or StreamSection(**{k: getattr(recipe.data, k) for k in StreamSection.model_fields})
    try:
        samples = list(
            calibration_samples(
                stream_documents(stream),
                lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                num_samples=c.num_samples,
                seq_len=c.seq_len,
                pack=c.pack,
                text=rule,
            )
        )
    except (DataError, FileNotFoundError, ValueError) as e:
        raise SurgeonError(f"surgeon.calibration: {e}") from e
    if not samples:
        raise SurgeonError("surgeon.calibration: the stream gave no calibration window; check its files")
    return samples


class _Perplexity:
    """The held-out tokens (read once) and how windows are cut from them."""

    def __init__(self, recipe: SurgeonRecipe, tokenizer: Any, rule: TextRule) -> None:
        pc, data = recipe.surgeon.perplexity, recipe.data
        try:
            if pc is not None:
                docs = section_documents(pc)
                n = pc.max_tokens
                self.context, self.stride, self.batch = pc.context_len, pc.stride, pc.batch_size
            else:
                assert data.eval is not None  # the recipe asks for one of the two
                n = data.eval.batches * data.seq_len
                docs = stream_documents(
                    StreamSection(**{k: getattr(data.eval, k) for k in StreamSection.model_fields})
                )
                self.context, self.stride, self.batch = data.seq_len, None, 1
            self.tokens = encode_documents(
                docs, tokenizer, max_tokens=n, add_bos=rule.bos, eos_between_docs=rule.eos_between_docs
            )
        except (DataError, FileNotFoundError, ValueError) as e:
            key = "surgeon.perplexity" if pc is not None else "data.eval"
            raise SurgeonError(f"{key}: {e}") from e

    def __call__(self, model: PreTrainedModel, name: str) -> dict[str, Any]:
        start = time.perf_counter()
        r = perplexity(
            model,
            self.tokens,
            context_len=self.context,
            stride=self.stride,
            batch_size=self.batch,
            progress=False,
        )
        return {**r.to_dict(), "seconds": time.perf_counter() - start}


def _load(recipe: SurgeonRecipe, device: torch.device) -> PreTrainedModel:
    m = recipe.model
    dtype = (
        DTYPES[m.dtype] if m.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    model = load_model(m.source, dtype=dtype, attn_implementation=m.attn_implementation)
    return model.to(device).eval()


def _linear_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    out = {}
    for r in decoder_linears(model):
        out[f"{r.key}.weight"] = r.module.weight.detach().cpu().contiguous()
        if r.module.bias is not None:
            out[f"{r.key}.bias"] = r.module.bias.detach().cpu().contiguous()
    return out


@torch.no_grad()
def _restore(model: PreTrainedModel, path: Path) -> None:
    saved = load_file(str(path))
    for r in decoder_linears(model):
        r.module.weight.copy_(saved[f"{r.key}.weight"])
        if r.module.bias is not None:
            r.module.bias.copy_(saved[f"{r.key}.bias"])


def _variant_name(method: str, size: float) -> str:
    return f"{method}-{size * 100:g}"


def _save_variant(
    model: PreTrainedModel,
    recipe: SurgeonRecipe,
    method: str,
    shot: int,
    size: float,
    result: dict[str, Any],
    ctx: dict[str, Any],
    log: Callable[..., None],
) -> dict[str, Any]:
    out: Path = ctx["out"]
    name = _variant_name(method, size)
    vdir = out / name
    if (vdir / "variant.json").is_file():
        return json.loads((vdir / "variant.json").read_text())
    notes = {"method": method, "shot": shot, "target_size": size, "structures": recipe.surgeon.structures}
    source, plan = shrink_model(copy.deepcopy(model), notes=notes)
    shrunk = apply_plan(source, plan)
    save_compact(shrunk, vdir / "model", tokenizer=ctx["tokenizer"])
    if recipe.surgeon.save_plain:
        export_materialized(shrunk, vdir / "plain", tokenizer=ctx["tokenizer"])
    _write_json(vdir / "sparsity.json", result["sparsity"])
    targets = [t for t, _ in get_layout(model.config).linears]
    plot_sparsity(
        result["sparsity"], targets, vdir / "sparsity.png", f"{name}: zero weights per decoder linear"
    )
    entry = {
        "name": name,
        "method": method,
        "shot": shot,
        "target_size": size,
        "decoder_linear_zero_fraction": result["zeroed"] / result["total"],
        "stored_params": stored_param_count(shrunk),
        "dense_params": ctx["dense_params"],
        "narrowed_blocks": {str(b): vars(s) for b, s in plan.block_shapes.items()},
        "perplexity": ctx["ppl"](shrunk, name),
    }
    _write_json(vdir / "variant.json", entry)
    log(
        f"[{name}] stored {entry['stored_params']:,} of {entry['dense_params']:,} parameters, "
        f"perplexity {entry['perplexity']['ppl']:.4g} -> {vdir}"
    )
    return entry


def _run_method(
    recipe: SurgeonRecipe, method: str, ctx: dict[str, Any], log: Callable[..., None]
) -> list[dict]:
    s = recipe.surgeon
    mdir: Path = ctx["out"] / method
    mdir.mkdir(parents=True, exist_ok=True)
    state_path = mdir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"shot": 0, "results": []}
    model = _load(recipe, ctx["device"])
    if state["shot"]:
        _restore(model, mdir / state["weights"])
        log(f"[{method}] resuming after shot {state['shot']} of {s.shots}")
    opts = ShotOptions(
        method=method,
        structures=s.structures,
        damp_g=s.damp_g,
        damp_a=s.damp_a,
        fisher=s.fisher,
        update=s.update,
        max_correlate=s.max_correlate,
        obd=s.obd if method == "surgeon" else None,
        blocks_per_pass=s.blocks_per_pass,
        factors=s.factors,
        scratch=mdir,
        seed=s.seed,
    )
    lo = s.lora
    lora = LoraOptions(
        rank=lo.rank,
        alpha=lo.alpha,
        lr=lo.lr,
        samples=lo.samples,
        epochs=lo.epochs,
        batch=lo.batch,
        final_pass=lo.final_pass,
        final_epochs=lo.final_epochs,
        targets=tuple(lo.targets),
        seed=s.seed,
    )
    saved = s.saved_shots()
    variants = []
    for shot in range(1, s.shots + 1):
        if shot <= state["shot"]:
            if shot in saved:
                vfile = ctx["out"] / _variant_name(method, saved[shot]) / "variant.json"
                if not vfile.is_file():
                    raise SurgeonError(
                        f"{vfile} is missing but the {method} run is past shot {shot}; use a new output_dir"
                    )
                variants.append(json.loads(vfile.read_text()))
            continue
        log(f"[{method}] shot {shot}/{s.shots}")
        result = prune_shot(model, ctx["samples"], s.target(shot), opts, log=log).to_dict()
        if s.lora.enabled:  # part of the shot: a resumed run redoes both or neither
            try:
                result["correction"] = correct(model, ctx["samples"], lora, shot=shot, log=log)
                if shot == s.shots and s.lora.final_pass:
                    result["final_correction"] = correct(model, ctx["samples"], lora, shot=None, log=log)
            except CorrectionError as e:
                raise SurgeonError(f"[{method}] shot {shot}: {e}") from e
        if shot in saved:
            variants.append(_save_variant(model, recipe, method, shot, saved[shot], result, ctx, log))
        weights = f"weights-{shot}.safetensors"
        save_file(_linear_tensors(model), str(mdir / f".{weights}.tmp"))
        os.replace(mdir / f".{weights}.tmp", mdir / weights)
        previous = state.get("weights")
        state = {"shot": shot, "weights": weights, "results": [*state["results"], result]}
        _write_json(state_path, state)
        if previous and previous != weights:
            (mdir / previous).unlink(missing_ok=True)
    del model
    gc.collect()
    return variants


def run(recipe: SurgeonRecipe, log: Callable[..., None] = print) -> dict[str, Any]:
    """Prune with every method of the recipe, save and measure each variant; returns the summary.

    Raises:
        SurgeonError: a recipe value the run cannot use, or a rerun with other settings.
    """
    out = Path(recipe.output_dir)
    settings = _settings(recipe)
    if (out / "settings.json").is_file():
        old = json.loads((out / "settings.json").read_text())
        if old != settings:
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            raise SurgeonError(
                f"output_dir={str(out)!r} holds a run with other settings ({', '.join(changed)} differ); "
                "use a new output_dir or restore them"
            )
    config = read_source_config(recipe.model.source, SurgeonError, "prune its plain source model instead")
    get_layout(config)
    device = _device(recipe)
    tokenizer = load_command_tokenizer(recipe.model, SurgeonError)
    try:
        rule = resolve_text_rule(recipe.text, tokenizer)
    except RecipeError as e:
        raise SurgeonError(str(e)) from e
    samples = _calibration(recipe, tokenizer, rule, getattr(config, "max_position_embeddings", None))
    ctx: dict[str, Any] = {
        "out": out,
        "device": device,
        "tokenizer": tokenizer,
        "samples": samples,
        "ppl": _Perplexity(recipe, tokenizer, rule),
    }
    # written once the recipe's inputs have all been read: a refused run leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "settings.json", settings)
    recipe.save(out / "recipe.yaml")
    dense_path = out / "dense" / "perplexity.json"
    dense = _load(recipe, device)
    ctx["dense_params"] = stored_param_count(dense)
    if dense_path.is_file():
        dense_ppl = json.loads(dense_path.read_text())
    else:
        dense_ppl = ctx["ppl"](dense, "dense")
        dense_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(dense_path, dense_ppl)
    del dense
    log(f"[dense] {ctx['dense_params']:,} parameters, perplexity {dense_ppl['ppl']:.4g}")
    summary: dict[str, Any] = {
        "dense": {"stored_params": ctx["dense_params"], "perplexity": dense_ppl},
        "calibration": {"windows": len(samples), "tokens": sum(x.numel() for x in samples)},
        "text": {"rule": rule.to_dict(), "summary": rule.summary()},
        "variants": {},
    }
    for method in recipe.surgeon.methods:
        for v in _run_method(recipe, method, ctx, log):
            summary["variants"][v["name"]] = v
    _write_json(out / "summary.json", summary)
    log(summary_table(summary))
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """One line per model: stored parameters and perplexity."""
    d = summary["dense"]
    lines = [f"{'model':<18} {'stored params':>14} {'perplexity':>11}"]
    lines.append(f"{'dense':<18} {d['stored_params']:>14,} {d['perplexity']['ppl']:>11.4g}")
    for name, v in summary["variants"].items():
        lines.append(f"{name:<18} {v['stored_params']:>14,} {v['perplexity']['ppl']:>11.4g}")
    return "\n".join(lines)
