"""The run lock, the launcher guard and the file helpers, without a training run (seconds)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexigpt.shared.files import apply_user_mode, write_text_atomic
from flexigpt.shared.runguard import LOCK_NAME, RunLockError, run_lock

HOLD = "import sys, time\nfrom flexigpt.shared.runguard import run_lock\nwith run_lock(sys.argv[1]):\n" \
       "    print('locked', flush=True)\n    time.sleep(600)\n"  # fmt: skip


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_the_lock_refuses_a_second_holder_names_it_and_is_freed_by_its_death(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        pattern = rf"another run \(pid {holder.pid}, host .*\) is using {out}"
        with pytest.raises(RunLockError, match=pattern), run_lock(out):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(out) as lock_file:  # the dead holder's file is still there; its lock is not
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()


def test_the_lock_is_reentrant_in_one_process_and_released_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with run_lock(out), run_lock(out):  # a command holds it, then the trainer it hands over to
        pass
    holder = _holder(out)  # released: another process can take it
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_the_lock_refuses_a_file_as_output_dir(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunLockError, match="is a file"), run_lock(tmp_path / "f"):
        pass


GUARDED = """
import os, sys, time
os.environ.update(RANK="0", LOCAL_RANK="0")
from flexigpt.shared.runguard import stop_with_launcher
assert stop_with_launcher()
print("guarded", flush=True)
time.sleep(600)
"""
LAUNCHER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout, start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_rank_stops_when_its_launcher_is_killed(tmp_path: Path) -> None:
    """The launcher starts the rank in a session of its own (as torchrun does) and is SIGKILLed."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, GUARDED], stdout=subprocess.PIPE, text=True)
    rank = int(launcher.stdout.readline())
    assert launcher.stdout.readline().strip() == "guarded"
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 20
    alive = True
    while alive and time.monotonic() < deadline:
        try:
            os.kill(rank, 0)
            status = (
                Path(f"/proc/{rank}/stat").read_text().split()[2] if Path(f"/proc/{rank}").exists() else "X"
            )
            alive = status not in ("Z", "X")
        except ProcessLookupError:
            alive = False
        time.sleep(0.1)
    if alive:
        os.kill(rank, signal.SIGKILL)
    assert not alive, "the rank outlived its launcher"


def test_atomic_text_replaces_the_file_and_user_modes_undo_mkdtemp(tmp_path: Path) -> None:
    import tempfile

    target = tmp_path / "recipe.yaml"
    target.write_text("old\n")
    os.link(target, tmp_path / "held")
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and (tmp_path / "held").read_text() == "old\n"
    assert not list(tmp_path.glob("*.part"))

    old = os.umask(0o027)
    try:
        d = Path(tempfile.mkdtemp(dir=tmp_path))
        (d / "sub").mkdir()
        fd, f = tempfile.mkstemp(dir=d / "sub")
        os.close(fd)
        assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE(os.stat(f).st_mode) == 0o600
        apply_user_mode(d)
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    assert stat.S_IMODE((d / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640


def test_recipes_and_plans_are_replaced_not_rewritten_in_place(tmp_path: Path) -> None:
    """A run directory's recipe.yaml / plan.json (and the prune step files, same helper) are never
    seen half-written: the old file stays whole for whoever holds it."""
    from flexigpt.shared.engine.plan import Plan
    from flexigpt.shared.recipe import recipe_from_dict

    plan = Plan.identity("llama", 2)
    plan.save(tmp_path / "plan.json")
    os.link(tmp_path / "plan.json", tmp_path / "held_plan")
    Plan.identity("llama", 3).save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "held_plan") == plan and Plan.load(tmp_path / "plan.json").num_slots == 3

    raw = {
        "kind": "train",
        "model": {"source": "m"},
        "train": {"max_steps": 1, "grad_accum": 1},
        "output_dir": "o",
    }
    recipe_from_dict(raw).save(tmp_path / "recipe.yaml")
    os.link(tmp_path / "recipe.yaml", tmp_path / "held_recipe")
    raw["train"]["max_steps"] = 2
    recipe_from_dict(raw).save(tmp_path / "recipe.yaml")
    assert "max_steps: 1" in (tmp_path / "held_recipe").read_text()
    assert "max_steps: 2" in (tmp_path / "recipe.yaml").read_text()
