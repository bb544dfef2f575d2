"""The quickstart's steps: what each one builds, the recipes it hands to the real commands, and how it runs them.

Each step function takes the ``Context`` and returns a small dict for its completion record
(``steps/<name>.json``). A step must be safe to run again after being killed at any point: the
data builders rename a finished temporary directory into place, and the train / grow / prune
commands resume from their own checkpoints. Recipes are validated with the same schema the
commands use before they are written to ``recipes/``, so a bad value fails here, naming the key.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .corpus import build_corpus, continuation_docs, read_documents, train_tokenizer
from .quickstart_scale import SCALES, Context, QuickstartError, QuickstartInterrupted, Scale

__all__ = ["SCALES", "STEPS", "Context", "QuickstartError", "QuickstartInterrupted", "Scale", "Step"]

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK = "docstring_continuation"
PRUNE_VARIANTS = ("flexigpt", "shortgpt", "shortgpt_lora")
TRAINED_PRUNE_VARIANTS = ("flexigpt", "shortgpt_lora")  # prune.shortgpt_recovery: none, as the paper


@dataclass(frozen=True)
class Step:
    """One quickstart step: its record name, the line shown while it runs, and what it does."""

    name: str
    title: str
    fn: Callable[[Context], dict[str, Any]]


# ------------------------------------------------------------------------------- data steps
def step_corpus(ctx: Context) -> dict[str, Any]:
    """Build the stdlib corpus (unless a finished one is there)."""
    s = ctx.scale
    if not (ctx.corpus / "manifest.json").is_file():
        build_corpus(ctx.corpus, max_train_files=s.max_train_files, max_heldout_files=s.max_heldout_files)
    m = json.loads((ctx.corpus / "manifest.json").read_text())
    tr, ho = m["train"], m["heldout"]
    print(
        f"    Python {m['python']} standard library: {tr['source_files']} training files ({tr['bytes'] / 1e6:.2f} MB), "
        f"{ho['source_files']} held-out files ({ho['bytes'] / 1e6:.2f} MB)",
        flush=True,
    )
    return {"python": m["python"], "train": tr, "heldout": ho}


def step_tokenizer(ctx: Context) -> dict[str, Any]:
    """Train the sentencepiece tokenizer and count the corpus in tokens."""
    if not (ctx.tokenizer / "tokenizer.model").is_file():
        train_tokenizer(ctx.corpus, ctx.tokenizer, vocab_size=ctx.scale.vocab)
    counts = token_counts(ctx)
    print(
        f"    vocabulary {ctx.scale.vocab}; {counts['train']:,} training tokens, {counts['heldout']:,} held-out "
        "tokens; transformers and sentencepiece ids agree",
        flush=True,
    )
    return {"vocab": ctx.scale.vocab, "tokens": counts}


def token_counts(ctx: Context) -> dict[str, int]:
    """Tokens in each split of the corpus (read back from the tokenizer step's record when there is one)."""
    record = ctx.out / "steps" / "tokenizer.json"
    if record.is_file():
        return json.loads(record.read_text())["tokens"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ctx.tokenizer))
    return {
        split: sum(len(ids) for ids in tok(list(read_documents(ctx.corpus / split)))["input_ids"])
        for split in ("train", "heldout")
    }


# ------------------------------------------------------------------------------ model steps
def step_base(ctx: Context) -> dict[str, Any]:
    """A small Llama trained from scratch by the train command."""
    s, run = ctx.scale, ctx.run_dir("base")
    init = run / "initial"
    if not (init / "config.json").is_file():
        n = save_initial_model(ctx, init)
        print(
            f"    random {s.layers}-layer Llama, hidden {s.hidden}, tied embeddings: {n:,} parameters",
            flush=True,
        )
    raw = _train_recipe_base(ctx, "train", run, steps=s.base_steps, lr=s.base_lr)
    raw["model"] = {"source": str(init), "tokenizer": str(ctx.tokenizer), "attn_implementation": "sdpa"}
    raw["train"].update(trainable="all", export="compact+materialized")
    run_command(ctx, "base", "flexigpt.shared.train", write_recipe(ctx, "base", raw))
    return {"model": str(_need(run / "final_materialized")), "tokens": _tokens(ctx, s.base_steps)}


