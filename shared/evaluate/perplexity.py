"""Perplexity of a causal LM on a token stream, with the standard sliding-window recipe.

The stream is cut into windows of ``context_len`` tokens whose starts are ``stride`` apart (the
recipe of the transformers perplexity guide). Every token is scored exactly once, in the first
window that ends at or after it, so a token past the first window sees at least
``context_len - stride`` tokens of context (a token of the first window sees all the tokens
before it). A token is only scored when it has at least one token of context in its window: with ``stride < context_len`` that leaves out only the
first token of the stream; with ``stride == context_len`` (disjoint windows) the first token of
every window. ``PerplexityResult.tokens`` is the exact count of scored tokens.

Works on any ``*ForCausalLM`` that returns ``.logits``: shared models (``engine.apply_plan``,
``checkpoint.load_compact``), materialised models and plain transformers models.

``sample_perplexity`` scores sequences that were cut beforehand (calibration samples, as the prune
command's importance metric and gamma calibration use them) by the same recipe: every row is a
stream of its own with one window as long as the row (``stride == context_len``), so it is the plain
next-token loss of each row. Both entry points share the scoring loop below; there is no other
perplexity in the package.

Token sources: ``encode_documents`` (any iterable of texts), ``file_documents`` (local files: a
``.txt`` file is one document; jsonl / parquet go through ``data.open_documents``) and
``stream_documents`` (a ``recipe.StreamSection``, e.g. a held-out SlimPajama split).
"""

from __future__ import annotations

import glob
import inspect
import json
import math
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

DEFAULT_MAX_CONTEXT = 2048  # the paper's (presumed) training length; also the cap of context_len=None


