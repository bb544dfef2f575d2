"""Resident memory of recovery training several variants in one process, as the prune command does.

The prune command trains its variants one after the other in one process. Each ``train`` call
builds a DeepSpeed engine (fp32 master weights, gradients, Adam moments); if an engine outlived its
call, every further variant would add its whole training state to the process. This benchmark
trains a random LLaMA-shaped model (default: 8 blocks of hidden 512, about 25M parameters, every
parameter trainable, ZeRO-2 on CPU) as N variants in turn and prints the resident memory after each
and the process's peak (``ru_maxrss``): with the engines released, the peak for 3 variants equals
the peak for 1.

Run: ``python benchmarks/bench_variant_memory.py --variants 1`` and ``--variants 3`` (each in a
fresh process: the peak of a process never goes down). Measured on the 2-core CPU machine: peak
1,374 MiB (1 variant) and 1,360 MiB (3 variants, RSS after each 613 / 614 / 609 MiB); with the
engines kept alive, as before they were released, 1,355 and 2,104 MiB (978 / 1,357 / 1,727).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """Current resident memory of this process (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    """Train `--variants` models in turn; print RSS after each and the peak, as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from flexigpt.shared.engine.plan import Plan
    from flexigpt.shared.recipe import recipe_from_dict
    from flexigpt.shared.train.trainer import train
    from tests.shared.train.trainkit import make_model, make_tokenizer, recipe_dict, write_corpus

    root = Path(tempfile.mkdtemp(prefix="bench-variants-"))
    ws = {"tok": make_tokenizer(root / "tok"), "corpus": root / "corpus", "plan": root / "plan.json"}
    write_corpus(ws["corpus"], "jsonl", 200)
    ws["model"] = make_model(root / "model", num_layers=args.layers, hidden=args.hidden)
    Plan.identity("llama", args.layers).save(ws["plan"])
    after = []
    start = rss_mib()
    for i in range(args.variants):
        d = recipe_dict(
            ws, root / f"variant{i}", trainable="all", max_steps=args.steps, checkpoint_every=args.steps
        )
        train(recipe_from_dict(d))
        gc.collect()
        after.append(round(rss_mib()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(f.stat().st_size for f in (root / "model").glob("*.safetensors")) // 4  # fp32, about
    print(
        json.dumps(
            {
                "variants": args.variants,
                "layers": args.layers,
                "hidden": args.hidden,
                "params_about": params,
                "rss_before_mib": round(start),
                "rss_after_each_mib": after,
                "peak_rss_mib": round(peak),
            }
        )
    )


if __name__ == "__main__":
    main()
