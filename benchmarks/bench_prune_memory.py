"""Peak resident memory of the prune command's pruning step, step by step, against the model size.

A random LLaMA with LLaMA-2's proportions scaled down (hidden 1024, MLP 2816, 16 blocks, the real
32k vocabulary; about 271M parameters, 1.08 GB in fp32) is written to disk as safetensors. The
pruning step of ``recipes/prune/local-tiny.yaml`` then runs on it *in this process* with all three
variants (30%: 5 of 16 blocks; adapters and metric at r = 64, which is the same share of a block as
r = 256 is of a LLaMA-2-7B block), while a thread samples ``/proc/self/status`` every 20 ms:
RssAnon (the process's own memory) and RssFile (mapped file pages, e.g. safetensors being read).
Each sample is credited to the step named by the command's latest log line.

The claim checked: the step never holds two copies of the model. The printed ratio is
(peak RSS - RSS before the model is loaded) / size of the model's weights; two copies would make it
at least 2. Memory is whole-process resident memory (``/proc/self/status``; ``ru_maxrss`` agrees).

Needs ``shared/data`` beside the checkout (LLaMA-2 tokenizer, WikiText-2; benchmarks/README.md); run:
``python benchmarks/bench_prune_memory.py [--layers 16] [--hidden 1024]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def rss() -> tuple[float, float]:
    """(RssAnon, RssFile) of this process in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            k, v = line.split(":")
            fields[k] = int(v.split()[0]) / 1024
    return fields["RssAnon"], fields["RssFile"]


class Sampler(threading.Thread):
    """Samples RSS every `period` seconds and keeps the maxima per step label."""

    def __init__(self, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.period, self.step, self.stop = period, "start", False
        self.peaks: dict[str, list[float]] = {}

    def run(self) -> None:
        while not self.stop:
            anon, file = rss()
            peak = self.peaks.setdefault(self.step, [0.0, 0.0, 0.0])
            peak[0], peak[1], peak[2] = max(peak[0], anon), max(peak[1], file), max(peak[2], anon + file)
            time.sleep(self.period)


def write_workspace(root: Path, layers: int, hidden: int, file_dtype: str) -> tuple[Path, int]:
    from flexigpt.shared.engine.tiny import tiny_model
    from flexigpt.shared.evaluate.perplexity import load_tokenizer

    model = tiny_model(
        "llama2",
        num_layers=layers,
        hidden=hidden,
        heads=hidden // 64,
        intermediate=int(hidden * 2.75),
        vocab=32000,
        max_positions=2048,
    )
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # as loaded: fp32
    model.to(getattr(torch, file_dtype)).save_pretrained(root / "model")
    del model
    load_tokenizer(DATA / "tokenizers" / "llama2-32k.model").save_pretrained(root / "tok")
    return root / "model", nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--ppl-batch", type=int, default=1, help="windows per forward pass of the perplexity")
    ap.add_argument(
        "--file-dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="dtype of the saved checkpoint; the command loads it in fp32 (float16: a dtype conversion on load, "
        "as a fp16 hub checkpoint loaded in fp32 or bf16)",
    )
    args = ap.parse_args()
    if not (DATA / "tokenizers" / "llama2-32k.model").is_file():
        print(f"skipped: {DATA} not found")
        return
    torch.set_num_threads(2)
    from flexigpt.prune.depth.run import prune, source_config
    from flexigpt.shared.recipe import load_recipe

    root = Path(tempfile.mkdtemp(prefix="bench-prune-mem-"))
    try:
        model_dir, nbytes = write_workspace(root, args.layers, args.hidden, args.file_dtype)
        wiki = DATA / "wikitext-2"
        recipe = load_recipe(
            REPO / "recipes" / "prune" / "local-tiny.yaml",
            [
                f"model.source={model_dir}",
                f"model.tokenizer={root / 'tok'}",
                "model.dtype=float32",
                f"data.files=[{wiki / 'valid.txt'}]",
                "data.txt_sample_by=line",
                "data.seq_len=256",
                f"data.eval.files=[{wiki / 'test.txt'}]",
                # start perplexity on 2,048 WikiText-2 test tokens in 8 disjoint windows (4 models)
                f"prune.perplexity={{files: [{wiki / 'test.txt'}], max_tokens: 2048, context_len: 256, stride: 256, "
                f"batch_size: {args.ppl_batch}}}",
                "prune.calibration.num_samples=16",
                "prune.calibration.seq_len=256",
                f"prune.selection.rank={args.rank}",
                f"prune.replace.rank={args.rank}",
                f"output_dir={root / 'run'}",
            ],
        )
        config = source_config(recipe)
        sampler = Sampler()
        marks: list[tuple[str, float]] = []

        def log(*parts: object) -> None:
            line = " ".join(str(p) for p in parts)
            print(line, flush=True)
            first = line.splitlines()[0]
            label = first.split(":")[0] if not first.startswith("[") else first.split("]")[0] + "]"
            if first.startswith("loading"):
                marks.append(("before load", sum(rss())))
                label = "load"
            sampler.step = label

        sampler.start()
        t0 = time.perf_counter()
        summary = prune(recipe, config, log=log)
        seconds = time.perf_counter() - t0
        sampler.stop = True
        sampler.join()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mib = nbytes / 2**20
    base = marks[0][1]
    print(
        f"\n{'step (from the log line that started it)':<44} {'RssAnon':>9} {'RssFile':>9} {'total':>9}  MiB"
    )
    for step, (anon, file, total) in sampler.peaks.items():
        print(f"{step[:44]:<44} {anon:>9,.0f} {file:>9,.0f} {total:>9,.0f}")
    peak = max(p[2] for p in sampler.peaks.values())
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "model_mib": round(mib),
                "rss_before_load_mib": round(base),
                "peak_rss_mib": round(peak),
                "ru_maxrss_mib": round(maxrss),
                "summary_peak_rss_mib": round(summary.peak_rss_mib),
                "seconds": round(seconds, 1),
            }
        )
    )
    print(
        f"prune step peak RSS above the loaded libraries: {(peak - base) / mib:.2f} x the model's weights "
        f"({peak - base:,.0f} MiB over {mib:,.0f} MiB fp32, checkpoint in {args.file_dtype}; {args.layers} blocks, "
        f"hidden {args.hidden}, 3 variants, r={args.rank}, perplexity batch {args.ppl_batch})"
    )


if __name__ == "__main__":
    main()
