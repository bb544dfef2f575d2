"""The quickstart's data, built from text every Python installation carries: no network, no third-party corpus.

- **Corpus**: the docstrings and comments of the standard library's ``.py`` sources, read with
  ``ast`` and ``tokenize`` (nothing is imported: some stdlib modules act on import). A document
  is a passage of one file's docstrings and comment blocks in source order (about 600 characters
  or more); the documents of all files are shuffled with a fixed seed and written as jsonl in
  SlimPajama's schema (``text`` + ``meta.redpajama_set_name``, here ``RedPajamaGithub``: text
  from code). Files go to the held-out split by a hash of their path, so the split is the same on
  every machine. The stdlib differs a little between Python versions, and so does the corpus;
  ``manifest.json`` records the version, the file and byte counts.
- **Tokenizer**: a sentencepiece BPE model trained on the training split, loaded back through
  transformers as a ``LlamaTokenizer``. It is trained without normalisation and without a dummy
  prefix (and the transformers side told ``add_prefix_space: false``), the settings under which
  sentencepiece and transformers give the same ids; the round trip is checked and a mismatch stops
  the run.
- **Toy task**: "which of four orders of these words completes this held-out docstring
  sentence", for lm-eval. It is a smoke test of the zero-shot path on local data, not a benchmark.

Every builder writes into a temporary sibling directory and renames it when complete, so a killed
run never leaves a half-written result that a second run would take as done.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import random
import re
import shutil
import sys
import sysconfig
import tokenize
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

CORPUS_FORMAT = "flexigpt-quickstart-corpus/1"
SUBSET = "RedPajamaGithub"  # SlimPajama's subset name for text that comes from code
# Folders of the stdlib whose files are test code or data rather than documented library code.
SKIP_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# Comment blocks that carry no prose: tool pragmas, separators, encoding cookies.
_NOISE = re.compile(r"^(!|-\*-|noqa|type:|pragma|fmt:|pylint|XXX$|[-=#*~_ ]*$)", re.IGNORECASE)


class QuickstartDataError(RuntimeError):
    """The corpus, tokenizer or task cannot be built as asked; the message says what to change."""


# -------------------------------------------------------------------------------------- corpus
def stdlib_root() -> Path:
    """The directory of the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[Path]:
    """Sorted ``.py`` files under `root`, without test suites and installed packages."""
    return sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts))


def extract_pieces(source: str, min_chars: int = 20) -> list[str]:
    """Docstrings and comment blocks of one Python source, in source order.

    Args:
        source: the file's text.
        min_chars: pieces shorter than this are dropped (``# done``, ``# py3``).

    Returns:
        The prose pieces of the file; empty when it has none.

    Raises:
        SyntaxError: the source does not parse (the caller skips such files).
    """
    tree = ast.parse(source)
    pieces: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                pieces.append((node.body[0].lineno, doc.strip()))
    block: list[str] = []
    start = last = -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            line, text = tok.start[0], tok.string.lstrip("#").strip()
            if line != last + 1 and block:  # a gap ends the block: comment paragraphs stay apart
                pieces.append((start, "\n".join(block)))
                block = []
            if not block:
                start = line
            if not _NOISE.match(text):
                block.append(text)
            last = line
    except (tokenize.TokenError, IndentationError):
        pass  # keep the comments read so far; ast already accepted the file
    if block:
        pieces.append((start, "\n".join(block)))
    pieces.sort(key=lambda p: p[0])
    return [text for _, text in pieces if len(text) >= min_chars]


def passages(pieces: Sequence[str], min_chars: int = 600) -> list[str]:
    """Consecutive pieces of one file joined (blank-line separated) into passages of `min_chars` or more.

    Documents of this size let the training stream be shuffled well: a whole file as one document
    would fill many consecutive training sequences with one module's vocabulary.
    """
    out: list[str] = []
    current: list[str] = []
    for piece in pieces:
        current.append(piece)
        if sum(len(p) for p in current) >= min_chars:
            out.append("\n\n".join(current))
            current = []
    if current:
        out.append("\n\n".join(current))
    return out


def is_heldout(relpath: str, percent: int) -> bool:
    """Whether a file belongs to the held-out split: a hash of its path, the same on every machine."""
    return int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) % 100 < percent


