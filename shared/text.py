"""The one rule for how text becomes tokens: BOS before a document, EOS between documents.

Calibration windows, the training and evaluation streams, and every perplexity read their
documents through a ``TextRule``. It is decided once per run from the tokenizer (does it put BOS
in front of what it encodes, does it have an EOS token) and the recipe's ``text:`` section can
override either half. The rule is recorded next to every number it produced, because the same
model scores differently on the same words tokenised another way (a BOS per document changes the
context of every first token; EOS between documents tells the model a new text starts).

A document becomes ``[BOS] + tokens + [EOS]`` (each part as the rule says); a stream is those
pieces one after the other, so "EOS after every document" and "EOS between documents" differ only
in the EOS after the very last one, which a finite text (one perplexity stream) leaves out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flexigpt.shared.recipe import RecipeError, StreamSection, TextSection

_PROBE = "a"  # any text: only whether the tokenizer puts BOS in front of it matters


@dataclass(frozen=True)
class TextRule:
    """BOS / EOS around documents, with the token ids they use."""

    bos: bool
    """BOS before every document."""
    eos_between_docs: bool
    """EOS between documents (after every document of a stream)."""
    bos_id: int | None
    """The tokenizer's BOS id (None: it has none, and ``bos`` is false)."""
    eos_id: int | None
    """The tokenizer's EOS id (None: it has none, and ``eos_between_docs`` is false)."""
    decided_by: str = "tokenizer"
    """Where the rule came from: ``tokenizer``, ``text:`` (the recipe) or both."""

    def document(self, ids: Sequence[int], *, last: bool = False) -> list[int]:
        """One document's tokens with the rule's BOS before and EOS after (none after the `last` one)."""
        out = [self.bos_id] if self.bos else []
        out.extend(ids)
        if self.eos_between_docs and not last:
            out.append(self.eos_id)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record of the rule (what outputs store next to their numbers)."""
        return {
            "bos": self.bos,
            "eos_between_docs": self.eos_between_docs,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "decided_by": self.decided_by,
        }

    def summary(self) -> str:
        """A short phrase, e.g. ``BOS + doc + EOS``, ``doc + EOS``, ``doc``."""
        return " + ".join(
            [*(["BOS"] if self.bos else []), "doc", *(["EOS"] if self.eos_between_docs else [])]
        )

    def section(self) -> TextSection:
        """The rule as a recipe ``text:`` section with both values set (for resolved recipes)."""
        return TextSection(bos=self.bos, eos_between_docs=self.eos_between_docs)


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer` puts its BOS token first when it encodes a text with special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def resolve_text_rule(section: TextSection | None, tokenizer: Any, key: str = "text") -> TextRule:
    """The rule of a run: the recipe's ``text:`` values, the tokenizer's behaviour where they are null.

    Args:
        section: the recipe's ``text:`` section (None: every value follows the tokenizer).
        tokenizer: a transformers tokenizer.
        key: the recipe key named in errors.

    Returns:
        The rule with the token ids it uses.

    Raises:
        RecipeError: the section asks for BOS or EOS and the tokenizer has no such token.
    """
    section = section or TextSection()
    bos_id = getattr(tokenizer, "bos_token_id", None)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if section.bos and bos_id is None:
        raise RecipeError(
            f"{key}.bos=true but the tokenizer has no BOS token; set {key}.bos to false or null"
        )
    if section.eos_between_docs and eos_id is None:
        raise RecipeError(
            f"{key}.eos_between_docs=true but the tokenizer has no EOS token; set it to false or null"
        )
    bos = tokenizer_adds_bos(tokenizer) if section.bos is None else section.bos
    eos = eos_id is not None if section.eos_between_docs is None else section.eos_between_docs
    set_by = [section.bos is not None, section.eos_between_docs is not None]
    decided = "tokenizer" if not any(set_by) else f"{key}:" if all(set_by) else f"{key}: and tokenizer"
    return TextRule(bos, eos, bos_id, eos_id, decided)


def describe_stream(stream: StreamSection) -> str:
    """Which documents a stream reads, in a few words (for the lines that report a number)."""
    where = f"files {stream.files}" if stream.source == "files" else f"{stream.hub_id} [{stream.split}]"
    return where + (f" subsets {stream.subsets}" if stream.subsets else "")


def describe_text(source: str, rule: TextRule, max_tokens: int | None = None) -> str:
    """``<source>, first N tokens, BOS + doc + EOS``: what a perplexity or a score was measured on."""
    first = f", first {max_tokens:,} tokens" if max_tokens is not None else ""
    return f"{source}{first}, text rule {rule.summary()}"
