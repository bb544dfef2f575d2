"""Pictures that do not mislead: loss curves against tokens trained since each run's own start, with
the smoothed training loss over the faint raw one; Block Influence on a log axis with its values."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from flexigpt.shared.evaluate.plots import (
    _tokens_of,
    plot_importance,
    plot_loss_curves,
    read_scalars,
    smooth,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(logdir: Path, steps: int, tokens_per_step: int, start_loss: float, seed: int) -> None:
    """A trainer-like log: noisy train/loss and train/tokens_seen every step, eval/loss every 10."""
    rng = random.Random(seed)
    w = SummaryWriter(str(logdir))
    for step in range(1, steps + 1):
        loss = 2.0 + (start_loss - 2.0) * 0.96**step
        w.add_scalar("train/loss", loss + rng.uniform(-0.3, 0.3), step)
        w.add_scalar("train/tokens_seen", step * tokens_per_step, step)
        if step % 10 == 0:
            w.add_scalar("eval/loss", loss + 0.1, step)
    w.close()


def out_dir(tmp_path: Path) -> Path:
    """Where the pictures go: FLEXIGPT_PLOT_DIR keeps them for a look, else the test's tmp dir."""
    d = Path(os.environ.get("FLEXIGPT_PLOT_DIR", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_smoothing_and_the_token_axis() -> None:
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # no pull towards 0 at the start
    ema = smooth([0.0, 10.0], 0.5)
    assert ema == pytest.approx([0.0, 10 * 0.5 / 0.75])
    tokens = _tokens_of({"train/tokens_seen": [(10, 20_000.0), (20, 40_000.0)]})
    assert tokens is not None and tokens(5) == 10_000.0
    assert _tokens_of({"train/loss": [(1, 3.0)]}) is None


def test_loss_curves_of_runs_with_other_batches_share_a_token_axis(tmp_path) -> None:
    # the base trains 60 steps of 1,000 tokens; the grown run starts from it, 30 steps of 2,000 tokens
    write_run(tmp_path / "base" / "tb", 60, 1000, start_loss=6.0, seed=0)
    write_run(tmp_path / "grown" / "tb", 30, 2000, start_loss=3.0, seed=1)
    logs = {"base": tmp_path / "base", "grown": tmp_path / "grown"}
    path, missing = plot_loss_curves(logs, out_dir(tmp_path) / "loss_curves.png")
    assert missing == [] and path.read_bytes()[:8] == PNG_MAGIC
    grown = read_scalars(tmp_path / "grown")
    assert _tokens_of(grown)(30) == 60_000  # both runs end at 60,000 tokens of their own


def test_block_influence_plot_on_a_log_axis(tmp_path) -> None:
    scores = [0.8, 0.12, 0.05, 0.03, 0.02, 0.012, 0.008, 0.006, 0.005, 0.009, 0.015, 0.2]
    imp = {"metric": "block_influence", "scores": scores, "num_samples": 8, "num_tokens": 4096}
    path = plot_importance(imp, out_dir(tmp_path) / "block_influence.png", removed=[6, 7, 8])
    assert path.read_bytes()[:8] == PNG_MAGIC
    # scores that can be negative (ppl_drop) stay on a linear axis
    drop = {"metric": "ppl_drop", "scores": [3.0, -0.1, 0.4, 1.2], "num_samples": 2, "num_tokens": 64}
    assert plot_importance(drop, out_dir(tmp_path) / "ppl_drop.png", removed=[1]).is_file()
