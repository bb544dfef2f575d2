"""The prune command under torchrun with two ranks (gloo on CPU) and a process-group timeout of 3 s,
shorter than its pruning step: rank 0 prunes before any process group exists, then both ranks train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..kit import write_corpus
from .conftest import prune_overrides

pytestmark = pytest.mark.deepspeed
REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(REPO_ROOT / "recipes" / "prune" / "local-tiny.yaml")
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_S = 3


def test_two_ranks_prune_past_a_short_process_group_timeout(prune_workspace, tmp_path: Path) -> None:
    from flexigpt.shared.train.state import list_checkpoints

    # more calibration text makes the pruning step itself take several times the timeout
    corpus = write_corpus(tmp_path / "corpus", n_docs=9000)
    out = tmp_path / "run"
    overrides = prune_overrides(
        prune_workspace,
        out,
        f"data.files=[{corpus}/*.jsonl]",
        "prune.calibration.num_samples=1536",
        "prune.calibration.seq_len=128",
        f"train.dist_timeout_s={TIMEOUT_S}",
    )
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(
        DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flexigpt.prune", RECIPE, *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_s"] > 2 * TIMEOUT_S, summary["wall_s"]  # a barrier would have timed out
    assert summary["importance"]["samples"] == 1536
    for v in ("flexigpt", "shortgpt_lora"):  # both ranks trained each variant, rank 0 exported it
        ckpt = list_checkpoints(out / v / "checkpoints")[0]
        assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
        assert (out / v / "final" / "config.json").is_file()
    assert proc.stdout.count("building") == 3  # rank 0 built each variant once; rank 1 did not
