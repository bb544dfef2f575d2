"""Cost of weight sharing: shared-block model vs dense model of the same depth, and vs its export.

Two ratios, each measured side by side in one run (interleaved A B A B after warm-up; median and
min-max of per-pair ratios, as benchmarks/README.md asks):

1. training step (forward + backward, every parameter trainable on both sides) of a shared model
   (``--slots`` slots over ``--blocks`` physical blocks, rank-``--rank`` adapters on all seven
   linears of every reusing slot, output norm on) over a dense model with ``--slots`` plain layers;
2. inference forward of the shared model over its materialised copy (same slots, adapters merged
   into private weights; output norms kept as modules on both sides, so the difference is what
   sharing + unmerged adapters cost).

Targets (issue): <= 1.03 for training and <= 1.02 for inference at small ranks.

    python benchmarks/bench_engine.py                 # CPU, fp32
    python benchmarks/bench_engine.py --device cuda --dtype bfloat16 --hidden 2048 --seq 1024
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from flexigpt.shared.engine.apply import apply_plan, materialize, set_trainable
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    a: Callable[[], None], b: Callable[[], None], pairs: int, warmup: int, device: str
) -> list[float]:
    """Per-pair time ratios b/a, timed alternately after `warmup` runs of each."""
    for _ in range(warmup):
        a()
        b()
    ratios = []
    for _ in range(pairs):
        times = []
        for fn in (a, b):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        ratios.append(times[1] / times[0])
    return ratios


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    extra = args.slots - args.blocks
    if not 0 < extra <= args.blocks:
        raise SystemExit(f"--slots must be in {args.blocks + 1}..{2 * args.blocks}")
    size = dict(hidden=args.hidden, heads=args.heads, vocab=1024, max_positions=max(256, args.seq))

    # shared: blocks 0..B-1 in order, the last `extra` blocks each run a second time
    ad = AdapterSpec(args.rank, init="lora")
    slots = []
    for b in range(args.blocks):
        slots.append(SlotSpec(b))
        if b >= args.blocks - extra:
            slots.append(SlotSpec(b, adapter=ad, out_norm=OutNormSpec(0.1), own_norms=True))
    plan = Plan("llama", args.blocks, tuple(slots))
    shared = apply_plan(tiny_model("llama2", num_layers=args.blocks, **size), plan).to(args.device, dtype)
    dense = tiny_model("llama2", num_layers=args.slots, **size).to(args.device, dtype)
    for m in (shared, dense):
        m.config._attn_implementation = "sdpa"
    with torch.no_grad():  # trained-looking adapters, so the export check below means something
        for n, p in shared.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    set_trainable(shared, "all")
    x = torch.randint(3, 1024, (args.batch, args.seq), device=args.device)

    def step(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            model(x, labels=x).loss.backward()

        return run

    train = interleaved(step(dense), step(shared), args.pairs, args.warmup, args.device)
    shared.eval()
    export = materialize(shared, keep_output_norm=True).eval()
    export.config._attn_implementation = "sdpa"

    def infer(model: torch.nn.Module) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            model(x)

        return run

    with torch.no_grad():
        diff = (shared(x).logits.float() - export(x).logits.float()).abs().max().item()
    inference = interleaved(infer(export), infer(shared), args.pairs, args.warmup, args.device)

    what = f"{args.slots} slots over {args.blocks} blocks, r={args.rank}, hidden {args.hidden}, seq {args.seq}x{args.batch}"
    print(
        f"device {args.device}, {args.dtype}, threads {torch.get_num_threads()}; max |logit diff| export vs shared {diff:.2e}"
    )
    for name, r, target in (
        ("shared/dense step time", train, 1.03),
        ("shared/export inference time", inference, 1.02),
    ):
        med = statistics.median(r)
        print(
            f"{name}: median {med:.3f} (range {min(r):.3f}-{max(r):.3f}, {len(r)} pairs, {what}) "
            f"target <= {target}: {'met' if med <= target else 'missed'}"
        )


if __name__ == "__main__":
    main()
