"""Training checkpoints: complete, atomic, verified, rotated, and found again on resume.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/`` holding

- the DeepSpeed engine state (module, ZeRO-partitioned optimizer, LR scheduler), written by
  ``engine.save_checkpoint``;
- ``rank_<r>.json`` / ``rank_<r>.safetensors`` per rank: the data loader position (stream states,
  shuffle buffer and its generator) and the RNG states of torch (CPU and CUDA), numpy and random;
- ``trainer_state.json``: step, tokens seen, world size, ZeRO stage, time;
- ``recipe.yaml`` (resolved) and ``plan.json``;
- ``manifest.json``, written last: every file with its size (and crc32 when enabled).

Writing goes to ``.tmp-step_<N>/`` first; once every rank has finished and the manifest is on disk,
rank 0 renames the directory to ``step_<N>``, then rewrites the ``latest`` pointer (itself via a
temporary file and a rename), and only then deletes checkpoints beyond ``keep_last``. A process
killed at any moment therefore leaves either the previous checkpoints untouched or a complete new
one. On resume the newest checkpoint whose manifest checks out and whose engine state loads is
used; a truncated or corrupt one is skipped with a warning, but checkpoints that exist and are all
unusable stop the run (``--resume restart`` sets them aside and starts over).

DeepSpeed's files are pickles. They are only ever unpickled with ``weights_only=True`` and an
allow-list of the few DeepSpeed classes they hold (``SAFE_GLOBALS``): every ``*.pt`` file is
checked that way before a checkpoint is used, and the engine loads through the same restricted
loader. A file that names anything else is refused (``UnsafeCheckpointError``), never run.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flexigpt.shared.files import write_text_atomic
from flexigpt.shared.train.data import load_loader_state, save_loader_state
from flexigpt.shared.train.guards import TrainingError, describe_write_error

TAG_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed into this run (world size, plan, ...); the message says how to proceed."""

    exit_status = 2  # a refused run: the commands print the message and exit with this status


class UnsafeCheckpointError(ResumeError):
    """A checkpoint file holds pickled objects outside the allow-list: it is refused, never loaded."""


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written; the partial directory is gone, the previous ones are intact."""


def _safe_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its checkpoint files (besides tensors and plain containers)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, map_location: Any = None, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` and the allow-list of DeepSpeed's checkpoint classes.

    Raises:
        UnsafeCheckpointError: the file names a global outside the allow-list.
        pickle.UnpicklingError, RuntimeError, OSError: the file is corrupt or unreadable.
    """
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" in text or "global" in text:
            what = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), text.splitlines()[0])
            raise UnsafeCheckpointError(
                f"{path} holds pickled objects outside the checkpoint allow-list ({what}); it is refused "
                "unloaded, since unpickling it could run code. Use checkpoints only from sources you trust"
            ) from None
        raise


class SafeLoads:
    """A DeepSpeed checkpoint engine whose loads go through ``safe_torch_load`` (saves are unchanged).

    DeepSpeed loads with ``weights_only=False``; its checkpoint engine is the one place every
    load of ``engine.load_checkpoint`` goes through, so the engine's own is wrapped there.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        """Load a checkpoint file with the allow-list."""
        return safe_torch_load(path, map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install_safe_loads(engine: Any) -> None:
    """Make `engine` load its checkpoint files with ``weights_only=True`` and the allow-list."""
    if not isinstance(engine.checkpoint_engine, SafeLoads):
        engine.checkpoint_engine = SafeLoads(engine.checkpoint_engine)


def check_pickles(d: Path, names: list[str] | None = None) -> str | None:
    """Unpickle the ``*.pt`` files of `d` (or `names`) with the allow-list, tensors memory-mapped.

    Returns:
        Why one is unusable (corrupt), or None.

    Raises:
        UnsafeCheckpointError: a file names a global outside the allow-list.
    """
    for name in names if names is not None else sorted(p.name for p in d.glob("*.pt")):
        try:
            safe_torch_load(d / name, map_location="cpu", mmap=True)
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as e:
            return f"{name} does not load: {e.__class__.__name__}"
    return None


def tag_for(step: int) -> str:
    """Directory name of the checkpoint at `step`."""
    return f"step_{step:08d}"


# ------------------------------------------------------------------------------------ collectives
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_true(flag: bool) -> bool:
    """True on every rank iff `flag` is True on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item()) == 0


