"""The stock launchers: `deepspeed --num_gpus N --module flexigpt.shared.train RECIPE` runs the train command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexigpt.shared.recipe import RecipeError
from flexigpt.shared.train.cli import _train_parser, use_local_rank
from flexigpt.shared.train.state import list_checkpoints

from .trainkit import REPO_ROOT, workspace

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("flag", [["--local_rank=1"], ["--local-rank", "1"]])
def test_the_parser_accepts_the_launchers_local_rank(flag: list[str], monkeypatch) -> None:
    # use_local_rank writes os.environ itself: set and delete through monkeypatch first, so that the
    # variable is put back as it was (absent, as a later test's launcher-env guard expects)
    monkeypatch.setenv("LOCAL_RANK", "unset")
    monkeypatch.delenv("LOCAL_RANK")
    # the deepspeed launcher puts the flag before the recipe; the overrides still follow it
    args = _train_parser().parse_args([*flag, "r.yaml", "train.lr=1e-3", "train.max_steps=2"])
    assert args.local_rank == 1 and args.recipe == "r.yaml"
    assert args.overrides == ["train.lr=1e-3", "train.max_steps=2"]
    use_local_rank(args.local_rank)
    assert os.environ["LOCAL_RANK"] == "1"  # what DeepSpeed and the device choice read
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RecipeError, match="--local_rank=1 disagrees with the environment's LOCAL_RANK=0"):
        use_local_rank(1)


@pytest.mark.deepspeed
def test_the_deepspeed_launcher_runs_two_ranks(tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(
        DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", "29731", "--module", "flexigpt.shared.train",
           str(REPO_ROOT / "recipes/train/tiny_local.yaml"),
           f"model.source={ws['model']}", f"model.tokenizer={ws['tok']}", f"model.plan={ws['plan']}",
           f"data.files=[{ws['corpus']}/*.jsonl]", f"data.eval.files=[{ws['heldout']}/*.jsonl]",
           "train.max_steps=2", "train.checkpoint_every=2",
           "train.export=none", f"output_dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    # the launcher passed the flag to each rank (it logs every rank's command line)
    assert "--local_rank=0" in log and "--local_rank=1" in log, log[-6000:]
    ckpt = list_checkpoints(out / "checkpoints")[0]
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert (ckpt / "rank_00000.json").is_file() and (ckpt / "rank_00001.json").is_file()
