"""Local fixtures of the grow tests: a tiny source model, tokenizer and corpus on disk (``tests.kit``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..kit import workspace_overrides, write_workspace

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def grow_workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizer, corpus and a 4-layer tiny LLaMA-2 source model, written once per session."""
    return write_workspace(tmp_path_factory.mktemp("grow_ws"), num_layers=4)


def local_overrides(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Overrides that point recipes/grow/local-tiny.yaml at a workspace and an output directory."""
    return workspace_overrides(ws, out, *extra)
