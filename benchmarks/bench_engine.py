"""Cost of weight sharing: shared-block model vs dense model of the same depth, and vs its export.

Ratios, each measured side by side in one run (interleaved A B A B after warm-up; median and
min-max of per-pair ratios, as benchmarks/README.md asks):

1. training step (forward + backward) of a shared model (``--slots`` slots over ``--blocks``
   physical blocks, rank-``--rank`` adapters on all seven linears of every reusing slot, output
   norm on) over a dense model with ``--slots`` plain layers, for each ``--trainable`` set:
   ``all`` (every parameter on both sides) and ``adapters+norms`` (the shared side trains its
   adapters and slot norms; the dense side trains the norms of the same slots, so both backward
   passes reach equally deep and only the adapters' own gradients are extra);
2. with ``all``, the shared step with its shared weights' gradients summed inside the GEMMs
   (``SharedLinear`` with ``set_grad_accumulation(model, True)``) over the same model summing
   them in autograd (the default path); ``--grad-sum`` picks the path of the figures in 1;
3. inference forward of the shared model over its materialised copy (same slots, adapters merged
   into private weights; output norms kept as modules on both sides, so the difference is what
   sharing + unmerged adapters cost).

Targets: <= 1.03 for training and <= 1.02 for inference at small ranks. ``--profile`` adds a
torch.profiler table of the shared training step (``all``) with each gradient summation.

    python benchmarks/bench_engine.py                 # CPU, fp32
    python benchmarks/bench_engine.py --device cuda --dtype bfloat16 --hidden 2048 --seq 1024
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from flexigpt.shared.engine.apply import apply_plan, materialize, set_trainable
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.shared_grad import set_grad_accumulation
from flexigpt.shared.engine.tiny import tiny_model

TRAINABLE = ("all", "adapters+norms")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    a: Callable[[], None],
    b: Callable[[], None],
    pairs: int,
    warmup: int,
    device: str,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Per-pair time ratios b/a, timed alternately after `warmup` runs of each.

    `clock` is wall time by default; ``time.process_time`` (this process's CPU time) leaves out the
    time other processes hold the cores, on a CPU run with one thread on a shared machine.
    """
    for _ in range(warmup):
        a()
        b()
    ratios = []
    for _ in range(pairs):
        times = []
        for fn in (a, b):
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            times.append(clock() - t0)
        ratios.append(times[1] / times[0])
    return ratios


def summary(ratios: list[float]) -> dict[str, float]:
    """Median, min, max and count of per-pair ratios."""
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "pairs": len(ratios),
    }


def models(
    hidden: int, heads: int, blocks: int, slots: int, rank: int, seq: int, device: str, dtype: torch.dtype
) -> tuple[Any, Any, list[int]]:
    """(shared, dense, reusing slots): `slots` slots over `blocks` blocks, the last blocks run twice."""
    extra = slots - blocks
    if not 0 < extra <= blocks:
        raise ValueError(f"slots must be in {blocks + 1}..{2 * blocks}, got {slots}")
    size = dict(hidden=hidden, heads=heads, vocab=1024, max_positions=max(256, seq))
    ad = AdapterSpec(rank, init="lora")
    specs = []
    for b in range(blocks):
        specs.append(SlotSpec(b))
        if b >= blocks - extra:
            specs.append(SlotSpec(b, adapter=ad, out_norm=OutNormSpec(0.1), own_norms=True))
    reusing = [i for i, s in enumerate(specs) if s.adapter is not None]
    with torch.device(device):  # built where they run: a GPU-sized fp32 init on the CPU takes minutes
        shared = apply_plan(
            tiny_model("llama2", num_layers=blocks, **size), Plan("llama", blocks, tuple(specs))
        )
        dense = tiny_model("llama2", num_layers=slots, **size)
    shared, dense = shared.to(device, dtype), dense.to(device, dtype)
    for m in (shared, dense):
        m.config._attn_implementation = "sdpa"
    with torch.no_grad():  # trained-looking adapters, so the export check below means something
        for n, p in shared.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return shared, dense, reusing


def set_dense_trainable(dense: Any, rule: str, reusing: list[int]) -> None:
    """``all``: every parameter; else only the norms of the slots that train on the shared side."""
    for n, p in dense.named_parameters():
        slot = int(n.split(".")[2]) if n.startswith("model.layers.") else None
        p.requires_grad_(rule == "all" or (slot in reusing and "norm" in n))