def _gather_dicts(d: dict[str, Any]) -> dict[str, Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return d
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, d)
    merged: dict[str, Any] = {}
    for part in out:
        merged.update(part)
    return merged


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This process's RNG states as (JSON-able part, tensors)."""
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Restore the states captured by ``rng_state``."""
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


# ------------------------------------------------------------------------------------- integrity
def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)


def _describe_files(d: Path, names: list[str], checksums: bool) -> dict[str, Any]:
    out = {}
    for name in names:
        p = d / name
        _fsync(p)
        out[name] = {"size": p.stat().st_size, "crc32": _crc32(p) if checksums else None}
    return out


def check_manifest(d: Path, checksums: bool = True) -> str | None:
    """Why checkpoint directory `d` is unusable (this rank's share of the files), or None if it checks out."""
    rank, world = _rank_world()
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"no readable {MANIFEST} ({e.__class__.__name__})"
    names = sorted(files)
    for name in names:
        if not (d / name).is_file():
            return f"{name} is missing"
        if (d / name).stat().st_size != files[name]["size"]:
            return f"{name} has {(d / name).stat().st_size} bytes, the manifest says {files[name]['size']}"
    if checksums:
        for name in names[rank::world]:
            want = files[name].get("crc32")
            if want is not None and _crc32(d / name) != want:
                return f"{name} fails its crc32 check"
    return None


# --------------------------------------------------------------------------------------- saving
@dataclass
class CheckpointInfo:
    """What a checkpoint says about the run that wrote it."""

    path: Path
    step: int
    tokens_seen: int
    world_size: int
    zero_stage: int
    plan_json: str | None


def save_checkpoint(
    engine: Any,
    root: str | Path,
    *,
    step: int,
    tokens_seen: int,
    loader_state: dict[str, Any],
    recipe_yaml: str,
    plan_json: str | None,
    zero_stage: int,
    keep_last: int,
    checksums: bool = True,
) -> Path:
    """Write a complete checkpoint of every rank atomically; called by all ranks.

    Args:
        engine: the DeepSpeed engine.
        root: the checkpoints directory.
        step: optimizer steps done.
        tokens_seen: training tokens consumed by all ranks so far.
        loader_state: this rank's ``PackedLoader.state_dict()``.
        recipe_yaml: the resolved recipe.
        plan_json: the model's plan (None for models without one).
        zero_stage: ZeRO stage of the engine.
        keep_last: checkpoints to keep (older ones are deleted after this one is complete).
        checksums: record a crc32 of every file.

    Returns:
        The final checkpoint directory.
    """
    rank, world = _rank_world()
    root = Path(root)
    tag = tag_for(step)
    tmp = root / f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    error: BaseException | None = None
    try:
        engine.save_checkpoint(
            str(root), tag=tmp.name, client_state={"flexigpt_step": step}, save_latest=False
        )
        meta, tensors = rng_state()
        save_loader_state(
            {**loader_state, "rng_meta": meta, **{f"rng_{k}": v.numpy() for k, v in tensors.items()}},
            tmp / f"rank_{rank:05d}",
        )
        if rank == 0:
            state = {
                "step": step,
                "tokens_seen": tokens_seen,
                "world_size": world,
                "zero_stage": zero_stage,
                "time": time.time(),
            }
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1) + "\n")
            (tmp / "recipe.yaml").write_text(recipe_yaml)
            if plan_json is not None:
                (tmp / "plan.json").write_text(plan_json + "\n")
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError (iostream error)
        error = e
    if not _all_true(error is None):
        reason = describe_write_error(tmp, error) if error is not None else "it failed on another rank"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"writing checkpoint {root / tag} failed: {reason} (in {tmp}); the partial directory was "
            f"removed, the previous checkpoints are intact ({read_latest(root) or 'none'}). Free space or "
            "fix the output directory, then run the same command again to resume"
        )
    names = _files(tmp)
    described = _gather_dicts(_describe_files(tmp, names[rank::world], checksums))
    if rank == 0:
        _write_atomic(tmp / MANIFEST, json.dumps({"step": step, "files": described}, indent=1) + "\n")
        final = root / tag
        old = root / f".old-{tag}"
        if final.exists():  # the same step written again (weights-only resume): swap, then delete
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _write_atomic(root / "latest", tag + "\n")
        _prune(root, keep_last, keep=final)
    _barrier()
    return root / tag


