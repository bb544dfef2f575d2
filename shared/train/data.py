"""Streamed training data: documents -> tokens -> packed sequences -> seeded shuffle -> micro-batches.

Every stage keeps an explicit, small state so that a checkpoint can record the exact position and a
resumed run continues from it, without replaying the stream:

- **documents** come from a ``datasets`` streaming ``IterableDataset`` (SlimPajama from the hub, or
  local jsonl / jsonl.zst / parquet / txt files), optionally filtered by
  ``meta.redpajama_set_name``, and split into ``world_size x num_workers`` disjoint *logical
  streams* (``split_documents``: whole files when their count allows, else every n-th
  document, with a warning of the cost). ``IterableDataset.state_dict()`` is exact for such
  pipelines (no datasets shuffle).
- **tokens**: documents are read ``tokenize_batch`` at a time (a *chunk*), tokenised in one call,
  and joined by the run's text rule (``shared.text``: BOS before, EOS after every document, as
  the rule says). A logical stream's position is the datasets state at
  the start of the chunk that holds its next unread token, plus that token's offset in the chunk;
  resuming re-reads and re-tokenises that one chunk (deterministic) and skips the offset.
- **packing**: consecutive ``seq_len`` tokens form a sequence; documents flow across sequences.
- **shuffle**: each rank keeps its own buffer of packed sequences and a numpy PCG64 generator; both
  are part of the state (datasets' own shuffle buffer is not, so it is not used).
- **workers**: with ``num_workers > 0`` each logical stream of a rank runs in its own process and
  sends packets of sequences with the stream state *after* the packet; the training process takes
  packets round-robin, so it always knows the exact state of what it has consumed.

``PackedLoader.state_dict()`` returns JSON-able values and numpy arrays; ``save_loader_state`` /
``load_loader_state`` store them as ``<prefix>.json`` + ``<prefix>.safetensors``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing as mp
import os
import queue
import signal
import traceback
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexigpt.shared.recipe import DataSection, EvalDataSection, StreamSection
from flexigpt.shared.text import TextRule, resolve_text_rule

STATE_FORMAT = 1
_PACKET = 8  # sequences per message from a worker process
_PREFETCH = 4  # packets a worker may run ahead

_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt"}
_COMPRESSION = (".zst", ".gz", ".bz2", ".xz")
_BUILDERS = {"jsonl": "json", "parquet": "parquet", "txt": "text"}


class DataError(ValueError):
    """Bad data configuration or a stream state that does not fit; the message names the field."""

    exit_status = 2  # a refused run: the commands print the message and exit with this status


# --------------------------------------------------------------------------------------- documents
def resolve_files(cfg: StreamSection) -> tuple[list[str], str]:
    """Expand the glob patterns of `cfg.files` (sorted, deduplicated) and find their format.

    Raises:
        DataError: a pattern matches nothing, or the files mix formats.
    """
    files: list[str] = []
    for pattern in cfg.files:
        hits = sorted(glob.glob(pattern, recursive=True))
        if not hits:
            raise DataError(f"files: pattern {pattern!r} matches no file")
        files.extend(h for h in hits if h not in files)
    if cfg.format != "auto":
        return files, cfg.format
    formats = set()
    for f in files:
        name = f[: -len(ext)] if (ext := next((e for e in _COMPRESSION if f.endswith(e)), "")) else f
        fmt = _FORMATS.get(Path(name).suffix)
        if fmt is None:
            raise DataError(
                f"files: cannot tell the format of {f!r} (allowed: {sorted(_FORMATS)}, optionally {list(_COMPRESSION)}); set format"
            )
        formats.add(fmt)
    if len(formats) > 1:
        raise DataError(
            f"files: the patterns match several formats {sorted(formats)}; use one format per stream"
        )
    return files, formats.pop()


def open_documents(cfg: StreamSection) -> Any:
    """The document stream of `cfg` as a ``datasets`` streaming IterableDataset with one column.

    SlimPajama (``source: slimpajama``) is streamed from the hub: that is what real recipes run,
    and it is never touched by the tests, which stream local files in the same schema through the
    same code below (filter on ``meta.redpajama_set_name``, select the text column).

    Raises:
        DataError: a missing text column or a subset filter on data without ``meta``.
    """
    from datasets import load_dataset

    if cfg.source == "slimpajama":
        ds = load_dataset(cfg.hub_id, split=cfg.split, streaming=True)
        fmt = "jsonl"
    else:
        files, fmt = resolve_files(cfg)
        kwargs: dict[str, Any] = {"sample_by": cfg.txt_sample_by} if fmt == "txt" else {}
        ds = load_dataset(_BUILDERS[fmt], data_files=files, split="train", streaming=True, **kwargs)
    text = "text" if fmt == "txt" else cfg.text_field
    columns = list(ds.features) if ds.features is not None else None
    if columns is not None and text not in columns:
        where = cfg.hub_id if cfg.source == "slimpajama" else f"files {cfg.files}"
        raise DataError(f"text_field={text!r} is not a column of {where}; columns: {columns}")
    if cfg.subsets:
        if columns is not None and "meta" not in columns:
            raise DataError(f"subsets: the data has no 'meta' column to filter on; columns: {columns}")
        keep = frozenset(cfg.subsets)
        ds = ds.filter(lambda ex: ex["meta"]["redpajama_set_name"] in keep)
    ds = ds.select_columns([text])
    if text != "text":
        ds = ds.rename_column(text, "text")
    return ds


# A split by files may give some streams one file more than others: accepted while that is at most
# this share of a stream's files (SlimPajama's 59,166 files on 16 streams: 3,698 vs 3,697), since a
# stream with fewer files repeats them sooner.
MAX_FILE_IMBALANCE = 0.01
_warned: set[tuple[int, int]] = set()  # (files, streams) already warned about in this process


def split_strategy(num_files: int, count: int) -> str:
    """How `count` logical streams share `num_files` files (shards).

    ``shards``: each stream reads only its own files, when they divide evenly (or nearly: see
    ``MAX_FILE_IMBALANCE``). ``examples``: every stream reads every file and keeps every
    `count`-th document, `count` times the reading of the whole data.
    """
    if count <= 1 or num_files % count == 0:
        return "shards"
    per = num_files // count
    return "shards" if per > 0 and 1 / per <= MAX_FILE_IMBALANCE else "examples"


def split_documents(ds: Any, index: int, count: int) -> Any:
    """Logical stream `index` of `count` of a document stream (``datasets.split_dataset_by_node``).

    Where the files do not split into `count` (``split_strategy``), stream 0 warns once per process
    with the cost: every stream then reads the whole data.
    """
    if count <= 1:
        return ds
    from datasets.distributed import split_dataset_by_node

    strategy = split_strategy(ds.num_shards, count)
    if strategy == "examples" and index == 0 and (ds.num_shards, count) not in _warned:
        _warned.add((ds.num_shards, count))
        warnings.warn(
            f"data: {ds.num_shards} file(s) do not split into {count} streams (ranks x data.num_workers): "
            f"every stream reads all the data and keeps one document in {count}, {count}x the reading "
            f"of a split by files. Use a number of files that is a multiple of {count}",
            stacklevel=2,
        )
    return split_dataset_by_node(ds, rank=index, world_size=count, strategy=strategy)


# ------------------------------------------------------------------------------------ token stream
def _encoder(tokenizer: Any):
    """Fast path: the Rust tokenizer's batch encode without offsets; else the Python tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


