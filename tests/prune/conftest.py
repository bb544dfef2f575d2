"""Fixtures for the pruning tests: synthetic block weights with a known depth structure, and a small
workspace (tiny model, tokenizer, corpus) for the prune command."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from flexigpt.prune.depth.selection import BlockSource

from ..kit import workspace_overrides, write_workspace


def make_drifting_source(
    num_blocks: int = 8,
    shapes: dict[str, tuple[int, int]] | None = None,
    *,
    rank: int = 16,
    theta: float = 0.05,
    noise0: float = 2e-3,
    growth: float = 1.3,
    seed: int = 0,
) -> BlockSource:
    """Blocks whose dominant rank-`rank` subspace rotates slowly with depth, plus full-rank noise
    that grows with depth (as weight norms do in trained LLMs).

    The low-rank metric sees the rotation (nearest blocks in depth are nearest); the plain
    Frobenius distance is dominated by the noise and drifts towards the quiet low blocks, the
    shape of the paper's Fig. 2a vs 2c. The top singular value of the noise stays below the
    smallest structural one, so the rank-r reconstruction keeps the structure.
    """
    shapes = shapes or {"q": (256, 256), "down": (256, 512)}
    g = torch.Generator().manual_seed(seed)
    mats: dict[str, list[torch.Tensor]] = {}
    for t, (m, n) in shapes.items():
        u = torch.linalg.qr(torch.randn(m, 2 * rank, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, 2 * rank, generator=g)).Q
        s = torch.linspace(1.0, 0.5, rank)
        mats[t] = []
        for b in range(num_blocks):
            c, sn = math.cos(theta * b), math.sin(theta * b)
            ub = u[:, :rank] * c + u[:, rank:] * sn
            vb = v[:, :rank] * c + v[:, rank:] * sn
            mats[t].append((ub * s) @ vb.T + noise0 * growth**b * torch.randn(m, n, generator=g))
    return BlockSource(num_blocks, tuple(shapes), lambda b: {t: mats[t][b] for t in shapes})


@pytest.fixture(scope="session")
def drifting() -> Callable[..., BlockSource]:
    """The factory above (a fixture, so test modules need no import path tricks)."""
    return make_drifting_source


@pytest.fixture(scope="session")
def prune_workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizer, corpus and a 6-layer tiny LLaMA-2 source model on disk, written once per session."""
    return write_workspace(tmp_path_factory.mktemp("prune_ws"), num_layers=6)


def prune_overrides(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Overrides that point recipes/prune/local-tiny.yaml at a workspace and an output directory."""
    return workspace_overrides(ws, out, *extra, eval_files=True)
