"""Shared test fixtures: tiny seeded models of every supported architecture, paths to shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# CPU only, offline, deterministic: the default test run never touches the network or a GPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ARCHS = ("llama2", "llama3", "mistral", "qwen2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The directory with the LLaMA tokenizer and WikiText-2; skips where it is absent."""
    if not (SHARED_DATA / "tokenizers" / "llama2-32k.model").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    """Each supported architecture in turn."""
    return request.param