@dataclass(frozen=True)
class Window:
    """One forward pass of the sliding-window recipe."""

    begin: int
    """First token of the window in the stream."""
    end: int
    """One past the last token of the window."""
    targets: int
    """The last `targets` tokens of the window are scored."""

    @property
    def length(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one model on one token stream, with the settings that produced it."""

    ppl: float
    """exp(nll)."""
    nll: float
    """Mean negative log-likelihood per scored token, in nats."""
    tokens: int
    """Number of scored tokens."""
    context_len: int
    """Window length in tokens."""
    stride: int
    """Distance between window starts in tokens."""
    windows: int
    """Forward passes (windows) run."""
    stream_tokens: int
    """Length of the token stream."""

    def summary(self) -> str:
        """One line with the result and the settings it depends on."""
        return (
            f"ppl {self.ppl:.2f} (nll {self.nll:.4f}/token over {self.tokens} tokens; "
            f"context_len {self.context_len}, stride {self.stride}, {self.windows} windows)"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerplexityResult:
        return cls(**d)


def sliding_windows(n_tokens: int, context_len: int, stride: int) -> list[Window]:
    """The windows of the recipe over a stream of `n_tokens` tokens.

    Args:
        n_tokens: length of the stream.
        context_len: window length (>= 2).
        stride: distance between window starts, 1..context_len.

    Returns:
        Windows in stream order; windows with nothing to score are left out.

    Raises:
        ValueError: bad context_len or stride (the message names it and the allowed range).
    """
    if context_len < 2:
        raise ValueError(f"context_len={context_len}: must be >= 2 (a token needs one token of context)")
    if not 1 <= stride <= context_len:
        raise ValueError(f"stride={stride}: allowed 1..context_len ({context_len})")
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + context_len, n_tokens)
        # New tokens of this window, but never the window's first (it has no context here).
        targets = min(end - prev_end, end - begin - 1)
        if targets > 0:
            out.append(Window(begin, end, targets))
        prev_end = end
        if end == n_tokens:
            break
    return out


def resolve_context(model: nn.Module, context_len: int | None, stride: int | None) -> tuple[int, int]:
    """Fill in defaults and check the window settings against the model's position limit.

    ``context_len=None`` means the model's ``max_position_embeddings`` capped at 2048;
    ``stride=None`` means half the context (each token then sees at least context_len/2 tokens).

    Raises:
        ValueError: context_len exceeds the model's position limit, or stride is out of range.
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context_len is None:
        context_len = min(DEFAULT_MAX_CONTEXT, limit or DEFAULT_MAX_CONTEXT)
    if limit is not None and context_len > limit:
        raise ValueError(
            f"context_len={context_len} exceeds the model's max_position_embeddings ({limit}); allowed 2..{limit}"
        )
    if stride is None:
        stride = max(1, context_len // 2)
    sliding_windows(0, context_len, stride)  # validates both
    return context_len, stride


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor | Sequence[int],
    *,
    context_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Sliding-window perplexity of `model` on one token stream.

    Args:
        model: a causal LM returning ``.logits`` (plain, shared or materialised).
        tokens: the stream, a 1-D sequence of token ids.
        context_len: window length; None: the model's position limit capped at 2048.
        stride: distance between window starts (1..context_len); None: context_len // 2.
        batch_size: windows per forward pass (windows of equal shape are batched together).
        progress: show a tqdm bar over windows.
        desc: label of the progress bar.

    Returns:
        The perplexity with the settings and token counts that produced it.

    Raises:
        ValueError: bad settings, batch_size < 1, or a stream with no token to score.
    """
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    context_len, stride = resolve_context(model, context_len, stride)
    windows = sliding_windows(len(ids), context_len, stride)
    if not windows:
        raise ValueError(f"the token stream has {len(ids)} tokens; perplexity needs at least 2")
    pieces = [(ids, w) for w in windows]
    return _score(model, pieces, batch_size, progress, desc, (context_len, stride, len(ids)))


@torch.no_grad()
def sample_perplexity(
    model: nn.Module,
    samples: Iterable[torch.Tensor],
    *,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of token sequences cut beforehand (calibration samples), by the recipe above.

    Every row of every sample is a stream of its own, scored with one window as long as the row
    (``context_len == stride``, the disjoint-window case): each token but the row's first is scored
    once, with all the tokens before it in the row as context, i.e. the next-token loss of the row
    without padding. On rows of one length T this is ``perplexity`` of the rows joined into one
    stream with ``context_len = stride = T``.

    Args:
        model: a causal LM returning ``.logits``.
        samples: token-id tensors of shape (T,) or (B, T), no padding; rows may differ in length
            (rows of fewer than 2 tokens have nothing to score and are skipped).
        batch_size: rows per forward pass (rows of equal length are batched together).
        progress: show a tqdm bar over rows.
        desc: label of the progress bar.

    Returns:
        The perplexity; ``context_len`` is the longest row, ``stride`` equals it, ``windows`` counts
        the rows scored and ``stream_tokens`` the tokens of every row.

    Raises:
        ValueError: a sample is not an integer tensor of shape (T,) or (B, T), batch_size < 1, or
            no row has 2 tokens.
    """
    rows = [row for k, ids in enumerate(samples) for row in token_rows(ids, k)]
    pieces = [
        (row, w) for row in rows if len(row) >= 2 for w in sliding_windows(len(row), len(row), len(row))
    ]
    if not pieces:
        raise ValueError("samples: perplexity needs sequences of at least 2 tokens")
    longest = max(w.length for _, w in pieces)
    return _score(model, pieces, batch_size, progress, desc, (longest, longest, sum(len(r) for r in rows)))


def token_rows(ids: Any, index: int = 0) -> torch.Tensor:
    """A calibration sample as a (B, T) LongTensor of rows.

    Raises:
        ValueError: `ids` (``samples[index]``) is not an integer tensor of shape (T,) or (B, T).
    """
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dtype not in (torch.int64, torch.int32)
        or ids.dim() not in (1, 2)
    ):
        raise ValueError(
            f"samples[{index}]: expected an integer token-id tensor of shape (T,) or (B, T), got "
            f"{type(ids).__name__} {getattr(ids, 'dtype', '')} {tuple(getattr(ids, 'shape', ()))}"
        )
    return ids.long().reshape(-1, ids.shape[-1])


def _score(
    model: nn.Module,
    pieces: list[tuple[torch.Tensor, Window]],
    batch_size: int,
    progress: bool,
    desc: str,
    settings: tuple[int, int, int],
) -> PerplexityResult:
    """Score the windows of every (token row, window) piece; `settings` is (context_len, stride,
    stream tokens), reported as they are."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    device = next(model.parameters()).device
    # Ask for the logits of the scored positions only (the vocabulary projection dominates the
    # memory of a window with a 32k vocabulary); models without the argument return them all.
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    groups: dict[tuple[int, int], list[tuple[torch.Tensor, Window]]] = defaultdict(list)
    for src, w in pieces:
        groups[(w.length, w.targets)].append((src, w))
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(total=len(pieces), desc=desc, unit="window", disable=not progress)
    try:
        for (_length, targets), group in groups.items():
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                batch = torch.stack([src[w.begin : w.end] for src, w in chunk]).to(device)
                total_nll += _window_nll(model, batch, targets, keep_arg)
                total_tokens += targets * len(chunk)
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    nll = total_nll / total_tokens
    context_len, stride, stream_tokens = settings
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=total_tokens,
        context_len=context_len,
        stride=stride,
        windows=len(pieces),
        stream_tokens=stream_tokens,
    )


def _window_nll(model: nn.Module, batch: torch.Tensor, targets: int, keep_arg: bool) -> float:
    """Summed NLL of the last `targets` tokens of every row of `batch` (float64 accumulation)."""
    kwargs: dict[str, Any] = {"input_ids": batch, "use_cache": False}
    if keep_arg:
        kwargs["logits_to_keep"] = targets + 1
    logits = model(**kwargs).logits
    # logits at position t predict token t + 1: positions L-targets-1 .. L-2 score the last `targets`.
    logits = logits[:, -(targets + 1) : -1].float()
    labels = batch[:, -targets:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    return float(nll.double().sum())


# ------------------------------------------------------------------------------------- tokens
def encode_documents(
    documents: Iterable[str],
    tokenizer: Any,
    *,
    max_tokens: int | None = None,
    add_bos: bool = False,
    eos_between_docs: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Tokenise documents into one stream by the text rule: BOS before each (optional), EOS between them.

    Pass the run's ``shared.text.TextRule`` as ``add_bos=rule.bos, eos_between_docs=rule.eos_between_docs``
    so the stream is the one the training and calibration streams would make of the same documents.

    Args:
        documents: texts, read lazily (reading stops once `max_tokens` are reached).
        tokenizer: a transformers tokenizer (EOS is needed only to join several documents).
        max_tokens: cut the stream to this many tokens; None: all of it.
        add_bos: put the tokenizer's BOS token before every document.
        eos_between_docs: put the tokenizer's EOS token between documents (False: plain concatenation).
        progress: show a tqdm bar over documents.

    Returns:
        A 1-D LongTensor of token ids.

    Raises:
        ValueError: several documents but no EOS token, add_bos without a BOS token, or an empty stream.
    """
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 2 (or None for the whole stream)")
    bos = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    out: list[int] = []
    for n, text in enumerate(tqdm(documents, desc="tokenising", unit="doc", disable=not progress)):
        if n and eos_between_docs:
            if tokenizer.eos_token_id is None:
                raise ValueError("several documents are joined with EOS, but the tokenizer has no EOS token")
            out.append(tokenizer.eos_token_id)
        if bos is not None:
            out.append(bos)
        out.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(out) >= max_tokens:
            break
    if max_tokens is not None:
        out = out[:max_tokens]
    if not out:
        raise ValueError("the documents produced no tokens")
    return torch.tensor(out, dtype=torch.long)


def file_documents(patterns: str | Sequence[str], *, text_field: str = "text") -> Iterator[str]:
    """Documents of local files matched by glob patterns (sorted, each file once).

    A ``.txt`` file is one document (WikiText-2's ``test.txt`` is scored as one stream, as in the
    usual recipe); jsonl / parquet files are read through ``data.open_documents`` (one document
    per record, the `text_field` column).

    Raises:
        FileNotFoundError: a pattern matches no file.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files: list[str] = []
    for pattern in patterns:
        hits = sorted(glob.glob(pattern, recursive=True))
        if not hits:
            raise FileNotFoundError(f"ppl files: pattern {pattern!r} matches no file")
        files.extend(h for h in hits if h not in files)
    txt = [f for f in files if f.endswith(".txt")]
    other = [f for f in files if not f.endswith(".txt")]
    for f in txt:
        yield Path(f).read_text(encoding="utf-8")
    if other:
        from flexigpt.shared.recipe import StreamSection

        yield from stream_documents(StreamSection(source="files", files=other, text_field=text_field))


def section_documents(section: Any) -> Iterator[str]:
    """The documents of a perplexity section (``files`` or ``stream``), as one text when it has a ``join``.

    ``join: "\\n\\n"`` over the rows of WikiText-2 raw test (``wikitext-2-raw-v1`` on the hub: one row
    per line of the raw file, blank lines as empty rows) gives the text of ``"\\n\\n".join(data["text"])``,
    the WikiText-2 perplexity text of the SparseGPT, SliceGPT and LLM Surgeon code.
    """
    docs = file_documents(section.files) if section.files else stream_documents(section.stream)
    if section.join is None:
        yield from docs
    else:
        yield section.join.join(docs)


def describe_section(section: Any) -> str:
    """The text of a perplexity section in words: its files or stream, and its join."""
    from flexigpt.shared.text import describe_stream

    source = f"files {section.files}" if section.files else describe_stream(section.stream)
    return source if section.join is None else f"{source}, documents joined with {section.join!r}"


def stream_documents(cfg: Any) -> Iterator[str]:
    """Documents of a ``recipe.StreamSection`` (local files or a hub stream), unshuffled."""
    from flexigpt.shared.train.data import open_documents

    for row in open_documents(cfg):
        yield row["text"]


# ---------------------------------------------------------------------------------- tokenizer
def load_tokenizer(path: str | Path) -> Any:
    """A transformers tokenizer from a directory / hub id, or from a bare sentencepiece ``.model`` file.

    A bare sentencepiece model is wrapped as a ``LlamaTokenizer`` (the way transformers 5 loads one:
    ``tokenizer.model`` plus a ``tokenizer_config.json`` naming the class, in a directory).

    Raises:
        OSError: the path holds no tokenizer transformers can read.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        tmp = Path(tempfile.mkdtemp(prefix="flexigpt-tok-"))
        try:
            shutil.copyfile(p, tmp / "tokenizer.model")
            (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
            return AutoTokenizer.from_pretrained(str(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(path))
