"""``flexigpt-eval``: evaluate named models (perplexity, zero-shot) and write the report.

    flexigpt-eval [RECIPE.yaml] [key.path=value ...]
    flexigpt-eval --help-recipe

Every knob is a field of ``EvalConfig`` (``--help-recipe`` lists them with their defaults; the
older spelling ``--help-config`` still works); a YAML
file and ``key=value`` overrides are merged before validation, so both go through the same
checks. For example::

    flexigpt-eval models.base=runs/base/final models.flexigpt=runs/prune/final \\
        tokenizer=tok.model output_dir=runs/eval perplexity.files='[data/test.txt]' \\
        perplexity.context_len=512 zeroshot.limit=200 report.tensorboard.flexigpt=runs/prune

Models are compact directories, plain HF directories or hub ids. Each variant's result is kept
in ``output_dir/variants/<name>.json`` with a fingerprint of its inputs; a second run with the
same inputs reuses it (``reuse=false`` recomputes). The quickstart calls ``run_eval`` directly.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from flexigpt.shared.evaluate.zeroshot import PAPER_TASKS
from flexigpt.shared.recipe import (
    Section,
    StreamSection,
    TextSection,
    describe_recipe,
    format_validation_error,
)

if TYPE_CHECKING:
    import torch


class PerplexitySection(Section):
    """Perplexity on local files or a held-out stream (set exactly one)."""

    files: list[str] = Field(
        default_factory=list, description="Glob patterns of local files; a .txt file is one document."
    )
    stream: StreamSection | None = Field(None, description="A document stream (e.g. a hub validation split).")
    max_tokens: int | None = Field(
        None, ge=2, description="Score at most this many tokens; null: the whole text."
    )
    context_len: int | None = Field(
        None, ge=2, description="Window length; null: the model's limit capped at 2048."
    )
    stride: int | None = Field(
        None, ge=1, description="Distance between window starts; null: context_len // 2."
    )
    batch_size: int = Field(4, ge=1, description="Windows per forward pass.")
    join: str | None = Field(
        None,
        description="Join every document into one text with this string before tokenizing (the text rule's "
        "EOS between documents then does not apply): '\\n\\n' over the rows of the hub's wikitext-2-raw-v1 "
        "test split is the WikiText-2 text of the SparseGPT / SliceGPT / LLM Surgeon code; null: the documents "
        "are joined by the text rule.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> PerplexitySection:
        if bool(self.files) == (self.stream is not None):
            raise ValueError("perplexity: set exactly one of files / stream (or perplexity: null to skip)")
        return self


class ZeroShotSection(Section):
    """lm-eval zero-shot tasks."""

    tasks: list[str] = Field(
        default_factory=lambda: list(PAPER_TASKS),
        description="Tasks as 'task' or 'task:metric'; the paper's five use acc_norm (WinoGrande: acc).",
    )
    include_path: list[str] = Field(default_factory=list, description="Directories of local task YAMLs.")
    include_defaults: bool = Field(
        True, description="Also index lm-eval's built-in tasks (needed for the paper's)."
    )
    local_data: dict[str, str] = Field(
        default_factory=dict,
        description="Offline copies of the paper's tasks: task -> a .jsonl/.json/.parquet file (.csv: piqa only) "
        "or a directory of <split>* files, holding the split lm-eval evaluates (arc_easy, arc_challenge: test; "
        "piqa, winogrande, hellaswag: validation) in the hub dataset's fields; lm-eval's own prompts and "
        "metrics are used, only the data is local. Each task must be in tasks. See docs/evaluation.md.",
    )
    limit: int | None = Field(None, ge=1, description="Documents per task (smoke runs); null: all.")
    batch_size: int = Field(8, ge=1, description="Requests per forward pass.")

    @field_validator("local_data")
    @classmethod
    def _local_data(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        from flexigpt.shared.evaluate.localdata import check_local_data

        check_local_data(v)
        tasks = [t.partition(":")[0] for t in info.data.get("tasks") or []]
        stray = [t for t in v if t not in tasks]
        if stray:
            raise ValueError(f"{stray} are not among tasks {tasks}; name only tasks that are evaluated")
        return v


class ReportSection(Section):
    """Extra inputs of the report."""

    importance: str | None = Field(
        None, description="Block Influence scores JSON written by the prune command."
    )
    selection: str | None = Field(
        None, description="Base-selection JSON (distance matrix, picks) of the prune command."
    )
    tensorboard: dict[str, str] = Field(
        default_factory=dict, description="Variant name -> TensorBoard log dir (or run dir)."
    )
    loss_tags: list[str] = Field(
        default_factory=lambda: ["train/loss", "eval/loss"], description="Scalar tags to plot."
    )
    notes: list[str] = Field(default_factory=list, description="Extra lines for report.md.")


class EvalConfig(Section):
    """What ``flexigpt-eval`` evaluates and where it writes the report."""

    models: dict[str, str] = Field(
        ..., description="Variant name -> compact dir, plain HF dir or hub id (table order)."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer dir, hub id or sentencepiece .model; null: each model's own."
    )
    output_dir: str = Field(..., description="Where report.json, report.md, the plots and variants/ go.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: fp32 on CPU, bf16/fp16 on GPU."
    )
    perplexity: PerplexitySection | None = Field(
        None, description="Perplexity settings; null: no perplexity."
    )
    text: TextSection = Field(
        default_factory=TextSection,
        description="BOS / EOS rule of the perplexity text; null values follow each model's tokenizer.",
    )
    zeroshot: ZeroShotSection | None = Field(
        default_factory=ZeroShotSection, description="Zero-shot; null: none."
    )
    report: ReportSection = Field(default_factory=ReportSection, description="Report inputs.")
    reuse: bool = Field(
        True, description="Reuse variants/<name>.json when the model and settings are unchanged."
    )

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if not self.models:
            raise ValueError("models: name at least one model (models.NAME=PATH)")
        unknown = sorted(set(self.report.tensorboard) - set(self.models))
        if unknown:
            raise ValueError(f"report.tensorboard: {unknown} are not variants; allowed: {list(self.models)}")
        return self


def load_config(path: str | Path | None, overrides: list[str]) -> EvalConfig:
    """A validated ``EvalConfig`` from an optional YAML file and ``key.path=value`` overrides.

    Raises:
        ValueError: unreadable file, malformed override, or invalid fields (named, with what is allowed).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep or not key or not all(key.split(".")):
            raise ValueError(f"override {text!r} is not of the form key.path=value")
        node = raw
        *parents, leaf = key.split(".")
        for k in parents:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[leaf] = yaml.safe_load(value) if value.strip() else ""
    try:
        return EvalConfig.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"invalid eval config\n{format_validation_error(e, EvalConfig)}") from None


