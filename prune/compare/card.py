"""The report card of one model: perplexity, zero-shot, size three ways, speed and memory; and the table.

Sizes, each stored tensor counted once (a shared block is stored once, however many slots run it):

- whole model: every parameter;
- non-embedding: without the input embedding and the output head (one matrix when they are tied);
- decoder-linear: the 2-D weights of the decoder stack (attention and MLP projections, adapters
  included): the quantity LLM Surgeon's ratios refer to.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexigpt.shared.engine.layout import get_layout


@dataclass
class Card:
    """Everything the comparison table says about one model."""

    name: str
    path: str
    layers: int
    layers_removed: int
    params: int
    params_non_embedding: int
    params_decoder_linear: int
    recovery_tokens: int = 0
    recovery_trainable: str = "-"
    method_tokens: int = 0
    """Tokens a method trained on by itself before recovery (LLM-Streamline's replacement block)."""
    ppl: dict[str, float] = field(default_factory=dict)
    ppl_start: dict[str, float] = field(default_factory=dict)
    zeroshot: dict[str, dict[str, float]] = field(default_factory=dict)
    """task -> {acc, acc_norm (where the task has it), paper (acc_norm where it exists, else acc)}."""
    zeroshot_avg: float | None = None
    speed: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


def param_counts(model: nn.Module) -> tuple[int, int, int]:
    """(whole model, non-embedding, decoder-linear) parameters, each stored tensor once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    whole = sum(p.numel() for p in seen.values())
    emb = {
        id(p): p
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        for p in m.parameters()
    }
    non_emb = whole - sum(p.numel() for p in emb.values())
    stack = model.get_submodule(get_layout(model.config).layers_path)
    linear = {id(p): p for p in stack.parameters() if p.dim() == 2}
    return whole, non_emb, sum(p.numel() for p in linear.values())


def zeroshot_scores(result: Any) -> tuple[dict[str, dict[str, float]], float]:
    """Both acc and acc_norm of every task of a ``ZeroShotResult`` and the paper average
    (acc_norm where the task has it, else acc; unweighted mean)."""
    rows: dict[str, dict[str, float]] = {}
    for task in result.scores:
        metrics = result.extra["metrics"][task]
        row = {k: float(metrics[f"{k},none"]) for k in ("acc", "acc_norm") if f"{k},none" in metrics}
        row["paper"] = row.get("acc_norm", row.get("acc", float(result.scores[task].value)))
        rows[task] = row
    return rows, sum(r["paper"] for r in rows.values()) / max(len(rows), 1)


@torch.no_grad()
def measure_speed(
    model: nn.Module, *, prompt: int, decode: int, repeats: int, vocab: int
) -> dict[str, float]:
    """Prefill and decode time per token (ms, median of `repeats` after a warm-up) and memory (MiB).

    Decode runs one token at a time with the model's KV cache. Peak memory is the accelerator's
    peak allocation during the timed runs; on a CPU only the bytes of the weights are reported.
    """
    device = next(model.parameters()).device
    ids = torch.randint(4, vocab, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def once() -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        sync()
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(decode):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        t2 = time.perf_counter()
        return (t1 - t0) / prompt * 1e3, (t2 - t1) / decode * 1e3

    once()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    runs = [once() for _ in range(repeats)]
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    speed = {
        "prefill_ms_per_token": statistics.median(r[0] for r in runs),
        "decode_ms_per_token": statistics.median(r[1] for r in runs),
        "weights_mib": weights / 2**20,
    }
    if cuda:
        speed["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return speed


# ------------------------------------------------------------------------------------------ table
def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(cards: list[Card], source: Card) -> str:
    """The comparison table: one row per model, the source first; relative columns against the source."""
    texts = list(source.ppl)
    tasks = list(source.zeroshot)
    head = ["model", "layers (removed)", "params", "non-emb", "dec-linear", "stored vs source"]
    head += [f"ppl {t}" for t in texts] + [f"ppl {t} (start)" for t in texts]
    head += [f"{t} acc / acc_norm" for t in tasks] + (["avg (paper)"] if tasks else [])
    head += ["prefill ms/tok", "decode ms/tok", "speed vs source", "memory MiB", "recovery tokens", "trained"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in [source, *cards]:
        row = [
            c.name,
            f"{c.layers} ({c.layers_removed})",
            f"{c.params:,}",
            f"{c.params_non_embedding:,}",
            f"{c.params_decoder_linear:,}",
            f"{c.params / source.params:.1%}",
        ]
        row += [_fmt(c.ppl.get(t)) for t in texts] + [_fmt(c.ppl_start.get(t)) for t in texts]
        for t in tasks:
            z = c.zeroshot.get(t, {})
            row.append(f"{_fmt(z.get('acc'), '.3f')} / {_fmt(z.get('acc_norm'), '.3f')}")
        if tasks:
            row.append(_fmt(c.zeroshot_avg, ".3f"))
        dec, src_dec = c.speed.get("decode_ms_per_token"), source.speed.get("decode_ms_per_token")
        row += [
            _fmt(c.speed.get("prefill_ms_per_token"), ".3f"),
            _fmt(dec, ".3f"),
            "-" if dec is None or not src_dec else f"{src_dec / dec:.2f}x",
            _fmt(c.speed.get("peak_mib", c.speed.get("weights_mib")), ".1f"),
            f"{c.recovery_tokens:,}" + (f" (+{c.method_tokens:,} method)" if c.method_tokens else ""),
            c.recovery_trainable,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_card(cards: list[Card], source: Card, path: Path) -> Path:
    """Perplexity (first text) and zero-shot average against stored parameters, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = next(iter(source.ppl), None)
    when = ", after recovery" if any(c.recovery_tokens for c in cards) else ""
    panels = [
        ("perplexity" + (f" ({text}{when})" if text else ""), lambda c: c.ppl.get(text) if text else None)
    ]
    if source.zeroshot:
        panels.append(("zero-shot average (paper metric)", lambda c: c.zeroshot_avg))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 4.5), squeeze=False)
    models = [source, *cards]
    # Several methods store the same number of parameters: their points are spread sideways (by at
    # most a few percent of the axis; the x label says so), so none hides another, and colour and
    # marker both cycle (10 colours, or 20 beyond 10 models; 7 markers), so no two points look alike.
    span = (max(c.params for c in models) - min(c.params for c in models)) or max(source.params, 1)
    same: dict[int, list[int]] = {}
    for i, c in enumerate(models):
        same.setdefault(c.params, []).append(i)
    x: dict[int, float] = {}
    for group in same.values():
        for k, i in enumerate(group):
            x[i] = models[i].params + span * 0.018 * (k - (len(group) - 1) / 2)
    from matplotlib.ticker import FuncFormatter

    colours = plt.get_cmap("tab20").colors if len(models) > 10 else [f"C{k}" for k in range(10)]
    millions = FuncFormatter(lambda v, _: f"{v / 1e6:g}M")  # no "1e6" offset for a reader to miss
    for ax, (label, value) in zip(axes[0], panels, strict=True):
        for i, c in enumerate(models):
            y = value(c)
            if y is None:
                continue
            marker = "*" if c is source else "osD^vPX"[(i - 1) % 7]
            colour = colours[i % len(colours)]
            ax.scatter(x[i], y, s=90 if c is source else 50, marker=marker, color=colour, label=c.name)
        ax.xaxis.set_major_formatter(millions)
        ax.set_xlabel("stored parameters (models of one size spread sideways)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: it hides no point
    ys = [y for c in [source, *cards] if text and (y := c.ppl.get(text)) is not None]
    if ys and max(ys) / min(ys) > 4:  # a log axis only where the values span a wide range
        ax = axes[0][0]
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # plain numbers on the minor ticks too
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    fig.suptitle("methods at one ratio and one recovery budget")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_card(cards: list[Card], source: Card, out: Path, header: list[str]) -> tuple[Path, Path, Path]:
    """Write ``comparison.md``, ``comparison.json`` and ``comparison.png`` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    png = plot_card(cards, source, out / "comparison.png")
    md = out / "comparison.md"
    md.write_text(
        "\n".join([*header, "", markdown_table(cards, source), "", f"![comparison]({png.name})", ""])
    )
    js = out / "comparison.json"
    js.write_text(
        json.dumps(
            {"header": header, "source": asdict(source), "methods": [asdict(c) for c in cards]}, indent=1
        )
        + "\n"
    )
    return md, js, png
