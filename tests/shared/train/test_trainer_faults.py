"""Faults that must never end in a reported success on a broken model (one process, gloo on CPU):
a second run in the same output_dir, checkpoints that are all unusable, a load that fails half way,
a diverging loss, a changed schedule on resume, planted pickles, pickle weights, file modes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from flexigpt.shared.recipe import RecipeError, recipe_from_dict
from flexigpt.shared.runguard import LOCK_NAME, RunLockError
from flexigpt.shared.train.export import consolidated_state_dict
from flexigpt.shared.train.guards import TrainingDiverged
from flexigpt.shared.train.state import ResumeError, UnsafeCheckpointError, list_checkpoints, safe_torch_load
from flexigpt.shared.train.trainer import train

from .trainkit import REPO_ROOT, recipe_dict, workspace

pytestmark = pytest.mark.deepspeed


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return workspace(tmp_path_factory.mktemp("ws"))


def _run(ws: dict[str, Path], out: Path, resume: str = "auto", **kw):
    allow = {k: kw.pop(k) for k in ("allow_schedule_change",) if k in kw}
    return train(recipe_from_dict(recipe_dict(ws, out, **kw)), resume=resume, **allow)


def _rewrite_manifest(ckpt: Path, name: str) -> None:
    """Make the manifest agree with a rewritten file, as anyone handing over a checkpoint could."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "crc32": zlib.crc32(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _equal_states(a: Path, b: Path) -> None:
    want, got = consolidated_state_dict(a), consolidated_state_dict(b)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


