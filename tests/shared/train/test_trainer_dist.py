"""Two ranks (torchrun, gloo on CPU): ZeRO-2 and ZeRO-3 train a tiny shared-block model with the
real train command; the loss falls, every rank checkpoints its partition, the export reassembles them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexigpt.shared.recipe import load_recipe
from flexigpt.shared.train.state import ResumeError, list_checkpoints

from .trainkit import REPO_ROOT, workspace

pytestmark = pytest.mark.deepspeed
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _overrides(ws: dict[str, Path], out: Path, stage: str) -> list[str]:
    return [
        f"model.source={ws['model']}",
        f"model.tokenizer={ws['tok']}",
        f"model.plan={ws['plan']}",
        f"data.files=[{ws['corpus']}/*.jsonl]",
        f"data.eval.files=[{ws['heldout']}/*.jsonl]",
        f"train.ds_config=ds_configs/zero{stage}.json",
        "train.trainable=all",
        "train.lr=3e-3",
        "train.max_steps=12",
        "train.log_every=1",
        "train.checkpoint_every=6",
        f"output_dir={out}",
    ]


@pytest.mark.parametrize("stage", ["2", "3"])
def test_two_ranks_train_and_the_loss_falls(stage: str, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    ws = workspace(tmp_path / "ws")
    out = tmp_path / "out"
    recipe = REPO_ROOT / "recipes/train/tiny_local.yaml"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(
        DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flexigpt.shared.train", str(recipe), *_overrides(ws, out, stage)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    loss = [e.value for e in EventAccumulator(str(out / "tb")).Reload().Scalars("train/loss")]
    assert len(loss) == 12 and sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.2, loss
    ckpt = list_checkpoints(out / "checkpoints")[0]
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2
    assert (ckpt / "rank_00000.json").is_file() and (ckpt / "rank_00001.json").is_file()
    # the two ranks read different data
    r0, r1 = (json.loads((ckpt / f"rank_0000{r}.json").read_text())["streams"][0] for r in (0, 1))
    assert r0 != r1
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final.plan.num_slots == 6

    # a one-rank run refuses the two-rank checkpoint unless told to take its weights only
    if stage == "2":
        from flexigpt.shared.train.trainer import train

        with pytest.raises(ResumeError, match="written by 2 ranks, this run has 1"):
            train(load_recipe(recipe, _overrides(ws, out, stage)))
