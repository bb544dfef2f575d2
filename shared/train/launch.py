"""Long steps that rank 0 does alone, while the other ranks wait outside any collective.

Under a launcher (torchrun, deepspeed) rank 0 prunes or grows the model, and at the end of training
exports it, while the other ranks only need to know when it is done. Waiting in a process-group
barrier would put that wait under the group's timeout (DeepSpeed's default is 10 minutes, less than
pruning a 7B model takes), and the step would be killed part way. Here the other ranks wait on a key
in the launcher's rendezvous store instead (``env://``: the store the process group is built on
later, served by rank 0 or by torchrun's agent), with a wait limit of their own
(``train.rank0_wait_s``). Rank 0 sets the key when the step ends: ``done``, or ``failed`` with its
error, which the other ranks then report and exit on, instead of hanging or dying in a collective.

Keys are numbered per process (every rank runs the same steps in the same order) and carry the
launcher's restart count, so a restarted launch never reads the keys of an earlier attempt.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")

# The launcher's rendezvous store of this process (made at most once), or None.
_STORE: Any = None
_STEPS = 0  # steps run so far by this process: the number in the next key


def launched_rank_world() -> tuple[int, int]:
    """(rank, world size) that a launcher set in the environment; (0, 1) without one."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _under_launcher() -> bool:
    return launched_rank_world()[1] > 1 and all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT"))


def launch_store(timeout: timedelta) -> Any:
    """The launcher's rendezvous store (``env://``), made once; None without a multi-rank launcher.

    Args:
        timeout: how long a rank waits to reach the store when it is made.
    """
    global _STORE
    if _STORE is None and _under_launcher():
        import torch.distributed as dist

        if dist.is_initialized():  # a group someone else started: its own store
            _STORE = dist.distributed_c10d._get_default_store()
        else:
            rank, world = launched_rank_world()
            _STORE, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    return _STORE


def init_process_group_on_store(backend: str, timeout: timedelta) -> bool:
    """Start the default process group on this launch's store, if one was made; True if started.

    The group must be built on the store the rank-0 steps used: with a static ``env://``
    rendezvous, rank 0 serves that store on ``MASTER_PORT`` and a second one could not bind it.
    """
    import torch.distributed as dist

    if _STORE is None or dist.is_initialized():
        return False
    rank, world = launched_rank_world()
    # as torch's own env:// initialisation: the group's store operations time out with the group,
    # and its keys get a prefix of their own (the steps' waits pass their own limit)
    _STORE.set_timeout(timeout)
    store = dist.PrefixStore("default_pg", _STORE)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return True


def rank0_step(what: str, work: Callable[[], T], error: type[Exception], wait_s: float) -> T | None:
    """Run `work` on rank 0 only; every other rank waits until it is done, under no process-group timeout.

    Args:
        what: the step, for messages ("the pruning step").
        work: what rank 0 does; its result is returned there.
        error: the exception the other ranks raise when rank 0 failed or did not finish.
        wait_s: how long the other ranks wait (``train.rank0_wait_s``).

    Returns:
        The result of `work` on rank 0 (and without a launcher); None on the other ranks.

    Raises:
        error: on the other ranks, when rank 0 failed (with its message), stopped, or did not finish
            within `wait_s`.
    """
    global _STEPS
    _STEPS += 1
    rank, _ = launched_rank_world()
    wait = timedelta(seconds=wait_s)
    store = launch_store(wait)
    if store is None:
        return work()
    key = f"flexigpt/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/rank0_step{_STEPS}"
    if rank == 0:
        try:
            result = work()
        except BaseException as e:
            store.set(key, f"failed: {type(e).__name__}: {e}")
            _await_readers(store, key)
            raise
        store.set(key, "done")
        return result
    try:
        store.wait([key], wait)
        status = store.get(key).decode()
        store.add(f"{key}/read", 1)
    except RuntimeError as e:  # torch's DistStoreError / DistNetworkError
        raise error(
            f"{what}: rank 0 did not finish it within train.rank0_wait_s={wait_s:g} s or stopped ({e})"
        ) from e
    if status != "done":
        raise error(f"{what} failed on rank 0 ({status.removeprefix('failed: ')}); see rank 0's output")
    return None


def _await_readers(store: Any, key: str, limit_s: float = 10.0) -> None:
    # rank 0 may serve the store itself: it stays up until every rank has read why the step failed
    _, world = launched_rank_world()
    deadline = time.monotonic() + limit_s
    try:
        while store.add(f"{key}/read", 0) < world - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    except RuntimeError:
        pass  # a store that is gone already: the other ranks report that instead


__all__ = ["init_process_group_on_store", "launch_store", "launched_rank_world", "rank0_step"]
