"""The compare command as library calls: build every method once, recover each with one budget, judge all.

``output_dir`` of a comparison holds

- ``compare_recipe.yaml`` and ``compare_settings.json`` (what decides the models; a rerun with other
  settings is refused);
- ``prune/``: the prune command's run of the FlexiGPT family (flexigpt, shortgpt, shortgpt_lora);
- ``prune-no-norm/``, ``prune-gamma-paper/``, ``prune-measured/``, ``prune-calibrated/``,
  ``prune-late-norm/``: the prune runs of the FlexiGPT output-norm options the recipe names
  (``NORM_METHODS``);
- ``<method>/`` for every baseline: ``initial/`` (the pruned plain model), ``method.json`` (what the
  method chose; written last, the completion mark), then the trainer's files and ``final/``;
- ``surgeon-run/``: the surgeon command's run of method ``surgeon`` (its shrunk model is then
  ``surgeon/initial/``, recovered like a baseline's);
- ``cards/<model>.json``: the measured perplexities and zero-shot scores (reused on a rerun);
- ``comparison.md`` / ``comparison.json`` / ``comparison.png``: the table and the figure.

Run again, finished models are not rebuilt, the trainer resumes each recovery run, and only the
speed is measured anew (all models one after another in one process, so they are comparable).
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flexigpt.prune.compare.card import Card, measure_speed, param_counts, write_card, zeroshot_scores
from flexigpt.prune.compare.recipe import COMMAND_METHODS, LATE, NORM_METHODS, CompareRecipe
from flexigpt.prune.depth.baselines import BASELINES, get_baseline
from flexigpt.prune.depth.build import PruneError
from flexigpt.prune.depth.recipe import VARIANTS, PruneRecipe
from flexigpt.prune.depth.run import (
    blocks_to_remove,
    check_architecture,
    source_config,
    train_recipe,
    trained_variants,
)
from flexigpt.prune.depth.run import run as prune_run
from flexigpt.prune.depth.steps import (
    SourceModel,
    calibration_tensors,
    resolve_device,
    resolve_dtype,
    text_rule,
)
from flexigpt.shared.command import handoff_train_recipe, load_command_tokenizer
from flexigpt.shared.engine.checkpoint import load_model
from flexigpt.shared.engine.plan import Plan
from flexigpt.shared.evaluate.cli import zeroshot_key
from flexigpt.shared.evaluate.perplexity import (
    describe_section,
    encode_documents,
    perplexity,
    section_documents,
    stream_documents,
)
from flexigpt.shared.files import write_text_atomic
from flexigpt.shared.recipe import StreamSection


def family_recipe(recipe: CompareRecipe, option: str | None = None) -> PruneRecipe:
    """The prune recipe of the FlexiGPT family in ``output_dir/prune`` (also the calibration reader).

    With `option` (a ``NORM_METHODS`` name): the run of that FlexiGPT output-norm option in its own
    directory, FlexiGPT with the ``replace:`` values the option sets and otherwise the same options
    (its own importance pass gives the same removed blocks and bases: the same text and settings).
    """
    c = recipe.compare
    raw = recipe.model_dump(mode="json")
    raw.pop("compare")
    first = next(iter(c.perplexity.values()), None)
    raw.update(kind="prune", output_dir=str(family_dir(recipe, option)))
    replace = c.replace.model_dump(mode="json")
    if option is not None:
        replace.update(NORM_METHODS[option][1])
        if replace.get("norm_after") == LATE:  # flexigpt_late_norm
            replace["norm_after"] = c.norm_after or (recipe.train.max_steps or 2) // 2
        if replace["gamma"] == "calibrate":  # flexigpt_calibrated: measured and none among the candidates
            extra = [w for w in ("measured", "none") if w not in replace["gamma_candidates"]]
            replace["gamma_candidates"] = [*replace["gamma_candidates"], *extra]
    raw["prune"] = {
        "variants": ["flexigpt"] if option else [m for m in c.methods if m in VARIANTS] or ["shortgpt"],
        "ratio": c.ratio,
        "ratio_rule": c.ratio_rule,
        "metric": c.metric,
        "calibration": c.calibration.model_dump(mode="json"),
        "selection": c.selection.model_dump(mode="json"),
        "replace": replace,
        "perplexity": first.model_dump(mode="json") if first else None,
        "shortgpt_recovery": "all" if c.recovery == "equal" else "none",
        "device": c.device,
    }
    return PruneRecipe.model_validate(raw)


def family_dir(recipe: CompareRecipe, option: str | None = None) -> Path:
    """Where the prune command's run of the FlexiGPT family (or of one output-norm option) lives."""
    return Path(recipe.output_dir) / (NORM_METHODS[option][0] if option else "prune")


