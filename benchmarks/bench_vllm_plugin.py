"""vLLM serving a compact model through the plugin, against its materialised copy in stock vLLM.

The model is a grown LLaMA (``--blocks`` physical blocks run by ``--slots`` slots; every reusing
slot has rank-``--rank`` LoRA on all seven linears, no output norm so that a materialised copy
exists). Both directories are served the same way (vLLM offline engine, one batch of ``--prompts``
prompts, ``--tokens`` greedy tokens each, eager mode) by ``flexigpt.vllm_plugin.generate`` in
vLLM's environment (``FLEXIGPT_VLLM_PYTHON``). Printed: bytes on disk, resident memory the engine
added (weights + KV cache + runtime; the KV cache is the same on both sides), generated tokens per
second, and whether the two sides produced the same greedy tokens. Each side runs in a fresh
engine ``--pairs`` times, interleaved (compact, materialised, compact, ...); each engine times
``--repeats`` generations after a warm-up one and reports the median. The speed figure is the
median of the per-pair ratios with its range.

    FLEXIGPT_VLLM_PYTHON=../vllm-env/bin/python python benchmarks/bench_vllm_plugin.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from flexigpt.shared.engine.apply import apply_plan
from flexigpt.shared.engine.checkpoint import export_materialized, save_compact
from flexigpt.shared.engine.plan import AdapterSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model


def _payload(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def _serve(python: str, model_dir: Path, request: Path, out: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = [python, "-m", "flexigpt.vllm_plugin.generate", str(model_dir), str(request), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    return json.loads(out.read_text())


def main() -> None:
    """Build, save, serve both ways, print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--slots", type=int, default=12)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    python = os.environ.get("FLEXIGPT_VLLM_PYTHON")
    if not python:
        raise SystemExit("set FLEXIGPT_VLLM_PYTHON to the python of vLLM's environment")
    source = tiny_model(
        "llama2", num_layers=args.blocks, hidden=args.hidden, heads=args.heads, vocab=args.vocab
    )
    extra = args.slots - args.blocks
    reused = list(range(2, 2 + extra))  # grow in the middle: blocks 2.. run twice
    slots = []
    for b in range(args.blocks):
        slots.append(SlotSpec(b))
        if b in reused:
            slots.append(SlotSpec(b, adapter=AdapterSpec(args.rank)))
    torch.manual_seed(0)
    model = apply_plan(source, Plan("llama", args.blocks, tuple(slots))).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(3, args.vocab, (int(n),), generator=g).tolist()
        for n in torch.randint(8, 48, (args.prompts,), generator=g)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        save_compact(model, t / "compact")
        export_materialized(model, t / "materialized")
        request = t / "request.json"
        max_len = 48 + args.tokens + 8
        request.write_text(
            json.dumps(
                {
                    "prompts": prompts,
                    "max_tokens": args.tokens,
                    "dtype": args.dtype,
                    "max_model_len": max_len,
                    "repeats": args.repeats,
                }
            )
        )
        runs: dict[str, list[dict]] = {"compact": [], "materialized": []}
        for _ in range(args.pairs):  # interleaved: compact, materialised, compact, ...
            for name, done in runs.items():
                done.append(_serve(python, t / name, request, t / f"{name}.json"))
        disk = {name: _payload(t / name) for name in runs}
    print(
        f"{args.slots} slots over {args.blocks} blocks, hidden {args.hidden}, rank {args.rank}, {args.dtype}, "
        f"{args.prompts} prompts x {args.tokens} tokens, {torch.get_num_threads()} threads here"
    )
    print(f"{'':14}{'on disk MB':>12}{'engine RSS MB (median)':>24}{'tokens/s (median)':>19}")
    for name, done in runs.items():
        rss = statistics.median(r["rss_after_engine"] - r["rss_before_engine"] for r in done)
        tps = statistics.median(args.prompts * args.tokens / r["seconds"] for r in done)
        print(f"{name:14}{disk[name] / 2**20:12.1f}{rss / 2**20:24.1f}{tps:19.1f}")
    same = sum(
        a == b for a, b in zip(runs["compact"][0]["tokens"], runs["materialized"][0]["tokens"], strict=True)
    )
    print(f"identical greedy sequences: {same}/{args.prompts}")
    ratios = [c["seconds"] / m["seconds"] for c, m in zip(runs["compact"], runs["materialized"], strict=True)]
    print(
        f"compact/materialised generation time: median {statistics.median(ratios):.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} pairs)"
    )


if __name__ == "__main__":
    main()