def build_corpus(
    out_dir: str | Path,
    *,
    heldout_percent: int = 8,
    max_train_files: int | None = None,
    max_heldout_files: int | None = None,
    root: Path | None = None,
    shards: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Extract the stdlib's prose into ``train/*.jsonl`` and ``heldout/*.jsonl`` plus ``manifest.json``.

    Args:
        out_dir: the corpus directory (must not exist yet; it is created by renaming a finished
            temporary directory).
        heldout_percent: share of the files (by path hash) that go to the held-out split.
        max_train_files: read at most this many source files for training (the first in path order);
            None: all.
        max_heldout_files: the same for the held-out split.
        root: the stdlib directory; None: the running Python's.
        shards: training jsonl files (documents dealt round-robin).
        seed: seed of the document shuffle.

    Returns:
        The manifest (Python version, file, document and byte counts per split).

    Raises:
        QuickstartDataError: no Python sources found, or a split came out empty.
    """
    out, root = Path(out_dir), root or stdlib_root()
    if out.exists():
        raise QuickstartDataError(f"{out} exists already; remove it to build it again")
    files = source_files(root)
    if not files:
        raise QuickstartDataError(f"no .py files under {root}; is this a Python with its standard library?")
    splits: dict[str, list[list[dict[str, Any]]]] = {"train": [], "heldout": []}  # documents per file
    limits = {"train": max_train_files, "heldout": max_heldout_files}
    skipped = 0
    for path in tqdm(files, desc="corpus: stdlib docstrings + comments", unit="file"):
        rel = path.relative_to(root).as_posix()
        split = "heldout" if is_heldout(rel, heldout_percent) else "train"
        if limits[split] is not None and len(splits[split]) >= limits[split]:
            continue
        try:
            with tokenize.open(path) as fh:  # honours the file's encoding cookie
                pieces = extract_pieces(fh.read())
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            skipped += 1  # e.g. lib2to3 fixtures in Python 2 syntax
            continue
        if pieces:
            meta = {"redpajama_set_name": SUBSET, "path": rel, "python": _python_version()}
            splits[split].append([{"text": text, "meta": meta} for text in passages(pieces)])
    for name, docs in splits.items():
        if not docs:
            raise QuickstartDataError(
                f"the {name} split is empty ({len(files)} files under {root}, heldout_percent={heldout_percent})"
            )
    tmp = _fresh_tmp(out)
    counts = {}
    for name, per_file in splits.items():
        docs = [d for file_docs in per_file for d in file_docs]
        # a fixed shuffle across files, so that the stream mixes modules from its first batch on
        random.Random(seed).shuffle(docs)
        counts[name] = (len(per_file), len(docs), sum(len(d["text"].encode()) for d in docs))
        n = shards if name == "train" else 1
        (tmp / name).mkdir()
        for i in range(n):
            part = docs[i::n]
            (tmp / name / f"part-{i:03d}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
    manifest = {
        "format": CORPUS_FORMAT,
        "python": _python_version(),
        "stdlib": str(root),
        "files_scanned": len(files),
        "files_skipped": skipped,
        "heldout_percent": heldout_percent,
        "note": "text of the running Python's standard library: it differs slightly between Python versions",
    }
    for name, (files_used, n_docs, n_bytes) in counts.items():
        manifest[name] = {
            "source_files": files_used,
            "documents": n_docs,
            "bytes": n_bytes,
            "files": f"{name}/*.jsonl",
        }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.rename(out)
    return manifest


def read_documents(pattern_dir: str | Path) -> Iterator[str]:
    """The texts of every ``*.jsonl`` file in a directory, in file then line order."""
    for f in sorted(Path(pattern_dir).glob("*.jsonl")):
        with f.open() as fh:
            for line in fh:
                yield json.loads(line)["text"]


def _python_version() -> str:
    return ".".join(str(x) for x in sys.version_info[:3])


def _fresh_tmp(out: Path) -> Path:
    if out.exists():
        raise QuickstartDataError(f"{out} exists already; remove it to build it again")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier attempt
    tmp.mkdir(parents=True)
    return tmp


# ------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(corpus_dir: str | Path, out_dir: str | Path, *, vocab_size: int = 4096) -> Path:
    """Train a sentencepiece BPE model on the training split; save it as a transformers tokenizer dir.

    Ids 0-2 are ``<unk>``, ``<s>``, ``</s>`` (LLaMA's layout); unknown characters fall back to bytes.

    Args:
        corpus_dir: a directory written by ``build_corpus``.
        out_dir: the tokenizer directory (must not exist yet).
        vocab_size: pieces in the vocabulary, the 256 byte pieces and 3 specials included.

    Returns:
        `out_dir`, loadable with ``AutoTokenizer.from_pretrained``.

    Raises:
        QuickstartDataError: the round trip through transformers does not give sentencepiece's ids.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    tmp = _fresh_tmp(out)
    lines = (
        line
        for text in read_documents(Path(corpus_dir) / "train")
        for line in text.split("\n")
        if line.strip()
    )
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=str(tmp / "sp"),
        vocab_size=vocab_size,
        model_type="bpe",
        # identity normalisation, kept whitespace and no dummy prefix: the settings under which
        # transformers' LlamaTokenizer reproduces sentencepiece's ids exactly (newlines and
        # leading spaces included)
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=200_000,
        shuffle_input_sentence=True,
        max_sentence_length=16384,
        num_threads=2,
        minloglevel=2,
    )
    (tmp / "sp.model").rename(tmp / "tokenizer.model")
    (tmp / "sp.vocab").unlink()
    (tmp / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_prefix_space": False}) + "\n"
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))  # adds tokenizer.json: the fast tokenizer every later step loads
    samples = list(read_documents(Path(corpus_dir) / "heldout"))[:20] + EDGE_CASES
    check_round_trip(tmp, samples)
    tmp.rename(out)
    return out