def method_dir(recipe: CompareRecipe, name: str) -> Path:
    """The directory of one method's models and runs."""
    if name in NORM_METHODS:
        return family_dir(recipe, name) / "flexigpt"
    return family_dir(recipe) / name if name in VARIANTS else Path(recipe.output_dir) / name


def settings(recipe: CompareRecipe, n: int) -> dict[str, Any]:
    """What decides the models of a comparison (other methods or evaluations may be added later)."""
    c = recipe.compare
    return {
        "model.source": recipe.model.source,
        "compare.ratio": c.ratio,
        "compare.ratio_rule": c.ratio_rule,
        "n_removed": n,
        "compare.calibration": c.calibration.model_dump(mode="json"),
        "compare.baselines": c.baselines.model_dump(mode="json"),
        "compare.recovery": c.recovery,
        "text": recipe.text.model_dump(mode="json"),
        "train": recipe.train.model_dump(mode="json"),
        **({"compare.lr": c.lr} if c.lr else {}),
        **({"compare.surgeon": c.surgeon.model_dump(mode="json")} if "surgeon" in c.methods else {}),
    }


def _check_settings(out: Path, now: dict[str, Any]) -> None:
    path = out / "compare_settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
        if diff:
            raise PruneError(
                f"output_dir={str(out)!r} holds a comparison with other values of {', '.join(diff)}; use another "
                f"output_dir, or the recipe of that run ({out / 'compare_recipe.yaml'})"
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=1) + "\n")


# ------------------------------------------------------------------------------------- building
def build_baselines(recipe: CompareRecipe, pr: PruneRecipe, n: int, log: Callable) -> None:
    """Build every baseline of the recipe that has no ``method.json`` yet (the source loaded once)."""
    out = Path(recipe.output_dir)
    todo = [m for m in recipe.compare.methods if m in BASELINES and not (out / m / "method.json").is_file()]
    if not todo:
        return
    device = resolve_device(pr)
    source = SourceModel(pr, device, resolve_dtype(pr, device), log)
    tokenizer = load_command_tokenizer(recipe.model, PruneError)
    model = source.get()
    samples = list(calibration_tensors(pr, tokenizer, getattr(model.config, "max_position_embeddings", None)))
    options = recipe.compare.baselines.model_dump()
    for name in todo:
        vdir = out / name
        t0 = time.perf_counter()
        log(f"[{name}] {BASELINES[name].description}")
        result = get_baseline(name).fn(model, samples, n, options)
        tmp = vdir / ".initial.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        result.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(vdir / "initial", ignore_errors=True)
        tmp.rename(vdir / "initial")
        info = {
            "removed": result.removed,
            "layers": result.layers,
            "train": result.train,
            "notes": result.notes,
        }
        info["seconds"] = time.perf_counter() - t0
        (vdir / "method.json").write_text(json.dumps(info, indent=1) + "\n")
        log(f"[{name}] removed {result.removed}; {len(result.layers)} layers -> {vdir / 'initial'}")
        result = None
    source.free()


