"""Peak memory of one LLM Surgeon shot on LLaMA-2-7B-shaped blocks, holding one block's factors at a time.

The model has LLaMA-2-7B's block shape (hidden 4096, MLP 11008, 32 heads) and vocabulary (32000),
with random weights and `--blocks` blocks (the full model has 32). One shot prunes 5% of the
decoder-linear weights with ``blocks_per_pass=1`` and ``factors=disk``: the factors of one block
are collected, turned into costs and written to disk, then each layer is updated on its own. The
peak resident memory of the process (``resource.getrusage``, CPU) is printed with its parts:
the model, one block's fp32 factors, and the float64 work of the largest layer. Because the
factors of other blocks are never in memory together, the peak does not grow with the number of
blocks beyond the model itself; the arithmetic for 32 blocks is printed too.

Run: ``python benchmarks/bench_surgeon_memory.py``. Expect tens of CPU-minutes: every 11008-wide
factor is inverted in float64 twice per shot (for the costs and for the update).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flexigpt.prune.surgeon.shot import ShotOptions, prune_shot

GB = 1024**3


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def llama7b_shaped(blocks: int) -> torch.nn.Module:
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=blocks,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def factor_bytes(hidden: int = 4096, mlp: int = 11008) -> int:
    """fp32 bytes of one block's A and G (q, k, v, o, gate, up, down; no biases)."""
    a = 4 * hidden**2 + 2 * hidden**2 + mlp**2  # inputs: q, k, v, o, gate, up at hidden; down at mlp
    g = 4 * hidden**2 + 2 * mlp**2 + hidden**2  # outputs: q, k, v, o at hidden; gate, up at mlp; down
    return 4 * (a + g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--windows", type=int, default=2, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = llama7b_shaped(args.blocks)
    params = sum(p.numel() for p in model.parameters())
    after_load = peak_rss_gb()
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, 32000, (1, args.seq_len), generator=gen) for _ in range(args.windows)]
    with tempfile.TemporaryDirectory() as scratch:
        opts = ShotOptions(method="surgeon", blocks_per_pass=1, factors="disk", scratch=Path(scratch))
        start = time.perf_counter()
        res = prune_shot(model, samples, 0.05, opts, log=print)
        seconds = time.perf_counter() - start
    peak = peak_rss_gb()
    f = factor_bytes()
    print(
        f"model: {params:,} parameters, fp32 {params * 4 / GB:.2f} GB; peak RSS after loading {after_load:.2f} GB"
    )
    print(f"one block's factors (fp32): {f / GB:.2f} GB; all 32 blocks: {32 * f / GB:.1f} GB")
    print(
        f"float64 work of the largest layer: 11008^2 x 8 B = {11008**2 * 8 / GB:.2f} GB per matrix (factor, inverse)"
    )
    print(
        f"shot: zeroed {res.zeroed:,} of {res.total:,} in {seconds:.0f} s ({args.windows} x {args.seq_len} tokens)"
    )
    print(
        f"peak RSS of one shot, {args.blocks} LLaMA-2-7B-shaped blocks, one block's factors at a time: "
        f"{peak:.2f} GB (CPU, resource.getrusage)"
    )


if __name__ == "__main__":
    main()