def _write_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    # `keep` (the checkpoint just written) counts first: a newer directory left by another timeline
    # (the trainer sets those aside on resume) must never push the newest good state out
    others = [p for p in list_checkpoints(root) if p != keep]
    for old in others[keep_last - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def read_latest(root: Path) -> str | None:
    """The tag the ``latest`` pointer names, if any."""
    try:
        return (Path(root) / "latest").read_text().strip() or None
    except OSError:
        return None


def set_aside(paths: list[Path], why: str) -> list[Path]:
    """Rename checkpoint directories to ``.<why>-step_N`` (rank 0): kept on disk, never resumed or rotated.

    Returns:
        The new paths.
    """
    moved = []
    if _rank_world()[0] == 0:
        for p in paths:
            target = p.with_name(f".{why}-{p.name}")
            if target.exists():
                shutil.rmtree(target)
            os.replace(p, target)
            moved.append(target)
    _barrier()
    return moved


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under `root`, newest first (temporary ones excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(found, key=lambda p: int(TAG_RE.match(p.name).group(1)), reverse=True)


def clean_partial(root: str | Path) -> None:
    """Delete temporary directories left by a save that was killed (rank 0 only)."""
    root = Path(root)
    if root.is_dir() and _rank_world()[0] == 0:
        for p in [*root.glob(".tmp-step_*"), *root.glob(".old-step_*")]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()


def read_info(path: Path) -> CheckpointInfo:
    """The trainer state of a checkpoint directory."""
    s = json.loads((path / TRAINER_STATE).read_text())
    plan = path / "plan.json"
    return CheckpointInfo(
        path=path,
        step=int(s["step"]),
        tokens_seen=int(s["tokens_seen"]),
        world_size=int(s["world_size"]),
        zero_stage=int(s["zero_stage"]),
        plan_json=plan.read_text().strip() if plan.is_file() else None,
    )


# -------------------------------------------------------------------------------------- resuming
def pick_checkpoint(
    root: str | Path, checksums: bool = True, explicit: str | Path | None = None
) -> list[CheckpointInfo]:
    """Usable checkpoints, newest first; invalid ones are skipped with a warning (all ranks agree).

    Args:
        root: the checkpoints directory.
        checksums: verify crc32s recorded in the manifests.
        explicit: a specific checkpoint directory instead of scanning `root`.

    Raises:
        ResumeError: `explicit` is given but unusable.
        UnsafeCheckpointError: a checkpoint file names a pickled global outside the allow-list.
    """
    candidates = [Path(explicit)] if explicit is not None else list_checkpoints(root)
    good = []
    rank, world = _rank_world()
    for path in candidates:
        reason = check_manifest(path, checksums)
        unsafe = None
        if reason is None:
            pickles = sorted(p.name for p in path.glob("*.pt"))
            try:
                reason = check_pickles(path, pickles[rank::world])
            except UnsafeCheckpointError as e:
                unsafe, reason = str(e), "unsafe"
        if not _all_true(unsafe is None):  # every rank stops, with the file where one rank found it
            raise UnsafeCheckpointError(
                unsafe or f"{path}: a file holds pickled objects outside the allow-list"
            )
        ok = _all_true(reason is None)
        if ok:
            try:
                good.append(read_info(path))
                continue
            except (OSError, ValueError, KeyError) as e:
                reason = f"unreadable {TRAINER_STATE}: {e}"
        reason = reason or "a file failed its check on another rank"
        if explicit is not None:
            raise ResumeError(f"checkpoint {path} is unusable: {reason}")
        warnings.warn(
            f"checkpoint {path} is incomplete or corrupt ({reason}); falling back to the previous one",
            stacklevel=2,
        )
    return good


def load_rank_state(path: Path, rank: int) -> dict[str, Any]:
    """This rank's loader state from a checkpoint; restores its RNG states as a side effect."""
    state = load_loader_state(path / f"rank_{rank:05d}")
    meta = state.pop("rng_meta")
    tensors = {k[4:]: torch.from_numpy(state.pop(k)) for k in [k for k in state if k.startswith("rng_torch")]}
    set_rng_state(meta, tensors)
    return state


def load_engine_state(engine: Any, info: CheckpointInfo) -> bool:
    """Load module, optimizer and scheduler from `info` into `engine`; False (on every rank) if any rank failed."""
    install_safe_loads(engine)
    try:
        load_path, _ = engine.load_checkpoint(str(info.path.parent), tag=info.path.name)
        ok = load_path is not None
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # a corrupt file surfaces as any of pickle / zip / torch errors
        warnings.warn(f"checkpoint {info.path} failed to load: {e.__class__.__name__}: {e}", stacklevel=2)
        ok = False
    return _all_true(ok)
