"""Streams: local files in SlimPajama's schema, packing with EOS, sharding, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from flexigpt.shared.recipe import DataSection, EvalDataSection
from flexigpt.shared.train.data import (
    DataError,
    PackedLoader,
    PackedStream,
    eval_batches,
    load_loader_state,
    save_loader_state,
)

from .trainkit import SUBSETS, documents, make_tokenizer, write_corpus


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok")))


def _cfg(files: list[str], **kw) -> DataSection:
    base = {"source": "files", "files": files, "seq_len": 24, "shuffle_buffer": 8, "tokenize_batch": 5}
    return DataSection(**{**base, **kw})


def _round_trip(
    cfg: DataSection, tok, tmp: Path, *, rank: int = 0, world: int = 1, k: int = 7, n: int = 12
) -> None:
    """Read k batches, save the state to disk, rebuild, load: the next n batches are identical."""
    a = PackedLoader(cfg, tok, rank=rank, world_size=world, micro_batch=3)
    try:
        for _ in range(k):
            a.next_batch()
        save_loader_state(a.state_dict(), tmp / "state")
        want = [a.next_batch() for _ in range(n)]
    finally:
        a.close()
    b = PackedLoader(cfg, tok, rank=rank, world_size=world, micro_batch=3)
    try:
        b.load_state_dict(load_loader_state(tmp / "state"))
        got = [b.next_batch() for _ in range(n)]
    finally:
        b.close()
    for i, (x, y) in enumerate(zip(want, got, strict=True)):
        assert x.shape == (3, cfg.seq_len) and x.dtype == y.dtype
        assert np.array_equal(x.numpy(), y.numpy()), f"batch {i} after resume differs"


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "parquet", "txt"])
def test_round_trip_every_format(fmt: str, tok, tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", fmt, n_docs=120, n_files=3)
    _round_trip(_cfg([str(tmp_path / "c" / f"*.{fmt}")]), tok, tmp_path)


def test_round_trip_with_workers_ranks_and_subset(tok, tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", "jsonl", n_docs=200, n_files=4)
    cfg = _cfg([str(tmp_path / "c" / "*.jsonl")], num_workers=2, subsets=["RedPajamaC4", "RedPajamaBook"])
    _round_trip(cfg, tok, tmp_path, rank=1, world=2, k=5, n=10)


def test_round_trip_across_epochs(tok, tmp_path: Path) -> None:
    """A tiny corpus wraps around many times; the position survives the epoch boundaries."""
    write_corpus(tmp_path / "c", "jsonl", n_docs=12, n_files=2)
    cfg = _cfg([str(tmp_path / "c" / "*.jsonl")], shuffle_buffer=4)
    s = PackedStream(cfg, tok, 24, tokenize_batch=5)
    while s.epoch < 3:
        s.next_sequence()
    _round_trip(cfg, tok, tmp_path, k=40, n=40)


def test_packing_joins_documents_with_eos(tok, tmp_path: Path) -> None:
    (p,) = write_corpus(tmp_path / "c", "jsonl", n_docs=30, n_files=1)
    cfg = _cfg([str(p)], shuffle_buffer=0, seq_len=16, tokenize_batch=7)
    stream = PackedStream(cfg, tok, 16, tokenize_batch=7, loop=False)
    got = []
    try:
        while True:
            got.append(stream.next_sequence())
    except StopIteration:
        pass
    want = []
    for d in documents(30):
        want += tok(d["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat = np.concatenate(got)
    assert len(flat) == len(want) // 16 * 16  # only the last partial sequence is held back
    assert flat.tolist() == want[: len(flat)]


def _epoch_tokens(cfg: DataSection, tok, index: int, count: int) -> np.ndarray:
    s = PackedStream(cfg, tok, cfg.seq_len, index, count, tokenize_batch=cfg.tokenize_batch, loop=False)
    out = []
    try:
        while True:
            out.append(s.next_sequence())
    except StopIteration:
        out.append(
            np.concatenate([t for _, t in s._chunks])[s._offset :] if s._chunks else np.empty(0, np.int32)
        )
    return np.concatenate(out)


@pytest.mark.parametrize("n_files", [4, 3])  # 4 files: whole files per stream; 3: every other document
def test_streams_are_disjoint_and_complete(n_files: int, tok, tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", "jsonl", n_docs=60, n_files=n_files)
    cfg = _cfg([str(tmp_path / "c" / "*.jsonl")], shuffle_buffer=0, seq_len=8)
    whole = _epoch_tokens(cfg, tok, 0, 1)
    parts = [_epoch_tokens(cfg, tok, i, 2) for i in range(2)]
    eos = tok.eos_token_id
    assert [int((p == eos).sum()) for p in parts] != [0, 0]
    assert sum(int((p == eos).sum()) for p in parts) == int((whole == eos).sum()) == 60
    assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(whole))


def test_subset_filter_keeps_only_those_documents(tok, tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", "jsonl.zst", n_docs=90, n_files=2)
    cfg = _cfg([str(tmp_path / "c" / "*.jsonl.zst")], shuffle_buffer=0, seq_len=8, subsets=[SUBSETS[1]])
    tokens = _epoch_tokens(cfg, tok, 0, 1)
    assert int((tokens == tok.eos_token_id).sum()) == 30


def test_eval_batches_are_fixed_and_bounded(tok, tmp_path: Path) -> None:
    write_corpus(tmp_path / "h", "jsonl", n_docs=20, n_files=1)
    cfg = EvalDataSection(source="files", files=[str(tmp_path / "h" / "*.jsonl")], batches=2)
    a = eval_batches(cfg, tok, seq_len=16, rank=0, world_size=1, micro_batch=2)
    b = eval_batches(cfg, tok, seq_len=16, rank=0, world_size=1, micro_batch=2)
    assert len(a) == 2 and all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a, b, strict=True))
    with pytest.raises(DataError, match="data.eval.batches=500"):
        eval_batches(
            cfg.model_copy(update={"batches": 500}), tok, seq_len=16, rank=0, world_size=1, micro_batch=2
        )


def test_bad_inputs_name_the_problem(tok, tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", "jsonl", n_docs=10, n_files=1)
    write_corpus(tmp_path / "c", "txt", n_docs=10, n_files=1)
    with pytest.raises(DataError, match="matches no file"):
        PackedStream(_cfg([str(tmp_path / "nothing*.jsonl")]), tok, 24)
    with pytest.raises(DataError, match="several formats"):
        PackedStream(_cfg([str(tmp_path / "c" / "*")]), tok, 24)
    with pytest.raises(DataError, match="text_field='body' is not a column"):
        PackedStream(_cfg([str(tmp_path / "c" / "*.jsonl")], text_field="body"), tok, 24)
    cfg = _cfg([str(tmp_path / "c" / "*.jsonl")])
    loader = PackedLoader(cfg, tok, rank=0, world_size=1, micro_batch=2)
    loader.next_batch()
    state = loader.state_dict()
    other = PackedLoader(cfg.model_copy(update={"seq_len": 32}), tok, rank=0, world_size=1, micro_batch=2)
    with pytest.raises(DataError, match="data.seq_len: .* seq_len=24, this run has 32"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="belongs to rank 0, not rank 1"):
        PackedLoader(cfg, tok, rank=1, world_size=2, micro_batch=2).load_state_dict(state)
