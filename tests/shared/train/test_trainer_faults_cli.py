"""Faults around the real flexigpt-train command: a second command on a running output_dir, a killed
torchrun launcher (its ranks must stop), and a full or read-only disk (a real tmpfs in a private
mount namespace, skipped where unprivileged namespaces are not allowed)."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flexigpt.shared.train.state import check_manifest, list_checkpoints

from .test_trainer_resume import _env
from .trainkit import REPO_ROOT, workspace

pytestmark = pytest.mark.deepspeed
RECIPE = REPO_ROOT / "recipes/train/tiny_local.yaml"


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return workspace(tmp_path_factory.mktemp("ws"))


def _overrides(ws: dict[str, Path], out: Path, **train: object) -> list[str]:
    t = {"max_steps": 400, "checkpoint_every": 1000, "export": "none", **train}
    return [
        f"model.source={ws['model']}",
        f"model.tokenizer={ws['tok']}",
        f"model.plan={ws['plan']}",
        f"data.files=[{ws['corpus']}/*.jsonl]",
        "data.eval=null",
        "data.trace=true",
        "train.eval_every=0",
        *(f"train.{k}={v}" for k, v in t.items()),
        f"output_dir={out}",
    ]


def _train_cmd(ws: dict[str, Path], out: Path, **train: object) -> list[str]:
    return [sys.executable, "-m", "flexigpt.shared.train", str(RECIPE), *_overrides(ws, out, **train)]


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int, rank: int = 0, timeout: float = 300) -> None:
    trace = out / f"data_trace.rank{rank}.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        if trace.exists():
            steps = [json.loads(ln)["step"] for ln in trace.read_text().splitlines() if ln.endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_second_command_on_a_running_output_dir_is_refused(ws, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = subprocess.Popen(
        _train_cmd(ws, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO_ROOT
    )
    try:
        _wait_for_step(out, first, 1)
        second = subprocess.run(
            _train_cmd(ws, out, lr=0.5),
            capture_output=True,
            text=True,
            env=_env(),
            cwd=REPO_ROOT,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"another run (pid {first.pid}, host " in second.stderr and str(out) in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on, undisturbed
    finally:
        first.send_signal(signal.SIGTERM)  # preemption: it checkpoints, then exits 128 + 15
        assert first.wait(timeout=300) == 128 + signal.SIGTERM
    (ckpt,) = list_checkpoints(out / "checkpoints")
    assert check_manifest(ckpt) is None
    assert yaml.safe_load((ckpt / "recipe.yaml").read_text())["train"]["lr"] == 0.01  # its own, not 0.5


@pytest.mark.slow
def test_ranks_stop_when_their_launcher_is_killed(ws, tmp_path: Path) -> None:
    """Two torchrun ranks (about a minute here; tests/shared/test_runguard.py checks the guard in seconds)."""
    import psutil

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flexigpt.shared.train", str(RECIPE), *_overrides(ws, out, max_steps=100000)]  # fmt: skip
    launcher = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    ranks: list[int] = []
    try:
        _wait_for_step(out, launcher, 2)
        ranks = [p.pid for p in psutil.Process(launcher.pid).children(recursive=True)]
        assert len(ranks) >= 2
        launcher.send_signal(signal.SIGKILL)  # the launcher alone: its ranks run in sessions of their own
        launcher.wait()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(_alive(p) for p in ranks):
            time.sleep(0.2)
        assert not any(_alive(p) for p in ranks), "ranks outlived their launcher"
    finally:
        for pid in ranks:
            if _alive(pid):
                psutil.Process(pid).kill()
    # they stopped the way a preempted run does: a complete checkpoint of the step they were in
    ckpts = list_checkpoints(out / "checkpoints")
    assert ckpts and check_manifest(ckpts[0]) is None
    assert json.loads((ckpts[0] / "trainer_state.json").read_text())["world_size"] == 2


# --------------------------------------------------------------------------------- full disk
def _in_private_tmpfs(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """Run `script` (sh) in a private mount namespace with a tmpfs at $MNT; $COPY survives the namespace."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespaces here (unshare -rm is not allowed)")
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    copy.mkdir()
    full = f"set -u; MNT={shlex.quote(str(mnt))}; COPY={shlex.quote(str(copy))}; {script}"
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", full],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO_ROOT,
        timeout=600,
    )


def test_a_full_disk_names_the_path_and_the_os_error_and_keeps_the_previous_checkpoints(
    ws, tmp_path: Path
) -> None:
    cmd = " ".join(
        shlex.quote(c) for c in _train_cmd(ws, Path("$OUT"), max_steps=12, checkpoint_every=2, keep_last=2)
    )
    cmd = cmd.replace("'output_dir=$OUT'", 'output_dir="$OUT"')
    script = (
        'mount -t tmpfs -o size=1000k tmpfs "$MNT" && OUT="$MNT/out"; '
        f'{cmd} > "$COPY/log" 2>&1; echo $? > "$COPY/rc"; cp -a "$OUT" "$COPY/out"'
    )
    proc = _in_private_tmpfs(tmp_path, script)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "copy" / "log").read_text()
    assert (tmp_path / "copy" / "rc").read_text().strip() == "1", log[-3000:]
    assert "Traceback" not in log
    msg = log[log.rindex("flexigpt-train:") :]
    assert "No space left on device" in msg and "the partial directory was removed" in msg, msg
    out = tmp_path / "copy" / "out"
    step = int(msg.split("checkpoints/step_")[1][:8])
    assert f"{out.parent.parent / 'mnt' / 'out'}/checkpoints/step_{step:08d}" in msg  # the path, as it was
    kept = list_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == [f"step_{s:08d}" for s in (step - 2, step - 4) if s > 0]
    assert all(check_manifest(p) is None for p in kept)
    assert (out / "checkpoints" / "latest").read_text().strip() == kept[0].name
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_no_room_or_a_read_only_output_dir_is_refused_before_training(ws, tmp_path: Path) -> None:
    small = " ".join(shlex.quote(c) for c in _train_cmd(ws, Path("/x"), max_steps=2)).replace(
        "output_dir=/x", 'output_dir="$MNT/small/out"'
    )
    ro = small.replace("$MNT/small/out", "$MNT/ro/out")
    script = (
        'mkdir -p "$MNT" && mount -t tmpfs -o size=64k tmpfs "$MNT" && mkdir "$MNT/small" "$MNT/ro" '
        '&& mount -t tmpfs -o size=1m tmpfs "$MNT/ro" && mkdir "$MNT/ro/out" '
        '&& mount -o remount,ro "$MNT/ro"; '
        f'{small} > "$COPY/small.log" 2>&1; echo $? > "$COPY/small.rc"; ls -A "$MNT/small/out" > "$COPY/small.ls"; '
        f'{ro} > "$COPY/ro.log" 2>&1; echo $? > "$COPY/ro.rc"'
    )
    proc = _in_private_tmpfs(tmp_path, script)
    assert proc.returncode == 0, proc.stderr
    copy = tmp_path / "copy"
    small_log, ro_log = (copy / "small.log").read_text(), (copy / "ro.log").read_text()
    assert (copy / "small.rc").read_text().strip() == "2", small_log[-3000:]
    assert "MiB free; one checkpoint needs about" in small_log and "Traceback" not in small_log
    assert set((copy / "small.ls").read_text().split()) <= {".flexigpt.lock"}  # nothing of a run
    assert (copy / "ro.rc").read_text().strip() == "2", ro_log[-3000:]
    assert "Read-only file system" in ro_log and "output_dir=" in ro_log and "Traceback" not in ro_log
