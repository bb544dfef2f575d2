"""The CPU thread settings every command makes before torch loads (``shared.threads``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexigpt.shared.threads import _cgroup_cpus, configure_cpu_threads, usable_cpus

# Chooses the settings in a fresh interpreter, as a command does (torch not loaded yet), then loads
# torch and reports what it runs with.
PROBE = """
import json, os
from flexigpt.shared.threads import configure_cpu_threads, usable_cpus
notes = []
choice = configure_cpu_threads(notes.append)
import torch
print(json.dumps({"threads": choice.threads, "torch": torch.get_num_threads(), "usable": usable_cpus(),
                  "policy": os.environ["OMP_WAIT_POLICY"], "omp": os.environ["OMP_NUM_THREADS"], "notes": notes}))
"""


def _probe(**env: str) -> dict:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE")
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env={**clean, **env}, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_a_setting_torch_uses_the_usable_cores_and_passive_waiting():
    r = _probe()
    assert r["threads"] == r["torch"] == r["usable"] == int(r["omp"]) >= 1
    assert r["policy"] == "PASSIVE"
    assert len(r["notes"]) == 1 and r["notes"][0].startswith(f"CPU threads: {r['usable']} (")
    assert "set OMP_NUM_THREADS to choose" in r["notes"][0]


def test_the_users_settings_are_kept():
    r = _probe(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
    assert (r["threads"], r["torch"], r["policy"]) == (1, 1, "ACTIVE")
    assert r["notes"] == ["CPU threads: 1 (OMP_NUM_THREADS), OMP_WAIT_POLICY=ACTIVE"]


def test_ranks_of_one_machine_share_the_cores():
    r = _probe(LOCAL_WORLD_SIZE="2")
    assert r["threads"] == r["torch"] == max(1, r["usable"] // 2)
    assert "2 local ranks" in r["notes"][0]


def test_with_torch_loaded_the_count_is_left_alone_unless_omp_num_threads_names_one():
    import torch

    before = torch.get_num_threads()
    try:
        env: dict[str, str] = {}
        assert configure_cpu_threads(None, env).threads == before and "OMP_NUM_THREADS" not in env
        env = {"OMP_NUM_THREADS": "1"}
        assert configure_cpu_threads(None, env).threads == 1 and torch.get_num_threads() == 1
        assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("text", "cpus"), [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1)])
def test_a_cgroup_quota_limits_the_cores(tmp_path: Path, text: str, cpus: int | None):
    (tmp_path / "cpu.max").write_text(text + "\n")
    assert _cgroup_cpus(tmp_path / "cpu.max") == cpus
    assert _cgroup_cpus(tmp_path / "missing") is None
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
