"""How logical streams share the files: by files where they divide, else by documents with one warning."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from flexigpt.shared.recipe import StreamSection
from flexigpt.shared.train import data
from flexigpt.shared.train.data import open_documents, split_documents, split_strategy


def _files(d: Path, n_files: int, docs_per_file: int = 3) -> StreamSection:
    """`n_files` jsonl files; document j of file i reads "file i doc j"."""
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (d / f"part{i:04d}.jsonl").write_text(
            "".join(json.dumps({"text": f"file {i} doc {j}"}) + "\n" for j in range(docs_per_file))
        )
    return StreamSection(source="files", files=[str(d / "*.jsonl")])


def _read(cfg: StreamSection, index: int, count: int) -> list[tuple[int, int]]:
    ds = split_documents(open_documents(cfg), index, count)
    return [tuple(map(int, re.findall(r"\d+", ex["text"]))) for ex in ds]


def test_strategy_follows_the_file_count() -> None:
    assert split_strategy(8, 4) == "shards" and split_strategy(8, 1) == "shards"
    assert split_strategy(6, 4) == "examples" and split_strategy(3, 4) == "examples"
    # nearly even: one file more on some streams is at most 1% of theirs
    assert split_strategy(59166, 16) == "shards" and split_strategy(301, 3) == "shards"
    assert split_strategy(300, 7) == "examples"  # 43 vs 42 files: 2.4%


def test_streams_read_only_their_own_files_where_the_files_divide(tmp_path: Path) -> None:
    cfg = _files(tmp_path / "c", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the files divide
        seen = [_read(cfg, i, 4) for i in range(4)]
    for docs in seen:
        assert len({f for f, _ in docs}) == 2 and len(docs) == 6  # two whole files each
    assert sorted(d for docs in seen for d in docs) == [(f, j) for f in range(8) for j in range(3)]


def test_nearly_even_files_are_still_split_by_file(tmp_path: Path) -> None:
    cfg = _files(tmp_path / "c", 301, docs_per_file=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seen = [_read(cfg, i, 3) for i in range(3)]
    assert sorted(len(docs) for docs in seen) == [100, 100, 101]
    assert sorted(d for docs in seen for d in docs) == [(f, 0) for f in range(301)]


def test_files_that_do_not_divide_are_split_by_document_with_one_warning(tmp_path: Path) -> None:
    cfg = _files(tmp_path / "c", 6)
    data._warned.discard((6, 4))
    with pytest.warns(UserWarning, match=r"6 file\(s\) do not split into 4 streams .* 4x the reading"):
        first = _read(cfg, 0, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, and only from stream 0
        again = _read(cfg, 0, 4)
        others = [_read(cfg, i, 4) for i in range(1, 4)]
    assert first == again
    # every stream went through all the files, keeping every 4th document: disjoint, and all of them
    everything = [(f, j) for f in range(6) for j in range(3)]
    for i, docs in enumerate([first, *others]):
        assert docs == everything[i::4]