class PackedStream:
    """One logical stream: documents of shard `index` of `count`, tokenised, packed into sequences.

    Args:
        cfg: where the documents come from.
        tokenizer: a transformers tokenizer.
        seq_len: tokens per sequence.
        index: this stream's shard index (rank x workers + worker).
        count: number of logical streams (world size x workers).
        tokenize_batch: documents per tokeniser call (part of the position).
        text: BOS / EOS around every document; None: the tokenizer's own rule (``resolve_text_rule``).
        loop: start a new epoch when the documents run out (False: raise StopIteration).
        state: a position from ``state_dict()`` to start at (default: the beginning).
    """

    def __init__(
        self,
        cfg: StreamSection,
        tokenizer: Any,
        seq_len: int,
        index: int = 0,
        count: int = 1,
        tokenize_batch: int = 64,
        text: TextRule | None = None,
        loop: bool = True,
        state: dict[str, Any] | None = None,
    ) -> None:
        text = text or resolve_text_rule(None, tokenizer)
        self.cfg, self.seq_len, self.index, self.count = cfg, seq_len, index, count
        self.tokenize_batch, self.loop = tokenize_batch, loop
        self._eos = text.eos_id if text.eos_between_docs else None
        self._bos = text.bos_id if text.bos else None
        self._encode = _encoder(tokenizer)
        state = state or {"chunk_start": {"epoch": 0, "ds": None}, "offset": 0}
        self._start(state["chunk_start"], int(state["offset"]))

    # -- position ----------------------------------------------------------------------------
    def _start(self, chunk_start: dict[str, Any], offset: int) -> None:
        with self._located():
            ds = split_documents(open_documents(self.cfg), self.index, self.count)
        self.epoch = chunk_start["epoch"]
        ds.set_epoch(self.epoch)  # epoch > 0 reshuffles the shard order, deterministically
        if chunk_start["ds"] is not None:
            ds.load_state_dict(chunk_start["ds"])
        self._ds, self._it = ds, iter(ds)
        self._next_start = chunk_start
        self._chunks: deque[tuple[dict[str, Any], np.ndarray]] = deque()
        self._offset = 0
        self._available = 0
        if offset:
            self._read_chunk()
            if offset > self._available:
                raise DataError(
                    f"stream position offset {offset} is past its chunk ({self._available} tokens)"
                )
            self._offset, self._available = offset, self._available - offset

    def state_dict(self) -> dict[str, Any]:
        """The position of the next unread token (JSON-able)."""
        if self._chunks:
            return {"chunk_start": self._chunks[0][0], "offset": self._offset}
        return {"chunk_start": self._next_start, "offset": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position returned by ``state_dict``."""
        self._start(state["chunk_start"], int(state["offset"]))

    # -- reading ------------------------------------------------------------------------------
    def _read_chunk(self) -> None:
        start = self._next_start
        with self._located():
            docs = [ex["text"] for ex in islice(self._it, self.tokenize_batch)]
            if not all(isinstance(d, str) for d in docs):
                raise TypeError("a document text is not a string")
        if not docs:
            if start["ds"] is None:
                raise DataError(f"stream {self.index}/{self.count} of {self._describe()} has no documents")
            if not self.loop:
                raise StopIteration
            self._ds.set_epoch(self.epoch + 1)
            self.epoch += 1
            self._it = iter(self._ds)
            self._next_start = {"epoch": self.epoch, "ds": None}
            return self._read_chunk()
        ids = self._encode(docs)
        extra = (self._eos is not None) + (self._bos is not None)
        tokens = np.empty(sum(map(len, ids)) + extra * len(ids), dtype=np.int32)
        pos = 0
        for x in ids:
            if self._bos is not None:
                tokens[pos] = self._bos
                pos += 1
            tokens[pos : pos + len(x)] = x
            pos += len(x)
            if self._eos is not None:
                tokens[pos] = self._eos
                pos += 1
        self._chunks.append((start, tokens))
        self._available += len(tokens)
        self._next_start = {"epoch": self.epoch, "ds": self._ds.state_dict()}

    @contextmanager
    def _located(self) -> Iterator[None]:
        """Turn a failure of the document reader into a DataError naming the bad file and line."""
        try:
            yield
        except DataError:
            raise
        except Exception as e:  # ArrowInvalid, UnicodeDecodeError, TypeError, StopIteration (empty), ...
            where = None
            if self.cfg.source == "files":
                from flexigpt.shared.train.corpus_check import find_bad_document

                where = find_bad_document(self.cfg, *resolve_files(self.cfg))
            raise DataError(
                f"data.files: {where}"
                if where
                else f"{self._describe()}: cannot be read ({e.__class__.__name__}: {e})"
            ) from None

    def _describe(self) -> str:
        return self.cfg.hub_id if self.cfg.source == "slimpajama" else f"files {self.cfg.files}"

    def next_sequence(self) -> np.ndarray:
        """The next packed sequence (int32, length seq_len)."""
        while self._available < self.seq_len:
            self._read_chunk()
        out = np.empty(self.seq_len, dtype=np.int32)
        filled = 0
        while filled < self.seq_len:
            _, tokens = self._chunks[0]
            take = min(self.seq_len - filled, len(tokens) - self._offset)
            out[filled : filled + take] = tokens[self._offset : self._offset + take]
            filled += take
            self._offset += take
            if self._offset == len(tokens):
                self._chunks.popleft()
                self._offset = 0
        self._available -= self.seq_len
        return out


# ------------------------------------------------------------------------------------------ workers
def _worker_main(args: tuple, out: mp.Queue, stop: Any) -> None:
    """Run one logical stream in a worker process; send (sequences, state after them) packets."""
    cfg, tokenizer, seq_len, index, count, tokenize_batch, text, state = args
    torch.set_num_threads(1)
    parent = os.getppid()
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: the training process turns
    # them into a checkpoint and then stops the workers, so the workers must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        stream = PackedStream(cfg, tokenizer, seq_len, index, count, tokenize_batch, text, state=state)
        while not stop.is_set():
            packet = np.stack([stream.next_sequence() for _ in range(_PACKET)])
            item = ("ok", packet, stream.state_dict())
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.2)
                    break
                except queue.Full:
                    if os.getppid() != parent:  # the training process is gone (killed): stop too
                        return
    except DataError as e:  # a bad corpus: its message (file and line) is the whole story
        out.put(("data_error", str(e), None))
    except Exception:
        out.put(("error", traceback.format_exc(), None))


class _WorkerPool:
    """One process per logical stream of this rank, each feeding its own bounded queue."""

    def __init__(self, stream_args: list[tuple]) -> None:
        # fork, as torch's DataLoader does on Linux: workers inherit the tokenizer without pickling.
        ctx = mp.get_context("fork")
        self.stop = ctx.Event()
        self.queues = [ctx.Queue(maxsize=_PREFETCH) for _ in stream_args]
        self.procs = [
            ctx.Process(target=_worker_main, args=(a, q, self.stop), daemon=True)
            for a, q in zip(stream_args, self.queues, strict=True)
        ]
        for p in self.procs:
            p.start()

    def get(self, k: int) -> tuple[np.ndarray, dict[str, Any]]:
        while True:
            try:
                kind, payload, state = self.queues[k].get(timeout=1.0)
            except queue.Empty:
                if not self.procs[k].is_alive():
                    raise RuntimeError(f"data worker {k} died (exit code {self.procs[k].exitcode})") from None
                continue
            if kind == "data_error":
                raise DataError(payload)
            if kind == "error":
                raise RuntimeError(f"data worker {k} failed:\n{payload}")
            return payload, state

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        for q in self.queues:
            q.cancel_join_thread()
            q.close()


# ------------------------------------------------------------------------------------------- loader
class PackedLoader:
    """Micro-batches of packed sequences for one rank, with an exact, checkpointable position.

    Args:
        cfg: the data section (training stream, packing, shuffle, workers).
        tokenizer: a transformers tokenizer.
        rank: data-parallel rank.
        world_size: number of data-parallel ranks.
        micro_batch: sequences per batch.
        text: BOS / EOS around every document; None: the tokenizer's own rule.
    """

    def __init__(
        self,
        cfg: DataSection,
        tokenizer: Any,
        *,
        rank: int,
        world_size: int,
        micro_batch: int,
        text: TextRule | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} is out of range for world_size={world_size}")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.text = text or resolve_text_rule(None, tokenizer)
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.num_streams = max(1, cfg.num_workers)
        count = world_size * self.num_streams
        self._stream_ids = [rank * self.num_streams + w for w in range(self.num_streams)]
        self._args = [
            (cfg, tokenizer, cfg.seq_len, i, count, cfg.tokenize_batch, self.text) for i in self._stream_ids
        ]
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, rank])))
        self._buffer = np.empty((cfg.shuffle_buffer, cfg.seq_len), dtype=np.int32)
        self._fill = 0
        self._pending: deque[np.ndarray] = deque()
        self._stream_states: list[dict[str, Any] | None] = [None] * self.num_streams
        self._next_stream = 0
        self.sequences_served = 0
        self._local: PackedStream | None = None
        self._pool: _WorkerPool | None = None

    # -- sources -----------------------------------------------------------------------------------
    def _next_raw(self) -> np.ndarray:
        """The next sequence in stream order (round-robin over logical streams, packet by packet)."""
        if self._pending:
            return self._pending.popleft()
        if self.cfg.num_workers == 0:
            if self._local is None:
                self._local = PackedStream(*self._args[0], state=self._stream_states[0])
            seq = self._local.next_sequence()
            self._stream_states[0] = self._local.state_dict()
            return seq
        if self._pool is None:
            self._pool = _WorkerPool([(*a, s) for a, s in zip(self._args, self._stream_states, strict=True)])
        k = self._next_stream
        packet, state = self._pool.get(k)
        self._stream_states[k] = state
        self._next_stream = (k + 1) % self.num_streams
        self._pending.extend(packet)
        return self._pending.popleft()

    def next_sequence(self) -> np.ndarray:
        """The next sequence after the shuffle buffer."""
        size = self.cfg.shuffle_buffer
        if size == 0:
            seq = self._next_raw()
        else:
            while self._fill < size:
                self._buffer[self._fill] = self._next_raw()
                self._fill += 1
            j = int(self._rng.integers(size))
            seq = self._buffer[j].copy()
            self._buffer[j] = self._next_raw()
        self.sequences_served += 1
        return seq

    def next_batch(self) -> torch.Tensor:
        """A (micro_batch, seq_len) int64 tensor of input ids (labels are the same ids)."""
        return torch.from_numpy(
            np.stack([self.next_sequence() for _ in range(self.micro_batch)]).astype(np.int64)
        )

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def close(self) -> None:
        """Stop worker processes (if any)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # -- state ------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "world_size": self.world_size,
            "num_streams": self.num_streams,
            "seq_len": c.seq_len,
            "tokenize_batch": c.tokenize_batch,
            "shuffle_buffer": c.shuffle_buffer,
            "seed": c.seed,
            "add_bos": self.text.bos,
            "eos_between_docs": self.text.eos_between_docs,
        }

    def state_dict(self) -> dict[str, Any]:
        """The exact position: stream states, pending sequences, shuffle buffer and its generator."""
        empty = np.empty((0, self.cfg.seq_len), dtype=np.int32)
        return {
            "format": STATE_FORMAT,
            "rank": self.rank,
            **self._identity(),
            "streams": [dict(s) if s is not None else None for s in self._stream_states],
            "next_stream": self._next_stream,
            "sequences_served": self.sequences_served,
            "rng": self._rng.bit_generator.state,
            "pending": np.stack(list(self._pending)) if self._pending else empty,
            "buffer": self._buffer[: self._fill].copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` output (of the same rank and data settings).

        Raises:
            DataError: the state was saved with other settings that fix the position (world size,
                workers, sequence length, tokenize batch, shuffle buffer, seed, text rule), or another rank.
        """
        if state.get("format") != STATE_FORMAT:
            raise DataError(
                f"data state format {state.get('format')!r} is not supported (want {STATE_FORMAT})"
            )
        if state["rank"] != self.rank:
            raise DataError(f"data state belongs to rank {state['rank']}, not rank {self.rank}")
        names = {
            "num_streams": "data.num_workers",
            "world_size": "world size",
            "add_bos": "text.bos",
            "eos_between_docs": "text.eos_between_docs",
        }
        for key, want in self._identity().items():
            # states saved before the text rule was recorded always joined documents with EOS
            if state.get(key, True) != want:
                raise DataError(
                    f"{names.get(key, 'data.' + key)}: the checkpoint's stream position was saved with "
                    f"{key}={state.get(key, True)!r}, this run has {want!r}; the position cannot be carried over"
                )
        self.close()
        self._local = None
        self._stream_states = [dict(s) if s is not None else None for s in state["streams"]]
        self._next_stream = int(state["next_stream"])
        self.sequences_served = int(state["sequences_served"])
        self._rng.bit_generator.state = state["rng"]
        self._pending = deque(np.asarray(state["pending"], dtype=np.int32))
        buf = np.asarray(state["buffer"], dtype=np.int32)
        self._fill = len(buf)
        self._buffer[: self._fill] = buf


# ------------------------------------------------------------------------------------------- eval
def eval_batches(
    cfg: EvalDataSection,
    tokenizer: Any,
    *,
    seq_len: int,
    rank: int,
    world_size: int,
    micro_batch: int,
    text: TextRule | None = None,
) -> list[torch.Tensor]:
    """The first `cfg.batches` micro-batches of this rank's shard of the held-out stream (no shuffle).

    Documents are joined by `text` (None: the tokenizer's own rule), as the training stream is.

    Raises:
        DataError: the held-out stream is too short for `cfg.batches` batches on every rank.
    """
    stream = PackedStream(cfg, tokenizer, seq_len, rank, world_size, text=text, loop=False)
    out = []
    try:
        for _ in range(cfg.batches):
            out.append(
                torch.from_numpy(
                    np.stack([stream.next_sequence() for _ in range(micro_batch)]).astype(np.int64)
                )
            )
    except StopIteration:
        raise DataError(
            f"data.eval.batches={cfg.batches}: rank {rank}'s share of the held-out stream gives only {len(out)} "
            f"batches of {micro_batch} x {seq_len} tokens; lower data.eval.batches"
        ) from None
    return out


# ------------------------------------------------------------------------------------------- disk
def save_loader_state(state: dict[str, Any], prefix: str | Path) -> None:
    """Write a loader state as ``prefix.json`` (everything but arrays) and ``prefix.safetensors``."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in state.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in state.items() if k not in arrays}
    Path(f"{prefix}.json").write_text(json.dumps(meta))
    save_file(arrays, f"{prefix}.safetensors")


def load_loader_state(prefix: str | Path) -> dict[str, Any]:
    """Read a state written by ``save_loader_state``."""
    from safetensors.numpy import load_file

    state = json.loads(Path(f"{prefix}.json").read_text())
    state.update(load_file(f"{prefix}.safetensors"))
    return state


def fingerprint(batch: torch.Tensor) -> list[str]:
    """A short hash of every sequence of a batch (for data traces)."""
    arr = batch.numpy().astype(np.int32)
    return [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in arr]
