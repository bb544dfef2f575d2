"""Exact resume: the real train command, SIGKILLed at random steps and started again each time,
ends bit-identical to an uninterrupted run, and trains on exactly the same packed sequences."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flexigpt.shared.train.export import consolidated_state_dict
from flexigpt.shared.train.state import list_checkpoints

from .trainkit import REPO_ROOT, workspace

pytestmark = pytest.mark.deepspeed
STEPS = 14


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def _command(ws: dict[str, Path], out: Path) -> list[str]:
    overrides = [
        f"model.source={ws['model']}",
        f"model.tokenizer={ws['tok']}",
        f"model.plan={ws['plan']}",
        f"data.files=[{ws['corpus']}/*.jsonl]",
        f"data.eval.files=[{ws['heldout']}/*.jsonl]",
        "data.num_workers=2",
        "data.trace=true",
        f"train.max_steps={STEPS}",
        "train.checkpoint_every=2",
        "train.eval_every=7",
        "train.export=none",
        f"output_dir={out}",
    ]
    return [
        sys.executable,
        "-m",
        "flexigpt.shared.train",
        str(REPO_ROOT / "recipes/train/tiny_local.yaml"),
        *overrides,
    ]


def _trace(out: Path) -> list[dict]:
    lines = (out / "data_trace.rank0.jsonl").read_text().splitlines()
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by SIGKILL
            continue
    return entries


def _run_until_step(cmd: list[str], out: Path, log, target: int, sig: int = signal.SIGKILL) -> int:
    """Start the command; send `sig` once it has begun step `target` (read from its data trace)."""
    trace = out / "data_trace.rank0.jsonl"
    offset = trace.stat().st_size if trace.exists() else 0
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO_ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if trace.exists():
            with open(trace) as f:
                f.seek(offset)
                steps = [json.loads(ln)["step"] for ln in f.read().splitlines() if ln.endswith("}")]
            if steps and max(steps) >= target:
                proc.send_signal(sig)
                break
        time.sleep(0.02)
    return proc.wait(timeout=60)


def test_sigkill_at_random_steps_then_resume_is_bit_identical(tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    with open(tmp_path / "ref.log", "w") as log:
        assert (
            subprocess.run(
                _command(ws, ref_out), stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO_ROOT
            ).returncode
            == 0
        )

    kills = sorted(random.Random(20261122).sample(range(2, STEPS - 2), 3))
    with open(tmp_path / "run.log", "w") as log:
        for target in kills:
            assert _run_until_step(_command(ws, run_out), run_out, log, target) == -signal.SIGKILL, (
                tmp_path / "run.log"
            ).read_text()[-3000:]
        # SIGTERM (a scheduler's preemption): the run checkpoints the step it is in, then exits 128 + 15
        code = _run_until_step(_command(ws, run_out), run_out, log, STEPS - 3, signal.SIGTERM)
        assert code == 128 + signal.SIGTERM, (tmp_path / "run.log").read_text()[-3000:]
        termed = list_checkpoints(run_out / "checkpoints")[0]
        assert STEPS - 3 <= int(termed.name[5:]) < STEPS
        final = subprocess.run(
            _command(ws, run_out), stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO_ROOT
        )
    log_text = (tmp_path / "run.log").read_text()
    assert final.returncode == 0, log_text[-3000:]
    assert log_text.count("resumed from") >= 3
    assert f"resumed from {termed} " in log_text

    # bit-identical weights (and optimizer-visible fp32 master weights) at the end
    ref_ckpt, run_ckpt = (
        list_checkpoints(ref_out / "checkpoints")[0],
        list_checkpoints(run_out / "checkpoints")[0],
    )
    assert ref_ckpt.name == run_ckpt.name == f"step_{STEPS:08d}"
    want, got = consolidated_state_dict(ref_ckpt), consolidated_state_dict(run_ckpt)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k

    # the same packed sequences, in the same order, each seen once
    ref = {(e["step"], e["micro"]): e["seqs"] for e in _trace(ref_out)}
    assert sorted(ref) == [(s, m) for s in range(1, STEPS + 1) for m in range(2)]
    run_entries = _trace(run_out)
    assert len(run_entries) > len(ref)  # steps after a checkpoint were redone after each kill
    effective = {
        (e["step"], e["micro"]): e["seqs"] for e in run_entries
    }  # the last attempt of each step counts
    assert effective == ref
    seqs = [h for v in ref.values() for h in v]
    assert len(seqs) == len(set(seqs)) == STEPS * 2 * 2
