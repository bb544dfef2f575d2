"""The measuring steps of the prune command: the source model, calibration text, importance,
base selection and perplexity, each reading the recipe and writing (or reusing) its file.

Nothing here decides whether a step runs; ``run.py`` does. What each step reads from the recipe
is also what ``run.run_settings`` records, so a run directory never mixes results of two settings.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from flexigpt.prune.depth.build import PruneError
from flexigpt.prune.depth.importance import ImportanceResult, calibration_samples, compute_importance
from flexigpt.prune.depth.recipe import PruneRecipe
from flexigpt.prune.depth.replace import choose_bases
from flexigpt.prune.depth.selection import (
    BlockSource,
    SelectionResult,
    source_from_model,
    source_from_safetensors,
)
from flexigpt.shared.command import pick_device
from flexigpt.shared.engine.checkpoint import DEFAULT_MAX_SHARD_SIZE, load_model
from flexigpt.shared.evaluate.perplexity import (
    PerplexityResult,
    describe_section,
    encode_documents,
    perplexity,
    section_documents,
    stream_documents,
)
from flexigpt.shared.files import write_text_atomic
from flexigpt.shared.recipe import RecipeError, StreamSection
from flexigpt.shared.text import TextRule, describe_stream, describe_text, resolve_text_rule
from flexigpt.shared.train.components import DTYPES, PRECISION_DTYPE
from flexigpt.shared.train.data import DataError
from flexigpt.shared.train.ds_config import resolve_precision

# The safetensors files a base selection needs from a hub snapshot (never the .bin weights).
_WEIGHT_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json"]


def resolve_device(recipe: PruneRecipe) -> torch.device:
    """The device of ``prune.device`` (auto: cuda when available).

    Raises:
        PruneError: cuda asked for on a machine without a GPU.
    """
    return pick_device(recipe.prune.device, "prune.device", PruneError)


def resolve_dtype(recipe: PruneRecipe, device: torch.device) -> torch.dtype:
    """model.dtype, or for ``auto`` the dtype the trainer will train in on this device type."""
    if recipe.model.dtype != "auto":
        return DTYPES[recipe.model.dtype]
    return DTYPES[PRECISION_DTYPE[resolve_precision(recipe.train.precision, device.type)]]


class SourceModel:
    """The source model, loaded on first use and at most once; ``free`` drops it."""

    def __init__(self, recipe: PruneRecipe, device: torch.device, dtype: torch.dtype, log: Callable) -> None:
        self.recipe, self.device, self.dtype, self.log = recipe, device, dtype, log
        self._model: PreTrainedModel | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> PreTrainedModel:
        if self._model is None:
            m = self.recipe.model
            self.log(f"loading {m.source} ({str(self.dtype).split('.')[-1]}, {self.device})")
            self._model = load_model(m.source, dtype=self.dtype, attn_implementation=m.attn_implementation)
            self._model.to(self.device).eval()
        return self._model

    def free(self) -> None:
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    streamed = False
    read = None
    """How a checkpoint writer reads tensors (None: as they are in memory)."""
    blocks = None
    """What ``apply_plan`` enters while a slot is built (None: nothing, every block is in memory)."""
    shard_size = DEFAULT_MAX_SHARD_SIZE

    def running(self, model: Any, blocks: list[int] | None = None) -> AbstractContextManager:
        """`model` ready to run a forward (it is: the whole model is in memory)."""
        return nullcontext(model)


# ------------------------------------------------------------------------------------ calibration
def text_rule(recipe: PruneRecipe, tokenizer: Any) -> TextRule:
    """The recipe's text rule for this tokenizer (``text:``, else the tokenizer's own).

    Raises:
        PruneError: ``text:`` asks for a BOS or EOS token the tokenizer does not have.
    """
    try:
        return resolve_text_rule(recipe.text, tokenizer)
    except RecipeError as e:
        raise PruneError(str(e)) from e


def calibration_stream(recipe: PruneRecipe) -> StreamSection:
    """``prune.calibration.stream``, or the data section's stream when it is null."""
    c = recipe.prune.calibration.stream
    if c is not None:
        return c
    return StreamSection(**{k: getattr(recipe.data, k) for k in StreamSection.model_fields})