def build_command_methods(recipe: CompareRecipe, n: int, config: Any, log: Callable) -> None:
    """Build every method another command makes (``COMMAND_METHODS``) that has no ``method.json`` yet."""
    out = Path(recipe.output_dir)
    for name in recipe.compare.methods:
        if name in COMMAND_METHODS and not (out / name / "method.json").is_file():
            importlib.import_module(COMMAND_METHODS[name]).build(recipe, n, config, log)


def command_hooks(recipe: CompareRecipe, hook: str) -> list[Callable]:
    """The function `hook` of every command-built method of the recipe whose module has one: ``check(recipe,
    n, config)`` refuses a recipe before anything is written, ``header_lines(recipe)`` adds to the header."""
    mods = [
        importlib.import_module(COMMAND_METHODS[m]) for m in recipe.compare.methods if m in COMMAND_METHODS
    ]
    return [getattr(mod, hook) for mod in mods if hasattr(mod, hook)]


def train_baselines(recipe: CompareRecipe, log: Callable) -> None:
    """Recovery of every baseline (and command-built method) with the recipe's ``train:`` budget."""
    from flexigpt.shared.train.components import init_distributed
    from flexigpt.shared.train.trainer import train

    init_distributed(recipe.train.cpu_shm_comm)
    out = Path(recipe.output_dir)
    for name in [m for m in recipe.compare.methods if m in BASELINES or m in COMMAND_METHODS]:
        vdir = out / name
        info = json.loads((vdir / "method.json").read_text())
        overrides = {"trainable": "all", **info["train"], **_lr(recipe, name)}
        tr = handoff_train_recipe(recipe, vdir / "initial", output_dir=vdir, train=overrides)
        log(f"[{name}] recovery training ({_trainable(overrides)}, lr {tr.train.lr:g}) -> {vdir}")
        res = train(tr)
        _write_recovery(vdir, res, _trainable(overrides), tr.train.lr)
        if res.interrupted_by:
            raise PruneError(f"[{name}] recovery stopped by signal {res.interrupted_by}; run again to resume")


def _trainable(train: dict[str, Any]) -> str:
    if train.get("trainable_layers") is None:
        return str(train.get("trainable", "all"))
    head = " + head" if train.get("trainable_head") else ""
    return f"layers {train['trainable_layers']}{head}"


def _lr(recipe: CompareRecipe, name: str) -> dict[str, float]:
    """``train:`` overrides of one method's recovery: its ``compare.lr``, when the recipe names one."""
    return {"lr": recipe.compare.lr[name]} if name in recipe.compare.lr else {}


def train_family(recipe: CompareRecipe, family: PruneRecipe, option: str | None, log: Callable) -> None:
    """Recovery of the variants of one prune run, each at its method's learning rate, one budget."""
    from flexigpt.prune.depth.late_norm import recover
    from flexigpt.shared.train.components import init_distributed

    init_distributed(recipe.train.cpu_shm_comm, recipe.train.dist_timeout_s)
    for v in trained_variants(family):
        name = option or v
        tr = train_recipe(family, v, _lr(recipe, name))
        vdir = method_dir(recipe, name)
        trainable = _trained(tr.train.trainable, Plan.load(Path(tr.model.source) / "plan.json"))
        k = family.prune.replace.norm_after
        if v == "flexigpt" and k is not None:
            trainable = f"{trainable}; adapters+norms from step {k}"
        log(f"[{name}] recovery training ({trainable}, lr {tr.train.lr:g}) -> {vdir}")
        res = recover(family, v, _lr(recipe, name), log)
        _write_recovery(vdir, res, trainable, tr.train.lr)
        if res.interrupted_by:
            raise PruneError(f"[{name}] recovery stopped by signal {res.interrupted_by}; run again to resume")


def _trained(rule: str, plan: Plan) -> str:
    """What a recovery trains, in words: ``adapters+norms`` on a model without norms of its own is adapters."""
    if rule == "adapters+norms" and not any(s.out_norm is not None or s.own_norms for s in plan.slots):
        return "adapters"
    return rule