# Strings where sentencepiece and transformers part ways under other settings.
EDGE_CASES = ["  leading spaces\n\tand a tab", "\n\nnewlines first", "trailing  ", "ünï → 中文 ☃ 123456"]


def check_round_trip(tok_dir: str | Path, texts: Sequence[str]) -> None:
    """Require transformers to give sentencepiece's ids for `texts`, and decoding to give the texts back.

    Raises:
        QuickstartDataError: naming the first text that differs and where.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(Path(tok_dir) / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        want = sp.encode(text)
        if ids != want:
            k = next(
                (i for i, (a, b) in enumerate(zip(ids, want, strict=False)) if a != b),
                min(len(ids), len(want)),
            )
            raise QuickstartDataError(
                f"tokenizer round trip: transformers and sentencepiece disagree on {text[:60]!r} at token {k}: "
                f"{tok.convert_ids_to_tokens(ids[k : k + 3])} vs {[sp.id_to_piece(i) for i in want[k : k + 3]]}"
            )
        back = tok.decode(ids)
        if back != text:
            raise QuickstartDataError(f"tokenizer round trip: decode({text[:60]!r}) gave {back[:60]!r}")


# ------------------------------------------------------------------------------------ toy task
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(texts: Sequence[str], min_words: int = 8, max_words: int = 30) -> list[str]:
    """Prose sentences of the texts: one line after joining wrapped lines, `min_words`..`max_words` long."""
    out = []
    for text in texts:
        for para in text.split("\n\n"):
            if para.lstrip().startswith((">>>", "...")) or "    " in para:
                continue  # examples and code blocks are not prose
            for s in _SENTENCE.split(" ".join(para.split())):
                n = len(s.split())
                if min_words <= n <= max_words and s[0].isupper() and s.endswith("."):
                    out.append(s)
    return out


def continuation_docs(texts: Sequence[str], n_docs: int, *, n_choices: int = 4, seed: int = 0) -> list[dict]:
    """Documents of the toy task: the first half of a held-out sentence, its true second half and
    `n_choices` - 1 scrambles of the same words.

    Every choice has the same words and ends with the sentence's full stop, so neither length nor
    vocabulary gives the answer away; a model that has learnt some English word order picks the
    true order. (Other sentences' endings as distractors need more knowledge than a model trained
    for two minutes has: such a task stays at chance and tells the variants apart no better.)

    Returns:
        ``{"query", "choices", "label"}`` dicts for ``zeroshot.write_choice_task``.

    Raises:
        QuickstartDataError: the texts hold fewer than `n_docs` usable sentences.
    """
    rng = random.Random(seed)
    pool = sorted(set(sentences(texts)))
    rng.shuffle(pool)
    docs = []
    for sentence in pool:
        words = sentence[:-1].split()  # the full stop goes back on after scrambling
        cut = len(words) // 2
        end = words[cut:]
        true = " ".join(end) + "."
        choices = {true}
        for _ in range(20 * n_choices):
            if len(choices) == n_choices:
                break
            choices.add(" ".join(rng.sample(end, len(end))) + ".")
        if len(choices) < n_choices:
            continue  # too few distinct orders (repeated words)
        others = sorted(choices - {true})
        rng.shuffle(others)
        label = rng.randrange(n_choices)
        others.insert(label, true)
        docs.append({"query": " ".join(words[:cut]), "choices": others, "label": label})
        if len(docs) == n_docs:
            return docs
    raise QuickstartDataError(
        f"toy task: {len(docs)} usable held-out sentences, need {n_docs}; lower the task size"
    )