def calibration_tensors(
    recipe: PruneRecipe, tokenizer: Any, max_positions: int | None
) -> Iterator[torch.Tensor]:
    """The calibration samples of the recipe, (1, T) token tensors read lazily from the stream.

    Documents become tokens by the recipe's text rule, so a packed window is the window the
    training or evaluation stream would make of the same documents.

    Raises:
        PruneError: seq_len beyond the model's positions, or a text rule the tokenizer cannot follow.
    """
    c = recipe.prune.calibration
    if max_positions is not None and c.seq_len > max_positions:
        raise PruneError(
            f"prune.calibration.seq_len={c.seq_len} exceeds the model's max_position_embeddings "
            f"({max_positions}); allowed 2..{max_positions}"
        )
    rule = text_rule(recipe, tokenizer)
    texts = stream_documents(calibration_stream(recipe))
    return calibration_samples(
        texts,
        lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
        num_samples=c.num_samples,
        seq_len=c.seq_len,
        pack=c.pack,
        text=rule,
    )


def gamma_tensors(
    recipe: PruneRecipe, tokenizer: Any, max_positions: int | None, held_out: list[str]
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The samples ``gamma: calibrate`` chooses on: the gamma stream without the evaluation's documents.

    A document of ``prune.calibration.gamma_stream`` (null: the calibration stream) is skipped when
    it is, or is part of, one of the `held_out` documents (those the start perplexities are
    measured on; a ``.txt`` file is one document there, so its paragraphs count as part of it).

    Args:
        recipe: the prune recipe.
        tokenizer: its tokenizer.
        max_positions: the model's position limit (the window length must fit).
        held_out: the documents of the start-perplexity text (``StartPerplexity.documents``).

    Returns:
        The samples, and a record of their text: which stream, how many documents were skipped.

    Raises:
        PruneError: seq_len beyond the model's positions, or no document left after skipping.
    """
    c = recipe.prune.calibration
    if max_positions is not None and c.seq_len > max_positions:
        raise PruneError(
            f"prune.calibration.seq_len={c.seq_len} exceeds the model's max_position_embeddings "
            f"({max_positions}); allowed 2..{max_positions}"
        )
    stream = c.gamma_stream or calibration_stream(recipe)
    key = "prune.calibration.gamma_stream" if c.gamma_stream else "prune.calibration.stream (gamma text)"
    whole = set(held_out)
    joined = "\x00".join(held_out)
    skipped = [0]

    def kept() -> Iterator[str]:
        for doc in stream_documents(stream):
            if doc in whole or (doc.strip() and doc.strip() in joined):
                skipped[0] += 1
                continue
            yield doc

    rule = text_rule(recipe, tokenizer)
    n = c.gamma_samples or c.num_samples
    with named_errors(key):
        samples = list(
            calibration_samples(
                kept(),
                lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                num_samples=n,
                seq_len=c.seq_len,
                pack=c.pack,
                text=rule,
            )
        )
    if not samples:
        raise PruneError(
            f"{key}: every document is part of the start-perplexity text ({skipped[0]} skipped), so gamma would "
            "be chosen on the text it is judged on; set prune.calibration.gamma_stream to another split or files"
        )
    how = f"{len(samples)} {'packed windows' if c.pack else 'documents'} of <= {c.seq_len} tokens"
    info = {
        "described": f"{describe_stream(stream)}, {how}, text rule {rule.summary()}, without the "
        f"{skipped[0]} documents that are part of the start-perplexity text",
        "stream": stream.model_dump(mode="json"),
        "samples": len(samples),
        "documents_skipped": skipped[0],
    }
    return samples, info


def _calibration_text(recipe: PruneRecipe, rule: TextRule) -> str:
    c = recipe.prune.calibration
    how = f"{c.num_samples} {'packed windows' if c.pack else 'documents'} of <= {c.seq_len} tokens"
    return f"{describe_stream(calibration_stream(recipe))}, {how}, text rule {rule.summary()}"


@contextmanager
def named_errors(key: str, *, all_value_errors: bool = False) -> Iterator[None]:
    """Turn a data problem met while reading (missing files, no tokens) into a PruneError naming `key`."""
    try:
        yield
    except PruneError:
        raise
    except (DataError, FileNotFoundError) as e:
        raise PruneError(f"{key}: {e}") from e
    except ValueError as e:
        # compute_importance says "samples: ..." when the stream gave nothing usable
        if all_value_errors or str(e).startswith("samples"):
            raise PruneError(f"{key}: {e}") from e
        raise


# ------------------------------------------------------------------------------------ importance
def importance_step(
    recipe: PruneRecipe,
    path: Path,
    source: SourceModel,
    tokenizer: Any,
    settings: dict[str, Any],
    log: Callable,
) -> ImportanceResult:
    """Block importance of the source on the calibration stream; reuses ``path`` when it exists."""
    if path.is_file():
        result = ImportanceResult.load(path)
        log(f"importance: reusing {path} ({result.metric}, {result.num_samples} samples)")
        return result
    model = source.get()
    key = "prune.calibration.stream" if recipe.prune.calibration.stream else "prune.calibration (data stream)"
    with named_errors(key):
        samples: Any = calibration_tensors(
            recipe, tokenizer, getattr(model.config, "max_position_embeddings", None)
        )
        n = None
        if source.streamed:
            # every sample goes through a block while it is in memory: one batch when the lengths agree
            samples = list(samples)
            n = len(samples)
            if n > 1 and len({t.shape[-1] for t in samples}) == 1:
                samples = [torch.cat([t.reshape(-1, t.shape[-1]) for t in samples])]
        with source.running(model):
            result = compute_importance(model, samples, recipe.prune.metric, progress=True)
        if n is not None:
            result.num_samples = n
    result.extra["calibration"] = settings
    rule = text_rule(recipe, tokenizer)
    result.extra["text"] = {"rule": rule.to_dict(), "described": _calibration_text(recipe, rule)}
    result.save(path)
    log(
        f"importance: {result.metric} on {result.num_samples} samples ({result.num_tokens:,} tokens) -> {path}"
    )
    return result


# ------------------------------------------------------------------------------------- selection
def block_source(recipe: PruneRecipe, source: SourceModel) -> tuple[BlockSource, str]:
    """Where base selection reads block weights from (``prune.selection.read_from``), and a label.

    Raises:
        PruneError: ``read_from: safetensors`` and the source has no safetensors files.
    """
    mode = recipe.prune.selection.read_from
    if mode != "model":
        folder = weights_dir(recipe.model.source, allow_download=mode == "safetensors" or not source.loaded)
        if folder is not None:
            try:
                return source_from_safetensors(folder), f"safetensors files in {folder}"
            except FileNotFoundError as e:
                if mode == "safetensors":
                    raise PruneError(
                        f"prune.selection.read_from='safetensors': {e}; use 'auto' or 'model'"
                    ) from e
        elif mode == "safetensors":
            raise PruneError(
                f"prune.selection.read_from='safetensors': no local files for model.source={recipe.model.source!r}"
            )
    if source.streamed:  # its blocks are placeholders: never read them as weights
        raise PruneError(
            f"prune.memory='per_block': no safetensors files to read the blocks from for model.source="
            f"{recipe.model.source!r}"
        )
    return source_from_model(source.get()), "the loaded model"


def weights_dir(source: str, *, allow_download: bool) -> Path | None:
    """The local directory of `source`'s weight files (a hub id: its snapshot), or None."""
    if Path(source).is_dir():
        return Path(source)
    try:  # a hub id: the snapshot the loaded model came from (or, if not loaded, its weight files)
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(source, allow_patterns=_WEIGHT_PATTERNS, local_files_only=not allow_download)
        )
    except Exception:  # noqa: BLE001 (offline, not cached, no such repo: fall back to the model)
        return None


