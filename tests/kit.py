"""Test helpers of the grow and prune commands: a word-level tokenizer, a small corpus, a source model on disk."""

from __future__ import annotations

import json
import random
from pathlib import Path

from flexigpt.shared.engine.tiny import tiny_model

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3: the tiny models use pad 0, bos 1, eos 2
DETS = ["the", "a", "one", "some"]
NOUNS = ["cat", "dog", "bird", "fish", "tree", "river", "stone", "house"]
VERBS = ["ran", "sat", "saw", "ate", "found", "took"]
PREPS = ["on", "under", "near", "with"]
ADJS = ["red", "blue", "green", "small", "big", "old", "new"]
WORDS = DETS + NOUNS + VERBS + PREPS + ADJS + ["and", "then", "."]


def write_tokenizer(d: Path, words: list[str] | None = None) -> Path:
    """A word-level fast tokenizer over `words` (default WORDS; ids < 128, so it fits the tiny models'
    vocab), after the special tokens at ids 0-3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + (WORDS if words is None else words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(d)
    return d


def write_corpus(d: Path, n_docs: int = 120, n_files: int = 2, seed: int = 0) -> Path:
    """Short documents of a tiny grammar in jsonl files (SlimPajama's `text` field)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = [
            f"{rng.choice(DETS)} {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"{rng.choice(PREPS)} the {rng.choice(NOUNS)} ."
            for _ in range(rng.randint(2, 8))
        ]
        docs.append({"text": " and then ".join(sents)})
    for i in range(n_files):
        (d / f"part{i}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs[i::n_files]))
    return d


def write_workspace(root: Path, num_layers: int, arch: str = "llama2") -> dict[str, Path]:
    """Tokenizer, corpus and a `num_layers`-layer tiny source model (hidden 32; LLaMA-2 unless `arch`
    names another of ``tiny.TINY_ARCHS``) under `root`."""
    tiny_model(arch, num_layers=num_layers, hidden=32, heads=4).save_pretrained(root / "model")
    return {
        "tok": write_tokenizer(root / "tok"),
        "corpus": write_corpus(root / "corpus"),
        "model": root / "model",
    }


def workspace_overrides(ws: dict[str, Path], out: Path, *extra: str, eval_files: bool = False) -> list[str]:
    """Overrides that point a local-tiny recipe at a workspace and an output directory.

    Args:
        ws: from ``write_workspace``.
        out: ``output_dir``.
        extra: further overrides, applied last.
        eval_files: also evaluate on the workspace corpus (``data.eval.files``).
    """
    return [
        f"model.source={ws['model']}",
        f"model.tokenizer={ws['tok']}",
        f"data.files=[{ws['corpus']}/*.jsonl]",
        *([f"data.eval.files=[{ws['corpus']}/*.jsonl]"] if eval_files else []),
        f"output_dir={out}",
        *extra,
    ]
