"""LLM Surgeon vs K-OBD vs magnitude on a small trained model, and what shrinking buys.

A tiny LLaMA (character level: bytes < 128 are the tokens) is trained briefly from scratch on the
docstrings and comments of the Python standard library (the quickstart's corpus source: local, no
download), then pruned in rows and columns by each method over a linear schedule to 30% of the
decoder-linear weights (5% per shot, curvature re-estimated each shot). Perplexity is measured on
held-out standard-library files at 20% and 30%, and for the Surgeon's 30% model the shrunk
(narrowed blocks) and the zero-masked (full-size) model are timed side by side.

With ``--lora`` the Surgeon runs twice on the same trained model instead, without and with the
first-order correction (LoRA trained after every shot and absorbed, a final pass after the last
shot; the released code's settings unless ``--lora-lr`` / ``--lora-samples`` say otherwise), and
the perplexity and wall time of both are printed. With ``--elements`` the Surgeon prunes single
weights instead (unstructured, same schedule) with the joint update of the removed weights
(groups of 2000 and of 16) and with the independent one (the ablation).

Run: ``python benchmarks/bench_surgeon.py`` (about three minutes on one busy core; ``--steps`` trains longer).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from flexigpt.corpus import extract_pieces, is_heldout, passages, source_files, stdlib_root
from flexigpt.prune.surgeon.correction import LoraOptions, correct
from flexigpt.prune.surgeon.shot import ShotOptions, prune_shot
from flexigpt.prune.surgeon.shrink import shrink_model
from flexigpt.shared.engine.apply import apply_plan, stored_param_count
from flexigpt.shared.engine.tiny import tiny_model
from flexigpt.shared.evaluate.perplexity import perplexity


def char_tokens(texts: list[str]) -> torch.Tensor:
    """Bytes below 128 of the texts, documents separated by a newline (0 is never produced)."""
    data = "\n".join(texts).encode("utf-8", "ignore")
    return torch.tensor([b for b in data if 0 < b < 128], dtype=torch.long)


def stdlib_text(max_files: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) character streams from the standard library's docstrings and comments."""
    root = stdlib_root()
    train, held = [], []
    for path in source_files(root)[: max_files * 3]:
        rel = str(path.relative_to(root))
        pieces = extract_pieces(path.read_text(errors="ignore"))
        (held if is_heldout(rel, 10) else train).extend(passages(pieces))
    return char_tokens(train), char_tokens(held)


