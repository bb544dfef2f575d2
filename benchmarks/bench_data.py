"""Data pipeline throughput: local jsonl -> ``datasets`` stream -> LLaMA-2 fast tokenizer -> packing
-> shuffle buffer -> micro-batches (``PackedLoader``), in tokens per second per core.

The corpus is WikiText-2 (valid + test, split into paragraphs) written as SlimPajama-schema jsonl
and read for several epochs. One process with the Rust tokenizer limited to one thread is one
core; the same pipeline with 2 worker processes is measured too (tokens/s divided by the workers).
The tokenizer alone on the same documents is the reference for the pipeline's own overhead.

    python benchmarks/bench_data.py [--tokens 3000000] [--repeats 3]
"""

from __future__ import annotations

import os

# One Rust thread per process: "per core" means what one core does (set before tokenizers loads).
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _setup(d: Path) -> tuple[Path, Path, list[str]]:
    from transformers import AutoTokenizer

    tok_dir = d / "tok"
    tok_dir.mkdir()
    shutil.copy(DATA / "tokenizers" / "llama2-32k.model", tok_dir / "tokenizer.model")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = AutoTokenizer.from_pretrained(tok_dir)  # converted to the fast (Rust) tokenizer
    assert tok.is_fast
    fast_dir = d / "tok_fast"
    tok.save_pretrained(fast_dir)
    text = "".join((DATA / "wikitext-2" / f).read_text() for f in ("valid.txt", "test.txt"))
    docs = [p for p in text.split("\n \n") if p.strip()]
    corpus = d / "corpus"
    corpus.mkdir()
    names = ("RedPajamaWikipedia", "RedPajamaC4")
    for i in range(4):
        with open(corpus / f"part{i}.jsonl", "w") as f:
            for j, p in enumerate(docs[i::4]):
                f.write(json.dumps({"text": p, "meta": {"redpajama_set_name": names[j % 2]}}) + "\n")
    return fast_dir, corpus, docs


def _pipeline(tok, corpus: Path, tokens: int, workers: int) -> float:
    from flexigpt.shared.recipe import DataSection
    from flexigpt.shared.train.data import PackedLoader

    cfg = DataSection(
        source="files",
        files=[str(corpus / "*.jsonl")],
        seq_len=2048,
        shuffle_buffer=64,
        num_workers=workers,
        tokenize_batch=64,
    )
    loader = PackedLoader(cfg, tok, rank=0, world_size=1, micro_batch=8)
    try:
        loader.next_batch()  # start-up (file resolution, workers) is not throughput
        n, t0 = 0, time.perf_counter()
        while n < tokens:
            n += loader.next_batch().numel()
        return n / (time.perf_counter() - t0)
    finally:
        loader.close()


def _tokenizer_only(tok, docs: list[str]) -> float:
    backend = tok.backend_tokenizer
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(docs), 64):
        n += sum(
            len(e.ids) + 1 for e in backend.encode_batch_fast(docs[i : i + 64], add_special_tokens=False)
        )
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=3_000_000, help="tokens per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (DATA / "tokenizers" / "llama2-32k.model").is_file():
        print(f"skipped: shared data not found at {DATA}")
        return
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        fast_dir, corpus, docs = _setup(tmp)
        tok = AutoTokenizer.from_pretrained(fast_dir)
        one, two, ref = [], [], []
        for _ in range(args.repeats):  # interleaved: tokenizer alone, 1 core, 2 workers
            ref.append(_tokenizer_only(tok, docs))
            one.append(_pipeline(tok, corpus, args.tokens, 0))
            two.append(_pipeline(tok, corpus, args.tokens, 2) / 2)
        n_tok = sum(
            len(e.ids) + 1 for e in tok.backend_tokenizer.encode_batch_fast(docs, add_special_tokens=False)
        )
        print(f"corpus: WikiText-2 valid+test, {len(docs)} documents, {n_tok:,} LLaMA-2 tokens per epoch, 4 jsonl files; "
              f"seq_len 2048, shuffle buffer 64, micro batch 8, {os.cpu_count()} cores")  # fmt: skip
        print(f"tokenizer alone (1 thread): median {statistics.median(ref):,.0f} tokens/s "
              f"(range {min(ref):,.0f}-{max(ref):,.0f}); pipeline / tokenizer: {statistics.median(one) / statistics.median(ref):.2f}")  # fmt: skip
        print(f"pipeline, 2 worker processes: median {statistics.median(two):,.0f} tokens/s per worker "
              f"(range {min(two):,.0f}-{max(two):,.0f})")  # fmt: skip
        print(f"data pipeline (jsonl -> tokenise -> pack -> shuffle), 1 core: median {statistics.median(one):,.0f} tokens/s "
              f"(range {min(one):,.0f}-{max(one):,.0f}, {args.repeats} runs of {args.tokens:,} tokens); target >= 250,000")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
