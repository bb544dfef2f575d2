"""Self-speculative decoding vs plain greedy decoding of the same shared-block model, on CPU.

For each setting below, one run measures, interleaved with plain ``model.generate(do_sample=False)``
(A B A B ... after a warm-up of each, the same prompt, thread count and dtype, as
benchmarks/README.md asks): tokens/s of ``speculative_generate`` over tokens/s of ``generate``
(median and min-max of the per-pair ratios), the acceptance rate and tokens per full-model forward.
Every speculative output is compared with the tokens ``generate`` produced; a difference is
printed for its point and makes the run exit 1.

``--batch 1,2,4`` repeats every point for each batch size: ``generate`` and
``speculative_generate`` then decode the same batch of equal-length prompts (different random
tokens per row), and the ratio is that of their batch tokens/s. A batch keeps, each round, the
smallest accepted prefix over its rows; the line of a batch point also gives the mean accepted
prefix per row before that minimum (``stats.mean_row_prefix``) and after it.

Settings (random weights, nothing trained; embeddings of unit scale so that the residual stream has
a trained model's magnitude, a larger head so that argmax margins are far above rounding):

- ``grown3x``: 12 blocks grown to 36 slots, each block followed by two copies (FlexiGPT Block
  pattern: LoRA rank 16, standard init, output norm with small gamma). The draft runs 12 slots: the
  favourable case, where the draft is a third of the model. Draft lengths 0..8 are swept (0 is
  plain decoding through the speculative loop: its ratio is the loop's own overhead).
- ``tinyllama``: TinyLlama's growth 22 -> 36 (blocks 4..17 each repeated once), scaled down. The
  draft runs 22 of 36 slots: each drafted token costs about 0.6 of a full-model token.
- ``pruned30``: FlexiGPT pruning of 22 blocks by 30% (7 deep blocks 13..19 replaced at their
  positions by the nearest kept block plus an SVD-initialised rank-16 adapter and an output norm).
  The draft is the ShortGPT model, 15 of 22 slots: the paper's setting (it reports 1.30x).
- ``gamma``: grown3x at other output-norm gammas (``--gammas``): smaller, where the draft is
  always right, and larger, where the copies change the model more and the draft is right less
  often (what training moves a model towards).

The gamma of the output norm sets how often the draft is right; the small default (1e-3) is the
state right after growth or pruning, when the model is close to its draft. Acceptance rates from
random weights say how the speed follows the acceptance, not what a trained model would accept.

    python benchmarks/bench_speculative.py                       # all settings, 12-20 minutes
    python benchmarks/bench_speculative.py --settings grown3x --draft-lens 4 --pairs 5
    python benchmarks/bench_speculative.py --settings grown3x,tinyllama --draft-lens 8 \
        --other-draft-lens 8 --batch 1,2,4                  # 5-7 minutes
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from flexigpt.shared.engine.apply import apply_plan
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model
from flexigpt.shared.speculative import draft_slots, make_draft, speculative_generate

SETTINGS = ("grown3x", "tinyllama", "pruned30", "gamma")


@dataclass
class Args:
    hidden: int
    vocab: int
    prompt: int
    new_tokens: int
    pairs: int
    rank: int
    gamma: float
    heads: int = 8
    kv_heads: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    intermediate: int | None = None  # SwiGLU width; None: 2.75 x hidden (TinyLlama's ratio)
    max_positions: int = 1024


def grown_plan(blocks: int, repeat: dict[int, int], a: Args, gamma: float) -> Plan:
    """Block pattern: block b, then `repeat[b]` copies of it with adapters and output norm."""
    ad, on = AdapterSpec(a.rank, init="lora"), OutNormSpec(gamma)
    slots: list[SlotSpec] = []
    for b in range(blocks):
        slots.append(SlotSpec(b))
        slots += [SlotSpec(b, adapter=ad, out_norm=on)] * repeat.get(b, 0)
    return Plan("llama", blocks, tuple(slots), notes={"pattern": "block"})


def pruned_plan(blocks: int, removed: range, a: Args, init: str = "svd") -> Plan:
    """Each removed block i -> slot i running the nearest kept block, adapter (SVD from i by default), output norm."""
    kept = [b for b in range(blocks) if b not in removed]
    slots = []
    for i in range(blocks):
        if i not in removed:
            slots.append(SlotSpec(i))
            continue
        base = min(kept, key=lambda j: (abs(j - i), j))
        ad = AdapterSpec(a.rank, init=init, svd_from=i if init == "svd" else None)
        slots.append(SlotSpec(base, adapter=ad, out_norm=OutNormSpec(a.gamma)))
    return Plan("llama", blocks, tuple(slots), notes={"removed": list(removed)})


def build(blocks: int, plan: Plan, a: Args) -> torch.nn.Module:
    # TinyLlama-like: GQA (8 query, 4 key/value heads), SwiGLU width 2.75 x hidden, untied head.
    src = tiny_model(
        "llama3",
        num_layers=blocks,
        hidden=a.hidden,
        heads=a.heads,
        intermediate=a.intermediate or int(a.hidden * 2.75),
        vocab=a.vocab,
        max_positions=a.max_positions,
        num_key_value_heads=a.kv_heads,
        tie_word_embeddings=False,
        seed=0,
    )
    src.config._attn_implementation = "sdpa"
    with torch.no_grad():
        src.model.embed_tokens.weight.mul_(50.0)
        src.lm_head.weight.mul_(20.0)
    # on the target device before apply_plan, so SVD adapter inits run there too
    src.to(device=a.device, dtype=getattr(torch, a.dtype))
    return apply_plan(src, plan).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str = "cpu") -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


@torch.inference_mode()
def cost_line(model: torch.nn.Module, draft: object, prompt: torch.Tensor, a: Args, reps: int = 5) -> str:
    """Median ms of one forward of the full model over 1, 5 and 9 new tokens, and of the draft over 1,
    after the prompt is cached: what a round costs (k draft forwards + one verify of k + 1 tokens)."""
    b = prompt.shape[0]
    caches = {"full": (model, DynamicCache(config=model.config)), "draft": (draft.model, draft.new_cache())}
    for m, cache in caches.values():
        m(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    points = [("full", 1), ("full", 5), ("full", 9), ("draft", 1)]
    times: dict[tuple[str, int], list[float]] = {p: [] for p in points}
    for _ in range(reps):  # interleaved, like the pairs
        for who, q in points:
            m, cache = caches[who]
            x = torch.randint(3, a.vocab, (b, q), device=a.device)
            dt, _ = timed(
                lambda m=m, x=x, c=cache, q=q: m(
                    input_ids=x, past_key_values=c, use_cache=True, logits_to_keep=q
                ),
                a.device,
            )
            times[(who, q)].append(dt)
            for layer in cache.layers:
                layer.crop(-q)
    ms = {p: 1e3 * statistics.median(t) for p, t in times.items()}
    one = ms[("full", 1)]
    return (
        f"forward ms: full 1 tok {one:.1f}, full 5 tok {ms[('full', 5)]:.1f} ({ms[('full', 5)] / one:.2f}x), "
        f"full 9 tok {ms[('full', 9)]:.1f} ({ms[('full', 9)] / one:.2f}x), "
        f"draft 1 tok {ms[('draft', 1)]:.1f} ({ms[('draft', 1)] / one:.2f}x)"
    )


def measure(
    model: torch.nn.Module, name: str, draft_lens: list[int], a: Args, batch: int = 1
) -> dict[int, dict]:
    """Interleaved pairs (generate, speculative k) for every k on a batch of `batch` prompts; prints
    one line per k. Each result: median / min / max ratio, the last run's stats, and whether every
    speculative output equalled generate's (``identical``)."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, a.vocab, (batch, a.prompt), generator=gen).to(a.device)
    draft = make_draft(model)

    def plain() -> torch.Tensor:
        return model.generate(
            prompt, do_sample=False, max_new_tokens=a.new_tokens, eos_token_id=None, pad_token_id=0
        )

    def spec(k: int) -> object:
        return speculative_generate(model, prompt, a.new_tokens, k, eos_token_id=None, draft=draft)

    ref = plain()
    for k in draft_lens:  # warm-up of every variant
        spec(k)
    results = {}
    n_slots, n_draft = model.plan.num_slots, len(draft.slots)
    print(f"{name:10s} batch {batch} {cost_line(model, draft, prompt, a)}", flush=True)
    for k in draft_lens:
        ratios, plain_tps, stats, identical = [], [], None, True
        for _ in range(a.pairs):
            t_plain, out_plain = timed(plain, a.device)
            t_spec, out = timed(lambda k=k: spec(k), a.device)
            identical &= torch.equal(out_plain, ref) and torch.equal(out.sequences, ref)
            ratios.append(t_plain / t_spec)
            plain_tps.append(batch * a.new_tokens / t_plain)
            stats = out.stats
        med = statistics.median(ratios)
        results[k] = {
            "median": med,
            "min": min(ratios),
            "max": max(ratios),
            "stats": stats,
            "identical": identical,
        }
        acc = "   -  " if k == 0 else f"{stats.acceptance_rate:6.3f}"
        prefix = "" if k == 0 or batch == 1 else (
            f"  prefix/row {stats.mean_row_prefix:4.2f} -> kept {stats.mean_accepted_prefix:4.2f}"
        )  # fmt: skip
        print(
            f"{name:10s} batch {batch} slots {n_slots:2d} draft {n_draft:2d}  k={k}  speed-up {med:5.2f}x "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}, {a.pairs} pairs)  acceptance {acc}{prefix}  "
            f"tokens/verify {stats.tokens_per_round:5.2f}  plain {statistics.median(plain_tps):5.1f} tok/s  "
            f"tokens {'identical' if identical else 'DIFFER from generate'}",
            flush=True,
        )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {SETTINGS}")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000, help="LLaMA-2 / TinyLlama vocabulary size")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved (plain, speculative) pairs per point")
    ap.add_argument("--draft-lens", default="0-8", help="sweep for grown3x, e.g. 0-8 or 2,4")
    ap.add_argument("--other-draft-lens", default="4,8", help="draft lengths of the other settings")
    ap.add_argument("--gammas", default="0.0001,0.01,0.03", help="gammas of the `gamma` setting")
    ap.add_argument("--gamma", type=float, default=1e-3, help="output-norm gamma of the main settings")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 was as fast as 2 here)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--batch", default="1", help="comma list of batch sizes, e.g. 1,2,4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    settings = args.settings.split(",")
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        ap.error(f"--settings: unknown {bad}; allowed: {list(SETTINGS)}")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        ap.error(f"--batch {args.batch!r}: a comma list of batch sizes >= 1, e.g. 1,2,4")
    torch.set_num_threads(args.threads)
    a = Args(args.hidden, args.vocab, args.prompt, args.new_tokens, args.pairs, args.rank, args.gamma)
    a.heads, a.kv_heads, a.device, a.dtype = args.heads, args.kv_heads, args.device, args.dtype
    sweep, others = _lens(args.draft_lens), _lens(args.other_draft_lens)
    gammas = [float(g) for g in args.gammas.split(",")]
    print(
        f"{_where(a.device)} {a.dtype}, {args.threads} thread(s), hidden {a.hidden}, heads {a.heads}/{a.kv_heads}, "
        f"vocab {a.vocab}, prompt {a.prompt}, "
        f"{a.new_tokens} new tokens, greedy, batch {args.batch}, LoRA rank {a.rank}, gamma {a.gamma:g}",
        flush=True,
    )
    runs = []  # (name, plan, blocks, draft lengths)
    if "grown3x" in settings:
        runs.append(("grown3x", grown_plan(12, dict.fromkeys(range(12), 2), a, a.gamma), 12, sweep))
    if "tinyllama" in settings:
        runs.append(("tinyllama", grown_plan(22, dict.fromkeys(range(4, 18), 1), a, a.gamma), 22, others))
    if "pruned30" in settings:
        runs.append(("pruned30", pruned_plan(22, range(13, 20), a), 22, others))
    if "gamma" in settings:
        for g in gammas:
            runs.append((f"gamma={g:g}", grown_plan(12, dict.fromkeys(range(12), 2), a, g), 12, others))
    summary = []
    for name, plan, blocks, lens in runs:
        model = build(blocks, plan, a)
        for b in batches:
            summary.append((name, b, plan, measure(model, name, lens, a, batch=b)))
    print("\nsummary (best draft length of each setting and batch size):")
    differ = []
    for name, b, plan, res in summary:
        differ += [f"{name} batch {b} draft_len {k}" for k, r in res.items() if not r["identical"]]
        best = [(k, r) for k, r in res.items() if k > 0]
        if not best:
            continue
        k, r = max(best, key=lambda kr: kr[1]["median"])
        print(
            f"  {name:12s} batch {b}: speculative/plain greedy tokens/s: median {r['median']:.2f} "
            f"(range {r['min']:.2f}-{r['max']:.2f}, {a.pairs} pairs, {plan.num_slots} slots over "
            f"{len(plan.physical_blocks)} blocks, draft {len(draft_slots(plan))} slots, draft_len {k}, "
            f"acceptance {r['stats'].acceptance_rate:.3f}, tokens {'identical' if r['identical'] else 'DIFFER'})"
            + (f"; {r['median'] / res[0]['median']:.2f}x over draft_len 0" if 0 in res else "")
        )
    if differ:
        raise SystemExit(f"speculative tokens differ from generate's: {', '.join(differ)}")


def _where(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"


def _lens(text: str) -> list[int]:
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(x) for x in text.split(",")]


if __name__ == "__main__":
    main()