def train_tiny(
    tokens: torch.Tensor, *, steps: int, seq_len: int = 64, batch: int = 16, seed: int = 0
) -> torch.nn.Module:
    """A 4-layer, 64-wide LLaMA trained from scratch with AdamW on random windows of `tokens`."""
    model = tiny_model("llama2", num_layers=4, hidden=64, heads=4, intermediate=176, seed=seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([tokens[s : s + seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def calibration(tokens: torch.Tensor, n: int = 32, seq_len: int = 64, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (n,), generator=gen)
    return [tokens[s : s + seq_len][None] for s in starts]


def ordering(
    model: torch.nn.Module,
    samples: list[torch.Tensor],
    held: torch.Tensor,
    *,
    shots: int = 6,
    final: float = 0.3,
    report: tuple[float, ...] = (0.2, 0.3),
    methods: tuple[str, ...] = ("surgeon", "k_obd", "magnitude"),
    lora: LoraOptions | None = None,
    **shot_options: object,
) -> tuple[dict[str, dict[float, float]], dict[str, torch.nn.Module]]:
    """Perplexity of each method at each reported sparsity; and each method's final model.

    With `lora`, every shot is followed by the first-order correction (and the last one by the
    final pass too, whose perplexity is reported under the key ``"final"`` and its first and last
    epoch's calibration loss under ``"final_train_loss"``; the last reported sparsity is then
    measured before the final pass).
    """
    out: dict[str, dict] = {}
    finals = {}

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, held, context_len=64, stride=64, progress=False).ppl

    for method in methods:
        m = copy.deepcopy(model)
        out[method] = {}
        for shot in range(1, shots + 1):
            target = shot * final / shots
            o = ShotOptions(method=method, **shot_options)  # type: ignore[arg-type]
            prune_shot(m, samples, target, o, log=lambda *a, **k: None)
            if lora is not None:
                correct(m, samples, lora, shot=shot, log=lambda *a, **k: None)
            for r in report:
                if abs(r - target) < 1e-9:
                    out[method][r] = ppl(m)
        if lora is not None and lora.final_pass:
            res = correct(m, samples, lora, shot=None, log=lambda *a, **k: None)
            out[method]["final"] = ppl(m)
            out[method]["final_train_loss"] = (res["first_epoch_loss"], res["last_epoch_loss"])
        finals[method] = m
    return out, finals


def joint_and_independent(model: torch.nn.Module, samples: list[torch.Tensor], held: torch.Tensor) -> None:
    """The Surgeon on single weights: the joint update (groups of max_correlate) against the independent one."""
    for name, kw in (
        ("joint (max_correlate 2000)", {"update": "correlated", "max_correlate": 2000}),
        ("joint (max_correlate 16)", {"update": "correlated", "max_correlate": 16}),
        ("independent", {"update": "independent"}),
    ):
        start = time.perf_counter()
        ppl, _ = ordering(model, samples, held, methods=("surgeon",), structures="element", **kw)
        seconds = time.perf_counter() - start
        by = "  ".join(f"{int(r * 100)}%: {v:.3f}" for r, v in ppl["surgeon"].items())
        print(f"  element, {name:<26} {by}  ({seconds:.0f} s, perplexity evaluations included)")


def with_and_without_lora(
    model: torch.nn.Module, samples: list[torch.Tensor], held: torch.Tensor, lora: LoraOptions
) -> None:
    """The Surgeon's perplexity at 20% and 30% without and with the correction, and each run's time."""
    for name, opts in (("surgeon", None), ("surgeon+lora", lora)):
        start = time.perf_counter()
        ppl, _ = ordering(model, samples, held, methods=("surgeon",), lora=opts)
        seconds = time.perf_counter() - start
        by = ppl["surgeon"]
        line = "  ".join(f"{int(r * 100)}%: {by[r]:.3f}" for r in (0.2, 0.3))
        if "final" in by:
            first, last = by["final_train_loss"]
            line = line.replace("30%", "30% before the final pass") + (
                f"  30% after it: {by['final']:.3f} (its calibration loss {first:.4f} -> {last:.4f})"
            )
        print(f"  {name:<13} {line}  ({seconds:.0f} s, perplexity evaluations included)")


def _time(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=x)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="training steps of the tiny model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--elements",
        action="store_true",
        help="the Surgeon on single weights: joint against independent update",
    )
    p.add_argument("--lora", action="store_true", help="the Surgeon without and with the LoRA correction")
    p.add_argument("--lora-lr", type=float, default=1e-4, help="Adam learning rate of the correction")
    p.add_argument("--lora-samples", type=int, default=3, help="calibration windows per shot's correction")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, held = stdlib_text()
    held = held[:20_000]
    start = time.perf_counter()
    model = train_tiny(train, steps=args.steps)
    dense = perplexity(model, held, context_len=64, stride=64, progress=False).ppl
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; dense perplexity {dense:.3f}")
    if args.elements:
        joint_and_independent(model, calibration(train), held)
        return
    if args.lora:
        lora = LoraOptions(lr=args.lora_lr, samples=args.lora_samples)
        print(f"LoRA correction: {lora}")
        with_and_without_lora(model, calibration(train), held, lora)
        return
    start = time.perf_counter()
    ppl, finals = ordering(model, calibration(train), held)
    print(f"pruned (3 methods x 6 shots) in {time.perf_counter() - start:.0f} s")
    for method, by in ppl.items():
        print(f"  {method:<10} " + "  ".join(f"{int(r * 100)}%: {v:.3f}" for r, v in by.items()))
    masked = finals["surgeon"]
    source, plan = shrink_model(copy.deepcopy(masked))
    shrunk = apply_plan(source, plan)
    x = torch.randint(1, 128, (8, 256), generator=torch.Generator().manual_seed(0))
    for m in (masked, shrunk, masked, shrunk):  # warm-up
        _time(m, x)
    ratios = [_time(shrunk, x) / _time(masked, x) for _ in range(15)]
    print(
        f"surgeon-30% stored parameters: shrunk {stored_param_count(shrunk):,} vs full-size "
        f"{stored_param_count(masked):,} (dense {stored_param_count(model):,})"
    )
    print(
        f"shrunk/full-size forward time (8 x 256 tokens, {args.threads} thread): median "
        f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} pairs)"
    )


if __name__ == "__main__":
    main()
