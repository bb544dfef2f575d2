"""Pruning a 7B / 8B model on one ordinary machine: the pruning step with ``prune.memory: per_block``.

A model of LLaMA-2-7B's shape (32 blocks, hidden 4096, MLP 11008, 32 heads, vocab 32000; 6.74B
parameters, 13.5 GB in bf16) or LLaMA-3-8B's (MLP 14336, 8 KV heads, vocab 128256; 8.03B, 16.1 GB)
is written to disk with random bf16 weights, shard by shard (one 2 GB shard in memory at a time,
never the model). The random weights make the scores and perplexities meaningless; the memory and
time are those of the real shapes. The tokenizer is LLaMA-2's 32k sentencepiece model for both (the
8B's ids simply stay below 32000).

``flexigpt-prune --prune-only`` then runs in a subprocess in the per-block mode: block-influence
importance on 8 x 256 WikiText-2 valid tokens (one batch, carried block by block), 30% (10 of 32
blocks) removed, base selection at r = 256 with the randomized SVD (``prune.selection.svd:
randomized``), the three variants at r = 256 with randomized SVD adapter init (``prune.replace.svd:
randomized``; exact SVDs take ~44 s per 4096 x 11008 matrix on this kind of CPU, 70 of them for the
adapters and 224 for the selection), gamma fixed at 0.01, start perplexities on 2 x 1024 WikiText-2
test tokens. To stay within the disk the variants are built by three runs of the same command on
one output directory (the second and third reuse the importance, selection and source perplexity
files), each variant's files deleted once measured.

A thread samples the child's ``/proc/<pid>/status`` every 50 ms (RssAnon: its own memory; RssFile:
mapped file pages, the safetensors being read) and credits each sample to the step named by the
command's latest log line; ``ru_maxrss`` of the children is printed too. A JSON line with every
figure ends the output (``--json PATH`` also writes it).

Needs ``shared/data`` beside the checkout (LLaMA-2 tokenizer, WikiText-2); prints "skipped" without
it. About 15 GB of disk for the 7B source plus up to 19 GB of outputs (8B: 16 + 23 GB); deleted at
the end. Run:
``OMP_NUM_THREADS=2 python benchmarks/bench_prune_stream.py --shape 7b`` (``--layers 4`` for a
quick run of the same shape with fewer blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SHAPES = {
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}
SHARD = 2 * 10**9


def write_model(folder: Path, shape: str, layers: int) -> tuple[int, int]:
    """A random bf16 LLaMA of `shape` in `folder`, written shard by shard; (parameters, bytes)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        num_hidden_layers=layers, max_position_embeddings=4096, torch_dtype="bfloat16", **SHAPES[shape]
    )
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    h, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    names = [("model.embed_tokens.weight", (v, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (m, h)),
            (p + "mlp.up_proj.weight", (m, h)),
            (p + "mlp.down_proj.weight", (h, m)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    g = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shp in names:
        n = torch.Size(shp).numel() * 2
        if size + n > SHARD and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    shapes = dict(names)
    weight_map, total, params = {}, 0, 0
    for k, keys in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in keys:
            shp = shapes[name]
            t = (
                torch.ones(shp)
                if len(shp) == 1
                else torch.randn(shp, generator=g, dtype=torch.bfloat16).mul_(0.02)
            )
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = fname
            total += tensors[name].numel() * 2
            params += tensors[name].numel()
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return params, total


def status(pid: int) -> tuple[float, float]:
    """(RssAnon, RssFile) of process `pid` in MiB (zeros once it is gone)."""
    fields = {"RssAnon": 0.0, "RssFile": 0.0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in fields:
                fields[k] = int(v.split()[0]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields["RssAnon"], fields["RssFile"]


STEP_LINES = ("reading ", "importance:", "removing", "selection:", "start perplexity", "[")


def step_of(line: str) -> str | None:
    """The step a log line of the prune command starts (what runs until the next such line), or None."""
    if not line.startswith(STEP_LINES) or "%|" in line:  # the recipe echo is indented; tqdm bars
        return None
    return line.strip().split(" -> ")[0][:44]


def run(cmd: list[str], env: dict[str, str], label: str, peaks: dict, times: dict) -> int:
    """Run the command, sampling its memory per step (keyed ``label: step``); returns its exit code."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = {"step": f"{label}: start, imports", "t": time.perf_counter()}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            anon, file = status(proc.pid)
            p = peaks.setdefault(state["step"], [0.0, 0.0, 0.0])
            p[0], p[1], p[2] = max(p[0], anon), max(p[1], file), max(p[2], anon + file)
            time.sleep(0.05)

    def switch(step: str) -> None:
        now = time.perf_counter()
        times[state["step"]] = times.get(state["step"], 0.0) + now - state["t"]
        state["step"], state["t"] = f"{label}: {step}", now

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        step = step_of(line)
        if step:
            switch(step)
    code = proc.wait()
    switch("end")
    done.set()
    thread.join()
    return code


def arithmetic_70b(shard_bytes: int, rank: int) -> str:
    """Upper bounds of the per-block step's memory for LLaMA-2-70B (80 blocks), from its shapes alone."""
    h, m, v, kv, n = 8192, 28672, 32000, 1024, 80
    block = (2 * h * h + 2 * kv * h + 3 * m * h) * 2  # bf16
    top = 2 * v * h * 2
    svd = 2 * m * h * 4  # one fp32 W_removed - W_base (or a matrix being factored) and its factors
    factors = n * (2 * (h + h) + 2 * (kv + h) + 3 * (m + h)) * rank * 4  # every block's fp32 rank-r factors
    selection = top + factors + block + svd
    build = top + 2 * block + svd + 2 * shard_bytes
    return (
        f"LLaMA-2-70B by arithmetic (bf16, r={rank}), above the libraries: selection = top modules "
        f"{top / 2**30:.1f} GiB + all blocks' rank-r factors {factors / 2**30:.1f} GiB + one block "
        f"{block / 2**30:.2f} GiB + fp32 SVD workspace {svd / 2**30:.2f} GiB = {selection / 2**30:.1f} GiB; building "
        f"= top + two blocks + SVD workspace + a shard being written and its serialised copy "
        f"(2 x {shard_bytes / 2**30:.1f} GiB) = {build / 2**30:.1f} GiB"
    )


def _steps(peaks: dict[str, list[float]], times: dict[str, float]) -> dict[str, dict[str, float]]:
    return {
        k: {"rss_anon": round(p[0]), "rss_total": round(p[2]), "s": round(times.get(k, 0), 1)}
        for k, p in peaks.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where the model and runs go (default: a temp dir)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here (after every run)")
    ap.add_argument(
        "--ppl-tokens", type=int, default=2048, help="start-perplexity tokens (windows of <= 1024)"
    )
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a model this script wrote earlier (--shape must match; kept)",
    )
    ap.add_argument(
        "--importance",
        type=Path,
        default=None,
        help="importance.json of an earlier run on that model with the same calibration: put into the output "
        "directory, which the command then reuses as on any rerun (the importance step is not measured)",
    )
    args = ap.parse_args()
    if not (DATA / "tokenizers" / "llama2-32k.model").is_file():
        print(f"skipped: {DATA} not found")
        return
    from flexigpt.shared.evaluate.perplexity import load_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-prune-stream-", dir=args.workdir))
    figures: dict = {"shape": args.shape, "layers": args.layers, "rank": args.rank}
    peaks: dict[str, list[float]] = {}
    times: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        if args.model is None:
            params, nbytes = write_model(root / "model", args.shape, args.layers)
            model_dir = root / "model"
        else:
            model_dir = args.model
            nbytes = json.loads((model_dir / "model.safetensors.index.json").read_text())["metadata"][
                "total_size"
            ]
            params = nbytes // 2
        figures["write_s"] = round(time.perf_counter() - t0, 1)
        figures["params"], figures["model_gib_bf16"] = params, round(nbytes / 2**30, 2)
        load_tokenizer(DATA / "tokenizers" / "llama2-32k.model").save_pretrained(root / "tok")
        print(
            f"{'wrote' if args.model is None else 'reusing'} {params:,} parameters ({nbytes / 2**30:.2f} GiB bf16) in {figures['write_s']} s",
            flush=True,
        )
        wiki = DATA / "wikitext-2"
        base = [
            sys.executable,
            "-m",
            "flexigpt.prune",
            str(REPO / "recipes" / "prune" / "local-tiny.yaml"),
            f"model.source={model_dir}",
            f"model.tokenizer={root / 'tok'}",
            "model.dtype=bfloat16",
            "model.attn_implementation=sdpa",
            f"data.files=[{wiki / 'valid.txt'}]",
            "data.txt_sample_by=line",
            "data.seq_len=256",
            f"data.eval.files=[{wiki / 'test.txt'}]",
            f"prune.perplexity={{files: [{wiki / 'test.txt'}], max_tokens: {args.ppl_tokens}, "
            f"context_len: {min(1024, args.ppl_tokens)}, stride: {min(1024, args.ppl_tokens)}, batch_size: 1}}",
            "prune.calibration.num_samples=8",
            "prune.calibration.seq_len=256",
            f"prune.selection.rank={args.rank}",
            "prune.selection.svd=randomized",
            f"prune.replace.rank={args.rank}",
            "prune.replace.svd=randomized",
            "prune.memory=per_block",
            "prune.device=cpu",
            f"output_dir={root / 'run'}",
            "--prune-only",
        ]
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        if args.importance is not None:
            (root / "run").mkdir()
            shutil.copy(args.importance, root / "run" / "importance.json")
            figures["importance"] = f"reused from {args.importance}"
        summaries = {}
        for variant in ("flexigpt", "shortgpt", "shortgpt_lora"):
            t = time.perf_counter()
            code = run([*base, f"prune.variants=[{variant}]"], env, variant, peaks, times)
            figures[f"{variant}_run_s"] = round(time.perf_counter() - t, 1)
            if code != 0:
                raise SystemExit(f"flexigpt-prune exited {code} for variant {variant}")
            summaries[variant] = json.loads((root / "run" / "summary.json").read_text())
            vdir = root / "run" / variant
            files = [f for f in vdir.rglob("*.safetensors")]
            figures[f"{variant}_files_gib"] = round(sum(f.stat().st_size for f in files) / 2**30, 2)
            figures[f"{variant}_shards"] = len(files)
            figures[f"{variant}_start_ppl"] = summaries[variant]["variants"][variant]["start_ppl"]
            shutil.rmtree(vdir)
            if args.json:  # what is measured so far survives a run stopped later
                partial = {**figures, "steps": _steps(peaks, times), "load_average": os.getloadavg()}
                args.json.write_text(json.dumps(partial, indent=1) + "\n")
        figures["source_start_ppl"] = summaries["flexigpt"]["source"]["start_ppl"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"\n{'step (from the log line that started it)':<46} {'RssAnon':>9} {'RssFile':>9} {'total':>9} MiB {'wall s':>8}"
    )
    for step, (anon, file, total) in peaks.items():
        print(f"{step[:46]:<46} {anon:>9,.0f} {file:>9,.0f} {total:>9,.0f}     {times.get(step, 0.0):>8.1f}")
    figures["peak_rss_anon_mib"] = round(max(p[0] for p in peaks.values()))
    figures["peak_rss_anon_file_mib"] = round(max(p[2] for p in peaks.values()))
    figures["ru_maxrss_children_mib"] = round(maxrss)
    figures["steps"] = _steps(peaks, times)
    figures["load_average"] = os.getloadavg()
    figures["threads"] = os.environ.get("OMP_NUM_THREADS")
    figures["settings"] = (
        f"per_block, bf16, 8 x 256 calibration tokens, 10 of 32 removed, r={args.rank}, selection.svd=randomized, "
        f"replace.svd=randomized, gamma 0.01, ppl on {args.ppl_tokens} tokens (windows <= 1024), sdpa"
    )
    print(arithmetic_70b(SHARD, args.rank))
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
