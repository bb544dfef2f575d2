"""Find the document that broke a stream: the file, the line, and what is wrong with it.

``datasets`` reports a bad corpus as an ``ArrowInvalid`` parse error, a ``UnicodeDecodeError``, a
``TypeError`` from the tokenizer (a null or non-string text) or a bare ``StopIteration`` (no
documents at all), none of which says where. When a stream fails, ``find_bad_document`` reads the
local files again, line by line and in stream order, and names the first problem it finds. It only
runs after a failure, so a healthy corpus is never read twice.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from flexigpt.shared.recipe import StreamSection


def _open(path: str) -> IO[bytes]:
    if path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))  # noqa: SIM115 (caller closes)
    for ext, opener in ((".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)):
        if path.endswith(ext):
            return opener(path, "rb")
    return open(path, "rb")  # noqa: SIM115 (caller closes)


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with _open(path) as raw:
        # zstandard's reader has no readline of its own
        yield from enumerate(io.BufferedReader(raw) if path.endswith(".zst") else raw, start=1)


def _problem_in_json_line(line: bytes, text_field: str) -> str | None:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1})"
    if not decoded.strip():
        return None  # blank lines are skipped by the reader
    try:
        doc: Any = json.loads(decoded)
    except ValueError as e:
        return f"not a JSON object (binary data or a broken line: {e})"
    if not isinstance(doc, dict):
        return f"a JSON {type(doc).__name__}, not an object with a {text_field!r} field"
    if text_field not in doc:
        return f"no {text_field!r} field (fields: {sorted(doc)[:8]}); set text_field"
    value = doc[text_field]
    if value is None:
        return f"{text_field!r} is null; every document needs a string"
    if not isinstance(value, str):
        return f"{text_field!r} is a {type(value).__name__}, not a string"
    return None


def find_bad_document(cfg: StreamSection, files: list[str], fmt: str) -> str | None:
    """The first malformed document of local `files`, as ``FILE line N: problem``; None if none is found.

    Args:
        cfg: the stream section (for ``text_field``).
        files: the resolved files, in stream order.
        fmt: jsonl | parquet | txt.

    Returns:
        A message naming the file and line (or the file, for a parquet column of another type), or
        ``no documents`` when every file is empty, or None.
    """
    seen_any = False
    for path in files:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(path)
            except Exception as e:  # noqa: BLE001 (any reader error means: not a parquet file)
                return f"{path}: not a readable parquet file ({e.__class__.__name__}: {e})"
            if cfg.text_field not in schema.names:
                return f"{path}: no {cfg.text_field!r} column (columns: {schema.names}); set text_field"
            seen_any = seen_any or pq.ParquetFile(path).metadata.num_rows > 0
            continue
        try:
            for n, line in _lines(path):
                if fmt == "txt":
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError as e:
                        return f"{path} line {n}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1})"
                    seen_any = seen_any or bool(line.strip())
                    continue
                problem = _problem_in_json_line(line, cfg.text_field)
                if problem is not None:
                    return f"{path} line {n}: {problem}"
                seen_any = seen_any or bool(line.strip())
        except OSError as e:
            return f"{path}: cannot be read ({e})"
    if not seen_any:
        return f"files {[Path(f).name for f in files][:8]} hold no documents (every file is empty)"
    return None