def _write_recovery(vdir: Path, res: Any, trainable: str, lr: float) -> None:
    record = {"tokens": res.tokens_seen, "steps": res.step, "trainable": trainable, "lr": lr}
    write_text_atomic(vdir / "recovery.json", json.dumps(record, indent=1) + "\n")


# ------------------------------------------------------------------------------------- judging
def model_paths(recipe: CompareRecipe) -> list[tuple[str, Path, Path]]:
    """(name, model to judge, model before recovery) of every method, in the recipe's order."""
    trained = recipe.compare.recovery == "equal"
    rows = []
    for m in recipe.compare.methods:
        vdir = method_dir(recipe, m)
        start = vdir / ("initial_plain" if m == "shortgpt" else "initial")
        rows.append((m, vdir / "final" if trained else start, start))
    return rows


class Texts:
    """The token streams of the named perplexity texts, made once by the recipe's text rule."""

    def __init__(self, recipe: CompareRecipe, tokenizer: Any) -> None:
        pr = family_recipe(recipe)
        self.rule = text_rule(pr, tokenizer)
        self.streams: dict[str, tuple[torch.Tensor, int | None, int | None, int]] = {}
        self.described: dict[str, str] = {}
        texts = dict(recipe.compare.perplexity)
        for name, pc in texts.items():
            ids = encode_documents(
                section_documents(pc),
                tokenizer,
                max_tokens=pc.max_tokens,
                add_bos=self.rule.bos,
                eos_between_docs=self.rule.eos_between_docs,
            )
            self.streams[name] = (ids, pc.context_len, pc.stride, pc.batch_size)
            where = describe_section(pc)
            self.described[name] = (
                f"{where}, {len(ids):,} tokens, windows of {pc.context_len or 'the model limit (<= 2048)'} with stride "
                f"{pc.stride or 'context/2'}"
            )
        if not texts:
            ev = recipe.data.eval
            assert ev is not None  # the recipe validator asks for one of the two
            seq = recipe.data.seq_len
            max_tokens = ev.batches * recipe.train.micro_batch * seq
            ids = encode_documents(
                stream_documents(StreamSection(**{k: getattr(ev, k) for k in StreamSection.model_fields})),
                tokenizer,
                max_tokens=max_tokens,
                add_bos=self.rule.bos,
                eos_between_docs=self.rule.eos_between_docs,
            )
            self.streams["data.eval"] = (ids, seq, seq, 1)
            self.described["data.eval"] = f"data.eval, {len(ids):,} tokens, disjoint windows of {seq}"


def judge(
    recipe: CompareRecipe,
    name: str,
    path: Path,
    start: Path | None,
    texts: Texts,
    tokenizer: Any,
    log: Callable,
) -> Card:
    """The card of one model (perplexity and zero-shot reused from ``cards/<name>.json``; speed measured)."""
    c, out = recipe.compare, Path(recipe.output_dir)
    device = resolve_device(family_recipe(recipe))
    if not (path / "config.json").is_file():
        raise PruneError(
            f"[{name}] no model at {path}; run the comparison again (a recovery run did not finish)"
        )
    model = load_model(path).to(device).eval()
    whole, non_emb, linear = param_counts(model)
    cache = out / "cards" / f"{name}.json"
    key = {
        "path": str(path),
        "texts": {k: list(v[1:]) for k, v in texts.streams.items()},
        "zeroshot": zeroshot_key(c.zeroshot),
    }
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if saved.get("key") == key:
        measured = saved["measured"]
    else:
        measured = {"ppl": {}, "ppl_start": {}, "zeroshot": {}, "zeroshot_avg": None}
        for t, (ids, ctx, stride, batch) in texts.streams.items():
            measured["ppl"][t] = perplexity(
                model, ids, context_len=ctx, stride=stride, batch_size=batch, progress=False
            ).ppl
        if start is not None and start != path:
            before = load_model(start).to(device).eval()
            for t, (ids, ctx, stride, batch) in texts.streams.items():
                measured["ppl_start"][t] = perplexity(
                    before, ids, context_len=ctx, stride=stride, batch_size=batch, progress=False
                ).ppl
            before = None
        if c.zeroshot is not None:
            from flexigpt.shared.evaluate.zeroshot import evaluate_zeroshot

            z = evaluate_zeroshot(
                model,
                tokenizer,
                c.zeroshot.tasks,
                batch_size=c.zeroshot.batch_size,
                limit=c.zeroshot.limit,
                include_path=c.zeroshot.include_path or None,
                include_defaults=c.zeroshot.include_defaults,
                local_data=c.zeroshot.local_data,
            )
            measured["zeroshot"], measured["zeroshot_avg"] = zeroshot_scores(z)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "measured": measured}, indent=1) + "\n")
    speed = {}
    if c.speed is not None:
        s = c.speed
        speed = measure_speed(
            model,
            prompt=s.prompt_tokens,
            decode=s.decode_tokens,
            repeats=s.repeats,
            vocab=model.config.vocab_size,
        )
    layers = model.config.num_hidden_layers
    card = Card(name, str(path), layers, 0, whole, non_emb, linear, speed=speed, **measured)
    log(f"[{name}] ppl {card.ppl}, params {whole:,}, speed {speed}")
    model = None
    gc.collect()
    return card