def train_step(model: Any, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()

    return run


def forward(model: Any, x: torch.Tensor) -> Callable[[], None]:
    @torch.no_grad()
    def run() -> None:
        model(x)

    return run


def engine_figures(
    *,
    hidden: int,
    heads: int,
    blocks: int,
    slots: int,
    rank: int,
    seq: int,
    batch: int,
    pairs: int,
    warmup: int,
    device: str,
    dtype: str,
    trainable: tuple[str, ...] = TRAINABLE,
    clock: str = "wall",
    grad_sum: str = "autograd",
) -> dict[str, Any]:
    """Every ratio of the module docstring, as ``summary`` dicts, with the setting they were measured in."""
    shared, dense, reusing = models(hidden, heads, blocks, slots, rank, seq, device, getattr(torch, dtype))
    tick = CLOCKS[clock]
    set_grad_accumulation(shared, grad_sum == "gemm")  # the path of the shared/dense figures
    x = torch.randint(3, 1024, (batch, seq), device=device)
    out: dict[str, Any] = {
        "setting": {
            "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "dtype": dtype,
            "threads": torch.get_num_threads(),
            "clock": clock,
            "grad_sum": grad_sum,
            "hidden": hidden,
            "heads": heads,
            "blocks": blocks,
            "slots": slots,
            "rank": rank,
            "seq": seq,
            "batch": batch,
        }
    }
    for rule in trainable:
        set_trainable(shared, rule)
        set_dense_trainable(dense, rule, reusing)
        out[f"train_{rule}"] = summary(
            interleaved(train_step(dense, x), train_step(shared, x), pairs, warmup, device, tick)
        )
        if rule == "all":
            plain = train_step(shared, x)

            def summed_in_gemm(step: Callable[[], None] = plain) -> None:
                set_grad_accumulation(shared, True)
                step()

            def summed_by_autograd(step: Callable[[], None] = plain) -> None:
                set_grad_accumulation(shared, False)
                step()

            ratios = interleaved(summed_by_autograd, summed_in_gemm, pairs, warmup, device, tick)
            set_grad_accumulation(shared, grad_sum == "gemm")
            out["grad_sum_in_gemm_over_autograd"] = summary(ratios)
    shared.zero_grad(set_to_none=True)
    dense.zero_grad(set_to_none=True)
    shared.eval()
    export = materialize(shared, keep_output_norm=True).eval()
    export.config._attn_implementation = "sdpa"
    with torch.no_grad():
        out["max_abs_logit_diff"] = (shared(x).logits.float() - export(x).logits.float()).abs().max().item()
    out["inference"] = summary(
        interleaved(forward(export, x), forward(shared, x), pairs, warmup, device, tick)
    )
    return out


def profile_lines(shared: Any, x: torch.Tensor, steps: int = 3) -> list[str]:
    """aten::add / add_ / mm / addmm_ self time of the shared training step, per gradient summation."""
    from torch.profiler import ProfilerActivity, profile

    set_trainable(shared, "all")
    lines = []
    for name, on in (("autograd sum", False), ("in-GEMM sum", True)):
        set_grad_accumulation(shared, on)
        step = train_step(shared, x)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        table = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in table)
        for e in table:
            if e.key in ("aten::add", "aten::add_", "aten::mm", "aten::addmm_"):
                lines.append(
                    f"profile ({name}): {e.key:12s} self CPU {e.self_cpu_time_total / 1e3 / steps:8.1f} ms/step, "
                    f"{e.count // steps} calls/step, {100 * e.self_cpu_time_total / total:.1f}% of the step"
                )
        lines.append(f"profile ({name}): step self CPU total {total / 1e3 / steps:.1f} ms")
    set_grad_accumulation(shared, False)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=8, help="physical blocks")
    ap.add_argument("--slots", type=int, default=12, help="slots (depth)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--trainable", default=",".join(TRAINABLE), help=f"comma list of {list(TRAINABLE)}")
    ap.add_argument("--clock", default="wall", choices=list(CLOCKS), help="cpu: process CPU time (CPU runs)")
    ap.add_argument(
        "--grad-sum",
        default="autograd",
        choices=["autograd", "gemm"],
        help="how the shared/dense figures sum shared weight gradients (autograd: the default path)",
    )
    ap.add_argument("--profile", action="store_true", help="also profile the shared step (CPU ops)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rules = tuple(args.trainable.split(","))
    if not 0 < args.slots - args.blocks <= args.blocks:
        raise SystemExit(f"--slots must be in {args.blocks + 1}..{2 * args.blocks}")
    if any(r not in TRAINABLE for r in rules):
        raise SystemExit(f"--trainable: {args.trainable!r}; allowed: comma list of {list(TRAINABLE)}")
    shape = {k: getattr(args, k) for k in ("hidden", "heads", "blocks", "slots", "rank", "seq", "batch")}
    res = engine_figures(
        **shape,
        pairs=args.pairs,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        trainable=rules,
        clock=args.clock,
        grad_sum=args.grad_sum,
    )
    what = f"{args.slots} slots over {args.blocks} blocks, r={args.rank}, hidden {args.hidden}, seq {args.seq}x{args.batch}"
    print(
        f"device {args.device}, {args.dtype}, threads {torch.get_num_threads()}, {args.clock} clock, "
        f"shared/dense with {args.grad_sum} gradient sum; "
        f"max |logit diff| export vs shared {res['max_abs_logit_diff']:.2e}"
    )
    rows = [(f"shared/dense step time ({r} trainable)", f"train_{r}", 1.03) for r in rules]
    if "all" in rules:
        rows.append(("in-GEMM/autograd gradient sum step time", "grad_sum_in_gemm_over_autograd", 1.0))
    rows.append(("shared/export inference time", "inference", 1.02))
    for name, key, target in rows:
        r = res[key]
        print(
            f"{name}: median {r['median']:.3f} (range {r['min']:.3f}-{r['max']:.3f}, {r['pairs']} pairs, {what}) "
            f"target <= {target}: {'met' if r['median'] <= target else 'missed'}"
        )
    if args.profile:
        shared, _, _ = models(
            **{k: shape[k] for k in ("hidden", "heads", "blocks", "slots", "rank", "seq")},
            device=args.device,
            dtype=getattr(torch, args.dtype),
        )
        x = torch.randint(3, 1024, (args.batch, args.seq), device=args.device)
        print("\n".join(profile_lines(shared, x)))


if __name__ == "__main__":
    main()
