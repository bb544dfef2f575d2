"""Builders for trainer and data tests: a tiny fast tokenizer, a SlimPajama-schema corpus, a tiny
shared-block model on disk, and a recipe that trains it. Everything is made locally and seeded."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec

SUBSETS = ("RedPajamaC4", "RedPajamaWikipedia", "RedPajamaBook")
_WORDS = [
    "the",
    "a",
    "one",
    "some",
    "every",
    "cat",
    "dog",
    "bird",
    "fish",
    "mouse",
    "horse",
    "tree",
    "river",
    "stone",
    "house",
    "ran",
    "sat",
    "saw",
    "ate",
    "found",
    "took",
    "gave",
    "made",
    "on",
    "under",
    "near",
    "over",
    "with",
    "red",
    "blue",
    "green",
    "small",
    "big",
    "old",
    "new",
    "fast",
    "slow",
    "and",
    "then",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3: the tiny models use pad 0, bos 1, eos 2
REPO_ROOT = Path(__file__).resolve().parents[3]


def sentence(rng: random.Random) -> str:
    """A short sentence of a tiny grammar: learnable, so the loss of a small model falls fast."""
    n = rng.choice(_WORDS[4:14])
    return f"{rng.choice(_WORDS[:4])} {rng.choice(_WORDS[24:30])} {n} {rng.choice(_WORDS[14:20])} {rng.choice(_WORDS[20:24])} the {rng.choice(_WORDS[4:14])} ."


def documents(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` documents in SlimPajama's schema (text + meta.redpajama_set_name), with distinct lengths."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = f"doc {i} : " + " ".join(sentence(rng) for _ in range(rng.randint(2, 12)))
        docs.append({"text": text, "meta": {"redpajama_set_name": SUBSETS[i % len(SUBSETS)]}})
    return docs


def write_corpus(
    d: Path, fmt: str = "jsonl", n_docs: int = 400, n_files: int = 4, seed: int = 0
) -> list[Path]:
    """Write `n_docs` documents round-robin into `n_files` files of format jsonl | jsonl.zst | parquet | txt."""
    d.mkdir(parents=True, exist_ok=True)
    docs = documents(n_docs, seed)
    parts = [docs[i::n_files] for i in range(n_files)]
    paths = []
    for i, part in enumerate(parts):
        p = d / f"part{i:02d}.{fmt}"
        if fmt == "jsonl":
            p.write_text("".join(json.dumps(x) + "\n" for x in part))
        elif fmt == "jsonl.zst":
            import zstandard

            p.write_bytes(
                zstandard.ZstdCompressor().compress("".join(json.dumps(x) + "\n" for x in part).encode())
            )
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(part), p)
        elif fmt == "txt":
            p.write_text("\n\n".join(x["text"] for x in part) + "\n")
        else:
            raise ValueError(fmt)
        paths.append(p)
    return paths


def make_tokenizer(d: Path, vocab: int = 128) -> Path:
    """Train a word-piece-free BPE of `vocab` ids on the tiny grammar; save it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False)
    rng = random.Random(1)
    tok.train_from_iterator([sentence(rng) + f" doc {i} :" for i in range(2000)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    assert fast.eos_token_id == 2 and len(fast) <= vocab
    fast.save_pretrained(d)
    return d


def make_model(d: Path, num_layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny seeded LLaMA saved as a plain HF directory."""
    from flexigpt.shared.engine.tiny import tiny_model

    model = tiny_model("llama2", num_layers=num_layers, hidden=hidden, heads=4, vocab=128, seed=seed)
    model.save_pretrained(d)
    return d


def shared_plan(num_layers: int = 4, reuse: tuple[int, ...] = (1, 2), rank: int = 4) -> Plan:
    """Slots [0..L-1] + `reuse`: the reused blocks run twice; the copies get rank-`rank` adapters and output norms."""
    slots = [SlotSpec(block=i) for i in range(num_layers)]
    slots += [
        SlotSpec(block=b, adapter=AdapterSpec(rank=rank), out_norm=OutNormSpec(gamma=0.1)) for b in reuse
    ]
    return Plan("llama", num_layers, tuple(slots))


def workspace(root: Path, fmt: str = "jsonl", n_docs: int = 400) -> dict[str, Path]:
    """Tokenizer, corpus, model and plan under `root` (reused if already there)."""
    paths = {
        "tok": root / "tok",
        "corpus": root / "corpus",
        "model": root / "model",
        "plan": root / "plan.json",
    }
    if not paths["plan"].is_file():
        make_tokenizer(paths["tok"])
        write_corpus(paths["corpus"], fmt, n_docs)
        write_corpus(root / "heldout", fmt, 64, n_files=1, seed=99)
        make_model(paths["model"])
        shared_plan().save(paths["plan"])
    paths["heldout"] = root / "heldout"
    return paths


def recipe_dict(ws: dict[str, Path], out: Path, **train: Any) -> dict[str, Any]:
    """The dict of a small train recipe over workspace `ws` (train fields overridable)."""
    t = {
        "trainable": "adapters+norms",
        "ds_config": "ds_configs/zero2.json",
        "micro_batch": 2,
        "grad_accum": 2,
        "lr": 1e-2,
        "warmup_steps": 2,
        "max_steps": 8,
        "log_every": 2,
        "checkpoint_every": 4,
        "keep_last": 2,
        "export": "none",
    }
    t.update(train)
    return {
        "kind": "train",
        "model": {
            "source": str(ws["model"]),
            "tokenizer": str(ws["tok"]),
            "plan": str(ws["plan"]),
            "attn_implementation": "eager",
        },
        "data": {
            "source": "files",
            "files": [str(ws["corpus"] / "*")],
            "seq_len": 32,
            "shuffle_buffer": 16,
            "tokenize_batch": 8,
            "seed": 0,
        },
        "train": t,
        "output_dir": str(out),
    }


def write_recipe(path: Path, d: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path