def _recovery(vdir: Path) -> tuple[int, str]:
    path = vdir / "recovery.json"
    if not path.is_file():
        return 0, "-"
    d = json.loads(path.read_text())
    lr = f", lr {d['lr']:g}" if d.get("lr") is not None else ""
    return int(d["tokens"]), f"{d['trainable']}{lr}"


def run(recipe: CompareRecipe, *, log: Callable = print) -> list[Card]:
    """The compare command: build, recover and judge every method, then write the table and the figure.

    Raises:
        PruneError: a refused rerun, or a recipe value that does not fit the model or the data.
    """
    t0 = time.perf_counter()
    c, out = recipe.compare, Path(recipe.output_dir)
    config = source_config(recipe)  # type: ignore[arg-type]
    pr = family_recipe(recipe)
    n = blocks_to_remove(pr, config)
    check_architecture(pr, config, "compare")
    for m in c.methods:
        if m in NORM_METHODS:
            check_architecture(family_recipe(recipe, m), config, "compare")
    for check in command_hooks(recipe, "check"):
        check(recipe, n, config)
    _check_settings(out, settings(recipe, n))
    recipe.save(out / "compare_recipe.yaml")
    runs: list[tuple[PruneRecipe, str | None]] = [(pr, None)] if any(m in VARIANTS for m in c.methods) else []
    runs += [(family_recipe(recipe, m), m) for m in c.methods if m in NORM_METHODS]
    for family, option in runs:
        prune_run(family, prune_only=True, log=log)
        if c.recovery == "equal":
            train_family(recipe, family, option, log)
    build_baselines(recipe, pr, n, log)
    build_command_methods(recipe, n, config, log)
    if c.recovery == "equal":
        train_baselines(recipe, log)
    tokenizer = load_command_tokenizer(recipe.model, PruneError)
    texts = Texts(recipe, tokenizer)
    source = judge(recipe, "source", Path(recipe.model.source), None, texts, tokenizer, log)
    cards = []
    for name, path, start in model_paths(recipe):
        card = judge(recipe, name, path, start, texts, tokenizer, log)
        vdir = method_dir(recipe, name)
        card.recovery_tokens, card.recovery_trainable = _recovery(vdir)
        card.layers_removed = n
        if (vdir / "method.json").is_file():
            card.notes = json.loads((vdir / "method.json").read_text())
            card.method_tokens = _method_tokens(name, card.notes["notes"])
            if name in COMMAND_METHODS:  # what another command removed, e.g. no layer at all
                card.layers_removed = len(card.notes["removed"])
        cards.append(card)
    header = _header(recipe, n, config.num_hidden_layers, texts, cards, time.perf_counter() - t0)
    md, js, png = write_card(cards, source, out, header)
    log(f"comparison -> {md}, {js}, {png}")
    log(md.read_text())
    return cards


