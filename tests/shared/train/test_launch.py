"""Rank-0 steps: the other ranks wait on the launcher's store, not in a collective under its timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from .trainkit import REPO_ROOT

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Rank 0 works for 4 s (twice the process group's timeout), then succeeds or fails; then both ranks
# start the group on the same store and run a collective.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    from datetime import timedelta
    import torch, torch.distributed as dist
    from flexigpt.shared.train.launch import init_process_group_on_store, rank0_step

    def work():
        time.sleep(4)
        if sys.argv[1] == "fail":
            raise ValueError("the calibration text is too short")
        return "built"

    try:
        got = rank0_step("the test step", work, RuntimeError, wait_s=120)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", flush=True)
        sys.exit(2)
    assert init_process_group_on_store("gloo", timedelta(seconds=2))
    x = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(x)
    print(f"rank {dist.get_rank()} got {got} sum {x.item():g}", flush=True)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(mode: str) -> list[subprocess.CompletedProcess]:
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        cmd = [sys.executable, "-c", SCRIPT, mode]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.deepspeed
def test_other_ranks_outwait_the_group_timeout_then_join_the_group() -> None:
    r0, r1 = _two_ranks("ok")
    assert r0.returncode == 0 and r1.returncode == 0, r0.stderr[-2000:] + r1.stderr[-2000:]
    assert "rank 0 got built sum 3" in r0.stdout
    assert "rank 1 got None sum 3" in r1.stdout  # the result stays on rank 0


@pytest.mark.deepspeed
def test_a_failure_on_rank_0_reaches_the_other_ranks_with_its_message() -> None:
    r0, r1 = _two_ranks("fail")
    assert r0.returncode == 2 and "error: the calibration text is too short" in r0.stdout
    assert r1.returncode == 2, r1.stderr[-2000:]
    assert (
        "error: the test step failed on rank 0 (ValueError: the calibration text is too short); "
        "see rank 0's output" in r1.stdout
    )
