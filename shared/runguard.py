"""Guards of a run directory and of the processes that write it: one run per ``output_dir``, no orphans.

``run_lock(output_dir)`` holds an exclusive ``flock`` on ``output_dir/.flexigpt.lock`` for the whole
run; train, grow and prune take it before they write anything. A second run on the same directory
is refused with the pid and host of the holder, written in the lock file. The kernel drops the lock
when its process dies, however it dies (``kill -9`` included), so a lock file left behind by a dead
run is never stale: the next run simply takes it. The lock is re-entrant within one process, so a
grow or prune command that holds it can hand its run to the trainer, which asks for it again.

``stop_with_launcher()`` makes a rank started by ``torchrun`` / ``deepspeed`` receive SIGTERM when
its launcher dies (Linux ``PR_SET_PDEATHSIG``). torchrun starts every rank in a session of its own,
so killing the launcher's process group does not reach them; without this they would go on
training beside a restarted run. SIGTERM is the trainer's preemption signal: the ranks write a
checkpoint at the next step boundary and exit. A watchdog thread covers the rest (no ``prctl``, or
a rank stuck where it cannot reach a step boundary): once the parent is gone it waits a grace
period, then ends the process.

Importing this module loads no torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".flexigpt.lock"
PR_SET_PDEATHSIG = 1
# Seconds an orphaned rank gets to checkpoint after its launcher died, before the watchdog ends it.
ORPHAN_GRACE_S = 300.0

_held: dict[Path, tuple[int, int, bool]] = {}  # output_dir -> (lock fd, depth, created by this lock)
_held_guard = threading.Lock()
_guarded_parent: int | None = None  # the launcher pid stop_with_launcher watches, once installed


class RunLockError(RuntimeError):
    """Another run holds ``output_dir``, or ``output_dir`` cannot hold a run; the message says which."""

    exit_status = 2  # a refused run: the commands print the message and exit with this status


def _holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text() or "{}")
        return f"pid {info.get('pid', '?')}, host {info.get('host', '?')}"
    except (OSError, ValueError):
        return "pid ?, host ?"


def _acquire(out: Path) -> int:
    if out.exists() and not out.is_dir():
        raise RunLockError(f"output_dir={str(out)!r} is a file; it must be a directory (or not exist yet)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunLockError(f"output_dir={str(out)!r} cannot be used: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunLockError(f"output_dir={str(out)!r}: cannot lock {LOCK_NAME}: {e.strerror}") from None
        raise RunLockError(
            f"another run ({_holder(out / LOCK_NAME)}) is using {out}; wait for it to end, stop it, "
            "or use another output_dir"
        ) from None
    # the holder's identity, for the refusal message of the next run (the lock itself is the flock)
    os.ftruncate(fd, 0)
    os.pwrite(
        fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0
    )
    return fd


@contextmanager
def run_lock(output_dir: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of `output_dir` (created if missing) while inside.

    Args:
        output_dir: the run directory.

    Yields:
        The lock file.

    Raises:
        RunLockError: another process holds the lock, or `output_dir` is a file / cannot be created.
    """
    out = Path(output_dir).resolve()
    with _held_guard:
        if out in _held:
            fd, depth, created = _held[out]
            _held[out] = (fd, depth + 1, created)
        else:
            created = not out.exists()
            _held[out] = (_acquire(out), 1, created)
    try:
        yield out / LOCK_NAME
    finally:
        with _held_guard:
            fd, depth, created = _held[out]
            if depth > 1:
                _held[out] = (fd, depth - 1, created)
            else:
                del _held[out]
                # A run refused before it wrote anything leaves no trace: the directory it created
                # holds only the lock, which is removed while still held (a run starting now then
                # fails on this lock or makes a new one), never after release.
                if created and _only_lock(out):
                    with contextlib.suppress(OSError):
                        (out / LOCK_NAME).unlink()
                        out.rmdir()
                fcntl.flock(fd, fcntl.LOCK_UN)  # a kept file stays: deleting it after release would race
                os.close(fd)


def _only_lock(out: Path) -> bool:
    try:
        return [p.name for p in out.iterdir()] == [LOCK_NAME]
    except OSError:
        return False


def stop_with_launcher(grace_s: float = ORPHAN_GRACE_S) -> bool:
    """Under a launcher, end this rank when the launcher (its parent process) dies.

    Asks the kernel for SIGTERM on the parent's death (Linux) and starts a daemon watchdog that
    ends the process `grace_s` seconds after the parent is gone, whatever it is doing then.

    Args:
        grace_s: seconds between the parent's death and a forced exit.

    Returns:
        True when the guard was installed (a launcher's ``RANK`` is set), False otherwise.
    """
    global _guarded_parent
    if "RANK" not in os.environ or "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return False
    parent = os.getppid()
    if _guarded_parent == parent:  # installed already (a command, then the trainer it hands over to)
        return True
    _guarded_parent = parent
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still ends the process
    if os.getppid() != parent:  # the launcher died before the request above took effect
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # in case no parent-death signal came
        time.sleep(grace_s)
        os._exit(128 + int(signal.SIGTERM))

    threading.Thread(target=watch, name="flexigpt-launcher-watchdog", daemon=True).start()
    return True