def _method_tokens(name: str, notes: dict[str, Any]) -> int:
    """Tokens a method trained on by itself, before recovery (LLM-Streamline's replacement block)."""
    return int(notes.get("trained_tokens", 0)) if name == "streamline" else 0


def source_revision(source: str) -> str:
    """Which weights the source is: a local directory by the SHA-256 of its weight files, a hub id by
    the commit of its cached snapshot (the number tables elsewhere rarely pin, and results depend on)."""
    path = Path(source)
    if path.is_dir():
        from flexigpt.shared.engine.checkpoint import weight_files

        digest = hashlib.sha256()
        for f in weight_files(path):
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(chunk)
        return f"local directory, weights sha256 {digest.hexdigest()[:16]}"
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(source, allow_patterns=["config.json"], local_files_only=True))
        return f"hub commit {snap.name}"
    except Exception:  # noqa: BLE001 (not cached: the id is all there is)
        return "hub id, revision not cached"


def _header(
    recipe: CompareRecipe, n: int, layers: int, texts: Texts, cards: list[Card], seconds: float
) -> list[str]:
    import transformers

    try:
        import lm_eval

        lm_eval_version = lm_eval.__version__
    except ImportError:  # lm-eval is an optional dependency
        lm_eval_version = "not installed"
    c, t = recipe.compare, recipe.train
    seqs = t.global_batch or t.micro_batch * (t.grad_accum or 1)
    budget = (
        f"{t.max_steps} steps x {seqs} sequences x {recipe.data.seq_len} tokens per rank"
        if t.max_steps
        else f"{t.token_budget} tokens"
    )
    tokens = {card.recovery_tokens for card in cards}
    equal = "equal for every method" if len(tokens) == 1 else "NOT equal: see the recovery column"
    lines = [
        "# Depth-pruning methods side by side",
        "",
        f"- source: `{recipe.model.source}` ({layers} layers; {source_revision(recipe.model.source)}); every "
        f"method removes {n} ({c.ratio:.0%}, rule {c.ratio_rule})"
        + (", except where a line below says otherwise" if any(m.layers_removed != n for m in cards) else ""),
        f"- calibration: {c.calibration.num_samples} samples of <= {c.calibration.seq_len} tokens "
        f"({'packed' if c.calibration.pack else 'one document each'}), one text for every method",
        f"- text rule: {texts.rule.summary()}",
        *[f"- perplexity `{k}`: {v}" for k, v in texts.described.items()],
        f"- recovery: {c.recovery} ({budget}, lr {_lr_text(recipe)}); recovery tokens {equal}"
        if c.recovery == "equal"
        else "- recovery: none (no model is trained after it is built; a method's own training is in the tokens column)",
        f"- zero-shot: {', '.join(c.zeroshot.tasks) if c.zeroshot else 'none'}; paper average = acc_norm where a task "
        f"has it, else acc; lm-eval {lm_eval_version}",
        f"- software: torch {torch.__version__}, transformers {transformers.__version__}; machine: "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"),
        f"- memory column: peak accelerator memory of the timed runs; on a CPU the weights' MiB. Wall time of "
        f"this command: {seconds:.0f} s",
        *[line for lines in command_hooks(recipe, "header_lines") for line in lines(recipe)],
    ]
    return lines


def _lr_text(recipe: CompareRecipe) -> str:
    base = (
        "the trainer's default for each trainable set"
        if recipe.train.lr_is_default
        else f"{recipe.train.lr:g}"
    )
    if not recipe.compare.lr:
        return base
    own = ", ".join(f"{m} {lr:g}" for m, lr in recipe.compare.lr.items())
    return f"{base}; compare.lr: {own}; each method's lr is in the trained column"