def save_initial_model(ctx: Context, out: Path) -> int:
    """A seeded random Llama of the scale's shape, saved (with the tokenizer) by renaming a finished dir.

    Returns:
        Its parameter count.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    s = ctx.scale
    tok = AutoTokenizer.from_pretrained(str(ctx.tokenizer))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=2 * s.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)
    return sum(p.numel() for p in model.parameters())


def step_grow(ctx: Context) -> dict[str, Any]:
    """The grow command: Block pattern, the span's blocks repeated once as shared slots, brief training."""
    s, run = ctx.scale, ctx.run_dir("grow")
    start, end = s.grow_span
    raw = _train_recipe_base(ctx, "grow", run, steps=s.grow_steps, lr=4e-3)
    raw["model"] = _trained_base(ctx)
    raw["grow"] = {
        "strategy": "block",
        "start": start,
        "end": end,
        "repeat": 1,
        "target_layers": s.layers + end - start + 1,
        "adapter": {"rank": s.adapter_rank, "init": "lora"},
        "out_norm": {"gamma": 0.01},
        "own_norms": True,
    }
    raw["train"].update(trainable="adapters+norms", export="compact")
    run_command(ctx, "grow", "flexigpt.grow", write_recipe(ctx, "grow", raw))
    return {"model": str(_need(run / "final")), "tokens": _tokens(ctx, s.grow_steps)}


def step_prune(ctx: Context) -> dict[str, Any]:
    """The prune command: FlexiGPT, ShortGPT and ShortGPT+LoRA from one importance pass, brief recovery."""
    s, run = ctx.scale, ctx.run_dir("prune")
    raw = _train_recipe_base(ctx, "prune", run, steps=s.prune_steps, lr=4e-3)
    raw["model"] = _trained_base(ctx)
    raw["prune"] = {
        "variants": list(PRUNE_VARIANTS),
        "ratio": s.prune_ratio,
        "metric": "block_influence",
        # calibration on the training stream: the held-out split stays for evaluation only
        "calibration": {
            "num_samples": s.calibration_samples,
            "seq_len": s.seq_len,
            "pack": True,
        },
        # r = the adapter rank, as in the paper (both 256 there); every pair for a full heatmap
        "selection": {"rank": s.adapter_rank, "all_pairs": True},
        "replace": {"rank": s.adapter_rank, "gamma": 0.01},
        "shortgpt_recovery": "none",
        "device": "cpu",
    }
    raw["train"].update(trainable="adapters+norms", export="compact")
    run_command(ctx, "prune", "flexigpt.prune", write_recipe(ctx, "prune", raw))
    out = prune_outputs(ctx)
    summary = json.loads((run / "summary.json").read_text())
    return {
        "models": {k: str(_need(v)) for k, v in out["models"].items()},
        "removed": summary["removed"],
        "picks": summary["picks"],
        "tokens": _tokens(ctx, s.prune_steps),
    }


# ------------------------------------------------------------------------------------- eval
def step_eval(ctx: Context) -> dict[str, Any]:
    """Perplexity and the toy zero-shot task for every variant, then the report with its plots."""
    from flexigpt.shared.evaluate.cli import EvalConfig, run_eval

    s = ctx.scale
    tasks = ctx.out / "tasks"
    if not (tasks / f"{TASK}.yaml").is_file():
        write_task(ctx, tasks)
    models = variant_paths(ctx)
    cfg = EvalConfig.model_validate(
        {
            "models": {k: str(v) for k, v in models.items()},
            "tokenizer": str(ctx.tokenizer),
            "output_dir": str(ctx.out / "report"),
            "device": "cpu",
            "perplexity": {
                "files": [str(ctx.corpus / "heldout" / "*.jsonl")],
                "max_tokens": s.ppl_tokens,
                "context_len": s.seq_len,
                "stride": s.seq_len // 2,
                "batch_size": 8,
            },
            "zeroshot": {
                "tasks": [f"{TASK}:acc_norm"],
                "include_path": [str(tasks)],
                "include_defaults": False,
                "batch_size": 32,
            },
            "report": {
                **report_inputs(ctx),
                "tensorboard": {k: str(v) for k, v in training_runs(ctx).items()},
                "notes": report_notes(ctx),
            },
        }
    )
    run_eval(cfg)
    return {"report": str(ctx.out / "report" / "report.md")}