def zeroshot_key(zc: ZeroShotSection | None) -> dict[str, Any] | None:
    """What zero-shot scores depend on: the settings and, with ``local_data``, each data file's
    path, size and mtime (without local data the key is the settings alone, as before it existed)."""
    from flexigpt.shared.evaluate.localdata import local_data_stamp

    if zc is None:
        return None
    key = zc.model_dump(mode="json", exclude={"local_data"})
    if zc.local_data:
        key["local_data"] = local_data_stamp(zc.local_data)
    return key


def _fingerprint(cfg: EvalConfig, path: str) -> str:
    """Hash of what a variant's numbers depend on: model files and local task data (size, mtime),
    tokenizer, settings."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    stats = [(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = {
        "model": str(p.resolve()) if p.is_dir() else path,
        "files": stats,
        "tokenizer": cfg.tokenizer,
        "dtype": cfg.dtype,
        "perplexity": cfg.perplexity.model_dump(mode="json") if cfg.perplexity else None,
        "text": cfg.text.model_dump(mode="json"),
        "zeroshot": zeroshot_key(cfg.zeroshot),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _device_dtype(cfg: EvalConfig) -> tuple[torch.device, torch.dtype]:
    import torch

    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    if cfg.dtype != "auto":
        return device, getattr(torch, cfg.dtype)
    if not cuda:
        return device, torch.float32  # CPUs here have no bf16 units (bf16 ran 31x slower)
    return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def evaluate_variant(name: str, model: Any, tokenizer: Any, cfg: EvalConfig, path: str | None = None):
    """Perplexity and zero-shot of one in-memory model, as a ``report.Variant``.

    Args:
        name: the variant's name in the report.
        model: a loaded model (plain, shared or materialised) on its device.
        tokenizer: its tokenizer.
        cfg: the settings (``perplexity`` / ``zeroshot`` sections; null sections are skipped).
        path: where the model came from (shown in the report).
    """
    from flexigpt.shared.evaluate.perplexity import (
        describe_section,
        encode_documents,
        perplexity,
        section_documents,
    )
    from flexigpt.shared.evaluate.report import Variant, describe_model
    from flexigpt.shared.evaluate.zeroshot import evaluate_zeroshot
    from flexigpt.shared.text import describe_text, resolve_text_rule

    stored, slots, n_src, plan = describe_model(model)
    variant = Variant(name, path, stored, slots, n_src, plan=plan)
    if cfg.perplexity is not None:
        pc = cfg.perplexity
        rule = resolve_text_rule(cfg.text, tokenizer)
        ids = encode_documents(
            section_documents(pc),
            tokenizer,
            max_tokens=pc.max_tokens,
            add_bos=rule.bos,
            eos_between_docs=rule.eos_between_docs,
        )
        source = describe_section(pc)
        variant.extra["perplexity_text"] = {
            "source": source,
            "max_tokens": pc.max_tokens,
            "rule": rule.to_dict(),
            "described": describe_text(source, rule, pc.max_tokens),
        }
        variant.perplexity = perplexity(
            model,
            ids,
            context_len=pc.context_len,
            stride=pc.stride,
            batch_size=pc.batch_size,
            desc=f"{name} ppl",
        )
        print(
            f"[{name}] {variant.perplexity.summary()} on {variant.extra['perplexity_text']['described']}",
            flush=True,
        )
    if cfg.zeroshot is not None:
        zc = cfg.zeroshot
        variant.zeroshot = evaluate_zeroshot(
            model,
            tokenizer,
            zc.tasks,
            batch_size=zc.batch_size,
            limit=zc.limit,
            include_path=zc.include_path or None,
            include_defaults=zc.include_defaults,
            local_data=zc.local_data,
        )
        print(f"[{name}] {variant.zeroshot.summary()}", flush=True)
    return variant


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every model of `cfg` (reusing unchanged results) and write the report.

    Returns:
        The report dict written to ``output_dir/report.json``.
    """
    from flexigpt.shared.engine.checkpoint import load_model
    from flexigpt.shared.evaluate.perplexity import load_tokenizer
    from flexigpt.shared.evaluate.report import Variant, write_report
    from flexigpt.shared.hub import hub_message

    out = Path(cfg.output_dir)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    (out / "eval_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    device, dtype = _device_dtype(cfg)
    variants = []
    for name, path in cfg.models.items():
        cache = out / "variants" / f"{name}.json"
        key = _fingerprint(cfg, path)
        if cfg.reuse and cache.is_file():
            saved = json.loads(cache.read_text())
            if saved.get("fingerprint") == key:
                print(f"[{name}] reusing {cache} (model and settings unchanged)", flush=True)
                variants.append(Variant.from_dict(saved["variant"]))
                continue
        t0 = time.time()
        try:
            tokenizer = load_tokenizer(cfg.tokenizer or path)
        except (OSError, ValueError) as e:
            where = "tokenizer" if cfg.tokenizer else f"models.{name}"
            raise ValueError(
                hub_message(where, cfg.tokenizer or path, e, "the tokenizer")
                or f"{where}: cannot load a tokenizer from {cfg.tokenizer or path} ({e}); set tokenizer="
            ) from e
        try:
            model = load_model(path, dtype=dtype)
        except OSError as e:
            raise ValueError(hub_message(f"models.{name}", path, e, "the model") or str(e)) from e
        model = model.to(device).eval()
        variant = evaluate_variant(name, model, tokenizer, cfg, path)
        variant.extra.update(
            {"seconds": round(time.time() - t0, 1), "device": str(device), "dtype": str(dtype)}
        )
        cache.write_text(json.dumps({"fingerprint": key, "variant": variant.to_dict()}, indent=1) + "\n")
        variants.append(variant)
        del model
        gc.collect()
    rc = cfg.report
    return write_report(
        variants,
        out,
        importance=rc.importance,
        selection=rc.selection,
        tensorboard=rc.tensorboard or None,
        loss_tags=rc.loss_tags,
        notes=rc.notes,
    )


def _parser() -> argparse.ArgumentParser:
    from flexigpt.shared.command import HELP_RECIPE, HelpFormatter

    p = argparse.ArgumentParser(
        prog="flexigpt-eval",
        description="Evaluate named models (perplexity, zero-shot tasks through lm-eval) and write the report "
        "(report.json, report.md, PNG plots). Models are compact directories, plain HF directories or hub ids; "
        "an unchanged model's saved result is reused. See docs/evaluation.md.",
        formatter_class=HelpFormatter,
        epilog="Every knob is a recipe field: 'flexigpt-eval --help-recipe' lists them; override any of them "
        "as key.path=value. Example: flexigpt-eval models.base=runs/base/final models.pruned=runs/prune/final "
        "output_dir=runs/eval perplexity.files='[data/test.txt]' zeroshot.limit=200",
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="[RECIPE.yaml] key.path=value",
        help="an optional YAML recipe, then key.path=value overrides, validated like the file",
    )
    p.add_argument("--help-recipe", action="store_true", help=HELP_RECIPE)
    p.add_argument("--help-config", action="store_true", help=argparse.SUPPRESS)  # the older spelling
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``flexigpt-eval``; returns the exit status (2: bad recipe or inputs)."""
    from flexigpt.shared.command import wants_recipe_help
    from flexigpt.shared.threads import configure_cpu_threads

    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_recipe_help(argv) or "--help-config" in argv:
        print(describe_recipe(EvalConfig))
        return 0
    inputs = _parser().parse_intermixed_args(argv).inputs
    path = inputs.pop(0) if inputs and "=" not in inputs[0] else None
    try:
        cfg = load_config(path, inputs)
    except (OSError, ValueError) as e:
        print(f"flexigpt-eval: {e}", file=sys.stderr)
        return 2
    print(
        f"# resolved eval config\n{yaml.safe_dump(cfg.model_dump(mode='json'), sort_keys=False)}", flush=True
    )
    configure_cpu_threads()
    try:
        report = run_eval(cfg)
    except (OSError, ValueError) as e:  # bad paths, tasks, tags, report inputs: named in the message
        print(f"flexigpt-eval: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.output_dir)
    print((out / "report.md").read_text())
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {len(report['plots'])} plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