def selection_step(
    recipe: PruneRecipe,
    path: Path,
    source: SourceModel,
    removed: list[int],
    device: torch.device,
    settings: dict[str, Any],
    log: Callable,
) -> SelectionResult:
    """Base selection for the removed blocks (eq. 2-5); reuses ``path`` when it exists.

    Raises:
        PruneError: the saved selection is for other removed blocks.
    """
    if path.is_file():
        result = SelectionResult.load(path)
        if sorted(result.removed) != sorted(removed):
            raise PruneError(f"{path} selects bases for blocks {result.removed}, this run removes {removed}")
        log(f"selection: reusing {path}")
        return result
    blocks, where = block_source(recipe, source)
    log(f"selection: reading blocks one at a time from {where}")
    result = choose_bases(
        blocks, removed, recipe.prune.options(), all_pairs=recipe.prune.selection.all_pairs, device=device
    )
    result.extra["settings"] = settings
    result.save(path)
    log(f"selection: picks {result.picks} (removed block -> base block) -> {path}")
    return result


# ------------------------------------------------------------------------------------ perplexity
class StartPerplexity:
    """Perplexity on the recipe's held-out text (``prune.perplexity`` or ``data.eval``), tokens read once."""

    def __init__(self, recipe: PruneRecipe, tokenizer: Any) -> None:
        self.recipe, self.tokenizer = recipe, tokenizer
        self.rule = text_rule(recipe, tokenizer)
        self._tokens: torch.Tensor | None = None
        self.documents: list[str] = []
        """The documents the text was made of (filled by ``tokens``), to keep other texts apart from it."""
        pc, data = recipe.prune.perplexity, recipe.data
        if pc is not None:
            self.settings: dict[str, Any] = {"prune.perplexity": pc.model_dump(mode="json")}
            source = describe_section(pc)
            max_tokens = pc.max_tokens
        else:
            assert data.eval is not None  # the recipe validator asks for one of the two
            max_tokens = self._eval_tokens()
            self.settings = {
                "data.eval": data.eval.model_dump(mode="json"),
                "max_tokens": max_tokens,
                "context_len": data.seq_len,
            }
            source = describe_stream(data.eval)
        self.settings["text"] = self.rule.to_dict()
        self.text = describe_text(source, self.rule, max_tokens)
        """Which text the start perplexities are measured on, in words."""

    def _eval_tokens(self) -> int:
        r = self.recipe
        assert r.data.eval is not None
        return r.data.eval.batches * r.train.micro_batch * r.data.seq_len

    def tokens(self) -> torch.Tensor:
        if self._tokens is None:
            pc, data = self.recipe.prune.perplexity, self.recipe.data
            if pc is not None:
                key = "prune.perplexity"
                docs = section_documents(pc)
                max_tokens = pc.max_tokens
            else:
                assert data.eval is not None
                key = "data.eval"
                docs = stream_documents(
                    StreamSection(**{k: getattr(data.eval, k) for k in StreamSection.model_fields})
                )
                max_tokens = self._eval_tokens()
            self.documents = []
            with named_errors(key, all_value_errors=True):
                self._tokens = encode_documents(
                    _recorded(docs, self.documents),
                    self.tokenizer,
                    max_tokens=max_tokens,
                    add_bos=self.rule.bos,
                    eos_between_docs=self.rule.eos_between_docs,
                )
        return self._tokens

    def measure(
        self, name: str, get_model: Callable[[], PreTrainedModel], path: Path, log: Callable
    ) -> PerplexityResult:
        """Perplexity of the model `get_model` returns (called only when `path` holds no result for these
        settings); the result is written to `path` with the settings."""
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("settings") == self.settings:
                result = PerplexityResult.from_dict(saved["result"])
                log(f"start perplexity [{name}]: {result.summary()} on {self.text} (reusing {path})")
                return result
        model = get_model()
        pc = self.recipe.prune.perplexity
        limit = getattr(model.config, "max_position_embeddings", None)
        if pc is not None:
            context, stride, batch = pc.context_len, pc.stride, pc.batch_size
        else:
            context, stride, batch = min(self.recipe.data.seq_len, limit or self.recipe.data.seq_len), None, 1
        key = "prune.perplexity" if pc is not None else "data.seq_len"
        tokens = self.tokens()
        with named_errors(key, all_value_errors=True):
            result = perplexity(
                model, tokens, context_len=context, stride=stride, batch_size=batch, desc=f"{name} ppl"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            path, json.dumps({"settings": self.settings, "result": result.to_dict()}, indent=1) + "\n"
        )
        log(f"start perplexity [{name}]: {result.summary()} on {self.text}")
        return result


def _recorded(docs: Iterator[str], into: list[str]) -> Iterator[str]:
    """`docs`, appending every document read to `into` (what a text consumed, for disjointness checks)."""
    for d in docs:
        into.append(d)
        yield d