def write_task(ctx: Context, tasks: Path) -> None:
    """The toy multiple-choice task from held-out sentences, written as a local lm-eval task."""
    from flexigpt.shared.evaluate.zeroshot import write_choice_task

    docs = continuation_docs(list(read_documents(ctx.corpus / "heldout")), ctx.scale.task_docs)
    tmp = tasks.with_name(f".{tasks.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_choice_task(tmp, TASK, docs)
    # the YAML names its data file by absolute path: point it at the final location
    yaml_path = tmp / f"{TASK}.yaml"
    yaml_path.write_text(yaml_path.read_text().replace(str(tmp.resolve()), str(tasks.resolve())))
    tmp.rename(tasks)


def variant_paths(ctx: Context) -> dict[str, Path]:
    """Model directory of every variant, in report order."""
    paths = {"base": ctx.run_dir("base") / "final_materialized", "grown": ctx.run_dir("grow") / "final"}
    paths.update(prune_outputs(ctx)["models"])
    return {k: _need(v) for k, v in paths.items()}


def training_runs(ctx: Context) -> dict[str, Path]:
    """Variant -> the directory of its training run (which holds ``tb/``, the TensorBoard logs)."""
    runs = {"base": ctx.run_dir("base"), "grown": ctx.run_dir("grow")}
    runs.update(prune_outputs(ctx)["trained"])
    return runs


def prune_outputs(ctx: Context) -> dict[str, Any]:
    """Models, trained runs and report inputs (importance, selection JSON) of the prune step.

    A variant with a recovery run is its ``final/`` export; ShortGPT, not trained after pruning, is
    its ``initial/`` model (compact, so the report's slot map shows which blocks it lost).
    """
    run = ctx.run_dir("prune")
    models, trained = {}, {}
    for name in PRUNE_VARIANTS:
        if name in TRAINED_PRUNE_VARIANTS:
            models[name], trained[name] = run / name / "final", run / name
        else:
            models[name] = run / name / "initial"
    return {
        "models": models,
        "trained": trained,
        "importance": run / "importance.json",
        "selection": run / "selection.json",
    }


def report_inputs(ctx: Context) -> dict[str, Any]:
    """The prune command's importance and selection files, for the Block Influence and heatmap plots."""
    out = prune_outputs(ctx)
    return {k: str(out[k]) for k in ("importance", "selection")}


def report_notes(ctx: Context) -> list[str]:
    """Lines under the report's table: the corpus, the training budgets, and what the toy task is."""
    s = ctx.scale
    m = json.loads((ctx.corpus / "manifest.json").read_text())
    tok = token_counts(ctx)
    per_step = s.micro_batch * s.seq_len
    return [
        f"corpus: docstrings and comments of the Python {m['python']} standard library ({m['train']['source_files']} "
        f"training files, {tok['train']:,} tokens; {m['heldout']['source_files']} held-out files, {tok['heldout']:,} "
        "tokens); it differs slightly between Python versions",
        f"training ({per_step} tokens per step): base {s.base_steps} steps from scratch (all parameters); grown "
        f"+{s.grow_steps} steps (adapters and norms of the new slots); FlexiGPT and ShortGPT+LoRA +{s.prune_steps} "
        f"steps of recovery each (adapters and norms); ShortGPT not trained after pruning",
        f"{TASK} is a toy task made by the quickstart from held-out docstrings: the second half of a sentence in "
        f"its true word order among 3 scrambles of the same words (chance 25%), {s.task_docs} questions. It checks "
        "the zero-shot path offline; it is not a benchmark",
        f"perplexity: held-out split, first {s.ppl_tokens:,} tokens, windows of {s.seq_len} with stride "
        f"{s.seq_len // 2}; the training runs' evaluations and the prune step's start perplexities score "
        "fewer held-out tokens in disjoint windows, so their figures for the same model differ from these "
        "(each printed perplexity names its text, tokens, context, stride and text rule)",
    ]


# -------------------------------------------------------------------------------- plumbing
def _trained_base(ctx: Context) -> dict[str, Any]:
    """The model section of the grow and prune runs: the trained base model, exported plain."""
    return {
        "source": str(ctx.run_dir("base") / "final_materialized"),
        "tokenizer": str(ctx.tokenizer),
        "attn_implementation": "sdpa",
    }


def _train_recipe_base(ctx: Context, kind: str, run: Path, *, steps: int, lr: float) -> dict[str, Any]:
    """The sections every quickstart training run shares: the corpus stream and a short schedule."""
    s = ctx.scale
    ds = REPO_ROOT / "ds_configs" / "zero1.json"
    return {
        "kind": kind,
        "data": {
            "source": "files",
            "files": [str(ctx.corpus / "train" / "*.jsonl")],
            "seq_len": s.seq_len,
            "shuffle_buffer": 64,
            "tokenize_batch": 8,
            "seed": 0,
            "eval": {"source": "files", "files": [str(ctx.corpus / "heldout" / "*.jsonl")], "batches": 4},
        },
        "train": {
            # ZeRO-1 is the cheapest stage on one CPU rank (environment notes)
            "ds_config": str(ds) if ds.is_file() else "ds_configs/zero1.json",
            "micro_batch": s.micro_batch,
            "grad_accum": 1,
            "lr": lr,
            "warmup_steps": max(1, steps // 10),
            "max_steps": steps,
            "log_every": max(1, steps // 30),
            "eval_every": max(1, steps // 4),
            "checkpoint_every": max(1, steps // 3),
            "keep_last": 1,
        },
        "output_dir": str(run),
    }


def write_recipe(ctx: Context, name: str, raw: dict[str, Any]) -> Path:
    """Validate `raw` with the commands' own schema and write the resolved recipe to ``recipes/<name>.yaml``.

    Raises:
        QuickstartError: the recipe is invalid (the message names the key).
    """
    from flexigpt.shared.recipe import RecipeError, recipe_from_dict

    if raw["kind"] == "grow":
        import flexigpt.grow.recipe  # noqa: F401  (registers kind "grow")
    elif raw["kind"] == "prune":
        import flexigpt.prune.depth.recipe  # noqa: F401  (registers kind "prune")
    try:
        recipe = recipe_from_dict(raw, where=f"quickstart {name} recipe")
    except RecipeError as e:
        raise QuickstartError(str(e)) from e
    path = ctx.out / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe.save(path)
    return path


def run_command(ctx: Context, name: str, module: str, recipe: Path) -> None:
    """Run ``python -m MODULE RECIPE`` as a child process; its output goes to ``logs/<name>.log`` (and stdout).

    Raises:
        QuickstartError: the command exited with a non-zero status (the log's tail is in the message).
    """
    log = ctx.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", module, str(recipe)]
    print(f"    $ {' '.join(cmd[1:])}   (log: {log})", flush=True)
    signals: list[int] = []
    with log.open("ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
        assert proc.stdout is not None

        def forward(signum: int, _frame: Any) -> None:
            # The commands checkpoint on SIGINT / SIGTERM and exit; a SIGTERM sent to this process
            # alone would otherwise orphan the child. Keep reading until it is done.
            signals.append(signum)
            if proc.poll() is None:
                proc.send_signal(signum)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while chunk := proc.stdout.read1(1 << 16):
                fh.write(chunk)
                if ctx.echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
            rc = proc.wait()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    if signals:
        raise QuickstartInterrupted(
            f"step {name} stopped by signal {signals[0]} (exit status {rc}); run the same command again to resume",
            signals[0],
        )
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise QuickstartError(
            f"step {name}: `{' '.join(cmd[1:])}` exited with status {rc}; full log: {log}\n" + "\n".join(tail)
        )


def _need(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise QuickstartError(
            f"{path} holds no model (config.json missing); the step that writes it did not finish"
        )
    return path


def _tokens(ctx: Context, steps: int) -> int:
    return steps * ctx.scale.micro_batch * ctx.scale.seq_len


STEPS = [
    Step("corpus", "corpus: docstrings and comments of the standard library", step_corpus),
    Step("tokenizer", "tokenizer: sentencepiece BPE", step_tokenizer),
    Step("base", "base model: a small Llama trained from scratch (flexigpt.shared.train)", step_base),
    Step("grow", "grow: Block pattern with shared slots, brief training (flexigpt.grow)", step_grow),
    Step("prune", "prune: FlexiGPT, ShortGPT, ShortGPT+LoRA with recovery (flexigpt.prune)", step_prune),
    Step("eval", "evaluate every variant and write the report (flexigpt-eval)", step_eval),
]
