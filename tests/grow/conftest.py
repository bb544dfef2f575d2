"""Local fixtures of the grow tests: a word-level tokenizer, a small corpus, tiny source models on disk."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from flexigpt.shared.tiny import tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3: the tiny models use pad 0, bos 1, eos 2
DETS = ["the", "a", "one", "some"]
NOUNS = ["cat", "dog", "bird", "fish", "tree", "river", "stone", "house"]
VERBS = ["ran", "sat", "saw", "ate", "found", "took"]
PREPS = ["on", "under", "near", "with"]
ADJS = ["red", "blue", "green", "small", "big", "old", "new"]
WORDS = DETS + NOUNS + VERBS + PREPS + ADJS + ["and", "then", "."]


def write_tokenizer(d: Path) -> Path:
    """A word-level fast tokenizer over WORDS (ids < 128, so it fits the tiny models' vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
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


@pytest.fixture(scope="session")
def grow_workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizer, corpus and a 4-layer tiny LLaMA-2 source model, written once per session."""
    root = tmp_path_factory.mktemp("grow_ws")
    tiny_model("llama2", num_layers=4, hidden=32, heads=4).save_pretrained(root / "model")
    return {
        "tok": write_tokenizer(root / "tok"),
        "corpus": write_corpus(root / "corpus"),
        "model": root / "model",
    }


def local_overrides(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Overrides that point recipes/grow/local-tiny.yaml at a workspace and an output directory."""
    return [
        f"model.source={ws['model']}",
        f"model.tokenizer={ws['tok']}",
        f"data.files=[{ws['corpus']}/*.jsonl]",
        f"output_dir={out}",
        *extra,
    ]
