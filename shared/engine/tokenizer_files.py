"""Saving a tokenizer beside a model so that other runtimes find every file they read.

transformers 5 saves a sentencepiece-based tokenizer (LLaMA-2, TinyLlama, Mistral) as
``tokenizer.json`` only. llama.cpp's ``convert_hf_to_gguf.py`` builds the GGUF vocabulary of
these models from the sentencepiece ``tokenizer.model`` (scores and token types included), so an
export without it converts badly or not at all. ``save_tokenizer`` writes what ``save_pretrained``
writes and, when the tokenizer was loaded from a directory holding a sentencepiece model, copies
that file as ``tokenizer.model`` too; a directory written here keeps it, so the file survives any
number of exports.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

SENTENCEPIECE_NAME = "tokenizer.model"


def sentencepiece_file(tokenizer: Any) -> Path | None:
    """The sentencepiece model the tokenizer was loaded from, when there is one on disk."""
    for candidate in (
        getattr(tokenizer, "vocab_file", None),
        getattr(tokenizer, "init_kwargs", {}).get("vocab_file"),
        Path(getattr(tokenizer, "name_or_path", "") or "/nonexistent") / SENTENCEPIECE_NAME,
    ):
        if candidate and str(candidate).endswith(".model") and Path(candidate).is_file():
            return Path(candidate)
    return None


def save_tokenizer(tokenizer: Any, directory: str | Path) -> list[Path]:
    """``tokenizer.save_pretrained(directory)``, plus ``tokenizer.model`` where the source had one.

    Returns:
        The files written.
    """
    d = Path(directory)
    written = [Path(p) for p in tokenizer.save_pretrained(d)]
    sp = sentencepiece_file(tokenizer)
    target = d / SENTENCEPIECE_NAME
    if sp is not None and not target.is_file():
        shutil.copyfile(sp, target)
        written.append(target)
    return written