# ------------------------------------------------------------------------------------ 1. run lock
def test_a_second_run_in_the_same_output_dir_is_refused_and_a_dead_holder_leaves_no_stale_lock(
    ws, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from flexigpt.shared.runguard import run_lock\n"
         f"with run_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError, match=rf"another run \(pid {holder.pid}, host .*\) is using {out}"):
            _run(ws, out, max_steps=2, checkpoint_every=2)
        assert not (out / "checkpoints").exists() and not (out / "recipe.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_NAME).is_file()  # left behind by the killed holder: the kernel released its lock
    assert _run(ws, out, max_steps=2, checkpoint_every=2).step == 2


def test_output_dir_that_is_a_file_is_refused(ws, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunLockError, match="output_dir=.*file' is a file"):
        _run(ws, tmp_path / "file", max_steps=2)


# ----------------------------------------------------------------------- 2. unusable checkpoints
def test_all_checkpoints_unusable_stops_the_run_until_restart_is_asked(ws, tmp_path: Path) -> None:
    out = tmp_path / "run"
    kw = {"max_steps": 4, "checkpoint_every": 2, "keep_last": 2}
    ref = _run(ws, tmp_path / "ref", **kw)
    _run(ws, out, **kw)
    for ckpt in list_checkpoints(out / "checkpoints"):
        f = next(ckpt.glob("*model_states.pt"))
        f.write_bytes(f.read_bytes()[:100])
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(
        ResumeError, match=r"none is usable: they fail their checks .*step_00000004.*--resume restart"
    ):
        _run(ws, out, **kw)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing trained or rotated
    res = _run(ws, out, resume="restart", **kw)
    assert res.step == 4
    assert sorted(p.name for p in (out / "checkpoints").glob(".replaced-*")) == [
        ".replaced-step_00000002",
        ".replaced-step_00000004",
    ]
    _equal_states(ref.checkpoint, res.checkpoint)  # a clean start, not one from half-loaded weights


def test_a_load_that_fails_half_way_leaves_no_weights_behind(ws, tmp_path: Path) -> None:
    """The newest checkpoint's module state loads, its optimizer state does not: the run must fall
    back to the previous checkpoint and redo the steps exactly, not keep the half-loaded weights;
    with no previous checkpoint it must stop."""
    kw = {"max_steps": 4, "checkpoint_every": 2, "keep_last": 3, "checkpoint_checksums": False}
    ref = _run(ws, tmp_path / "ref", **kw)
    out = tmp_path / "run"
    _run(ws, out, **kw)
    newest = list_checkpoints(out / "checkpoints")[0]
    optim = next(newest.glob("*optim_states.pt"))
    torch.save({"not": "an optimizer state"}, optim)  # loads safely, then fails in DeepSpeed
    _rewrite_manifest(newest, optim.name)
    with pytest.warns(UserWarning, match="step_00000004 failed to load"):
        res = _run(ws, out, **kw)
    assert res.step == 4
    _equal_states(ref.checkpoint, res.checkpoint)

    single = tmp_path / "single"
    _run(ws, single, max_steps=2, checkpoint_every=2, checkpoint_checksums=False)
    (only,) = list_checkpoints(single / "checkpoints")
    optim = next(only.glob("*optim_states.pt"))
    torch.save({"not": "an optimizer state"}, optim)
    _rewrite_manifest(only, optim.name)
    with (
        pytest.warns(UserWarning, match="failed to load"),
        pytest.raises(ResumeError, match="none is usable: they do not load"),
    ):
        _run(ws, single, max_steps=2, checkpoint_every=2, checkpoint_checksums=False)


def test_rotation_never_deletes_the_newest_good_checkpoint_for_newer_bad_ones(ws, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(ws, out, max_steps=6, checkpoint_every=2, keep_last=3)
    newest = list_checkpoints(out / "checkpoints")[0]
    f = next(newest.glob("*optim_states.pt"))
    f.write_bytes(f.read_bytes()[:50])
    # resume from step 4 with keep_last=1 and a checkpoint every step: each new checkpoint is the
    # newest good state; the bad step 6 must not count as one of the kept
    with pytest.warns(UserWarning, match="set aside"):
        res = _run(ws, out, max_steps=6, checkpoint_every=1, keep_last=1, allow_schedule_change=True)
    assert res.step == 6
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000006"]
    assert res.checkpoint == out / "checkpoints" / "step_00000006"
    assert (out / "checkpoints" / ".unused-step_00000006").is_dir()


# --------------------------------------------------------------------------------------- 3. NaN
def test_a_diverging_run_stops_without_checkpointing_the_broken_state(ws, tmp_path: Path) -> None:
    """An absurd learning rate: the run stops at the first non-finite step, keeps every finite
    checkpoint before it (latest on the newest), writes none of the broken state and exports nothing."""
    import re

    out = tmp_path / "run"
    _run(ws, out, max_steps=2, checkpoint_every=2, keep_last=1)
    with pytest.raises(TrainingDiverged, match=r"lower train.lr, raise train.warmup_steps") as err:
        _run(ws, out, max_steps=12, checkpoint_every=1, keep_last=12, lr=1e12, grad_clip=0.0,
             export="compact", allow_schedule_change=True)  # fmt: skip
    bad = int(
        re.search(r"diverged at step (\d+): the loss is (\S+) and the gradient norm (\S+)", str(err.value))[1]
    )
    assert 2 < bad <= 12
    kept = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert kept == [f"step_{s:08d}" for s in range(bad - 1, 1, -1)]
    assert (out / "checkpoints" / "latest").read_text().strip() == kept[0]
    assert f"the newest checkpoint, {out / 'checkpoints' / kept[0]}, is from before it" in str(err.value)
    assert not (out / "final").exists() and not list((out / "checkpoints").glob(".tmp-*"))
    for name in kept:
        for k, v in consolidated_state_dict(out / "checkpoints" / name).items():
            assert torch.isfinite(v).all(), (name, k)


# ----------------------------------------------------------------------- 4. schedule on resume
def test_a_changed_schedule_on_resume_is_refused_unless_allowed(ws, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    _run(ws, out, max_steps=2, checkpoint_every=2)
    with pytest.raises(
        ResumeError, match=r"(?s)another schedule.*train.max_steps: 2 -> 4.*--allow-schedule-change"
    ):
        _run(ws, out, max_steps=4, checkpoint_every=2)
    with pytest.raises(ResumeError, match=r"data.seed: 0 -> 1"):
        d = recipe_dict(ws, out, max_steps=2, checkpoint_every=2)
        d["data"]["seed"] = 1
        train(recipe_from_dict(d))
    capsys.readouterr()
    res = _run(ws, out, max_steps=4, checkpoint_every=2, lr=5e-3, allow_schedule_change=True)
    printed = capsys.readouterr().out
    assert "train.max_steps 2 -> 4" in printed and "train.lr 0.01 -> 0.005" in printed
    assert res.step == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flexigpt.shared.train.components import lr_factor

    lrs = {e.step: e.value for e in EventAccumulator(str(out / "tb")).Reload().Scalars("train/lr")}
    # the new schedule (peak 5e-3 over 4 steps), from step 3 on: what DeepSpeed reports after step 4
    assert lrs[4] == pytest.approx(5e-3 * lr_factor(4, 2, 4, 0.1))


# ---------------------------------------------------------------------------- 5. safe loads
class _Planted:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_on_resume_and_export(ws, tmp_path: Path) -> None:
    from flexigpt.shared.train.cli import main

    out = tmp_path / "run"
    _run(ws, out, max_steps=2, checkpoint_every=2)
    (ckpt,) = list_checkpoints(out / "checkpoints")
    optim = next(ckpt.glob("*optim_states.pt"))
    state = safe_torch_load(optim)
    marker = tmp_path / "pwned"
    state["planted"] = _Planted(str(marker))
    torch.save(state, optim)
    _rewrite_manifest(ckpt, optim.name)
    with pytest.raises(
        UnsafeCheckpointError, match=r"optim_states.pt holds pickled objects outside .*system"
    ):
        _run(ws, out, max_steps=2, checkpoint_every=2)
    assert main(["export", str(ckpt), str(tmp_path / "exp")]) == 2
    assert not marker.exists() and not (tmp_path / "exp").exists()


def test_pickle_weights_are_refused_unless_allowed(ws, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ws["model"])
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the old pickle format
    d = recipe_dict(ws, tmp_path / "run", max_steps=2, checkpoint_every=2)
    d["model"]["source"] = str(tmp_path / "bin")
    with pytest.raises(RecipeError, match=r"pickle weights \(pytorch_model.bin\).*safe_serialization=True"):
        train(recipe_from_dict(d))
    assert not (tmp_path / "run").exists()
    d["model"]["allow_pickle_weights"] = True
    assert train(recipe_from_dict(d)).step == 2


# ------------------------------------------------------------------------- 6. modes and atomicity
def test_exports_get_the_users_modes_and_run_files_are_replaced_atomically(ws, tmp_path: Path) -> None:
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        _run(ws, out, max_steps=2, checkpoint_every=2, export="compact")
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "final").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "final" / "model.safetensors").stat().st_mode) == 0o644
    # recipe.yaml is replaced, never rewritten in place: a reader holding the old file keeps it whole
    os.link(out / "recipe.yaml", tmp_path / "held.yaml")
    held = (tmp_path / "held.yaml").read_text()
    _run(ws, out, max_steps=2, checkpoint_every=2, export="compact", log_every=1)
    assert (tmp_path / "held.yaml").read_text() == held
    assert "log_every: 1" in (out / "recipe.yaml").read_text()
    assert not list(out.glob("*.part"))
