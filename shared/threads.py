"""CPU thread settings of every command, chosen once before torch starts its thread pool.

PyTorch's OpenMP threads spin while they wait for work (GNU OpenMP's default wait policy). On a
machine whose cores are busy with other jobs, that spinning fights the other jobs for the cores: on
a 2-core machine under load, a 256-token forward of a small Llama took 3.4-6.0 s with the default
two spinning threads, against 0.66-0.99 s with two passive ones and 0.41-0.67 s with one thread.

So each command, unless the user decided:

- sets ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep while idle; no change to any result);
- uses as many intra-op threads as the machine's physical cores, but no more than the CPUs this
  process may run on (``os.sched_getaffinity``, a cgroup CPU quota), shared among the ranks a
  launcher started on this machine (``LOCAL_WORLD_SIZE``). On an unshared machine that is the
  number PyTorch picks itself, so results and speed stay as they were there.

``OMP_NUM_THREADS`` (or ``torch.set_num_threads`` in library code) and ``OMP_WAIT_POLICY`` set by
the user are kept; ``torchrun`` sets ``OMP_NUM_THREADS=1`` per rank when it starts several. On a
busy machine ``OMP_NUM_THREADS=1`` is often fastest; the note the commands print says so when the
load is above the core count. Setting the environment before torch is imported matters: OpenMP
reads its wait policy once, when the library loads.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ThreadChoice:
    """What ``configure_cpu_threads`` decided."""

    threads: int
    """Intra-op threads of this process."""
    source: str
    """Why: ``OMP_NUM_THREADS`` (the user's), ``torch.set_num_threads`` (torch loaded before), or the rule."""
    wait_policy: str
    """The OpenMP wait policy in effect (``PASSIVE`` unless the user set another)."""
    note: str
    """The one line the commands print."""


def _physical_cores() -> int | None:
    try:
        import psutil  # a dependency of accelerate and DeepSpeed

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def _cgroup_cpus(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """CPUs a cgroup v2 quota allows (``quota period``; ``max`` means no limit), else None."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def usable_cpus() -> int:
    """Physical cores, at most the CPUs this process may run on (affinity mask, cgroup quota)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limits = [logical, _physical_cores() or logical, _cgroup_cpus() or logical]
    return max(1, min(limits))


def configure_cpu_threads(
    log: Callable[[str], None] | None = print, environ: dict[str, str] | None = None
) -> ThreadChoice:
    """Choose the CPU threads of this process (see the module docstring) and print one note.

    Call it before torch is imported (the wait policy only takes effect then). If torch is loaded
    already (library use, tests), its thread count stays as it is unless ``OMP_NUM_THREADS`` names
    another, which is then applied with ``torch.set_num_threads``.

    Args:
        log: where the one-line note goes (None: nowhere).
        environ: the environment to read and update (``os.environ`` when None; tests pass a dict).

    Returns:
        The choice made.
    """
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    policy = env["OMP_WAIT_POLICY"]
    user = env.get("OMP_NUM_THREADS", "").strip()
    torch = sys.modules.get("torch")
    chosen = False  # True when this function picked the number (the note then says how to override)
    if user.isdigit() and int(user) > 0:
        threads, source = int(user), "OMP_NUM_THREADS"
    elif torch is not None:  # library use: whoever loaded torch has had its say (torch.set_num_threads)
        threads, source = torch.get_num_threads(), "torch.set_num_threads"
    else:
        ranks = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
        cpus = usable_cpus()
        threads = max(1, cpus // ranks)
        source = f"{cpus} usable cores" + (f" / {ranks} local ranks" if ranks > 1 else "")
        env["OMP_NUM_THREADS"] = str(threads)  # read by torch when it loads, and by child processes
        chosen = True
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # OMP_NUM_THREADS set after torch loaded is not read any more
    note = f"CPU threads: {threads} ({source}), OMP_WAIT_POLICY={policy}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if chosen:
        note += "; set OMP_NUM_THREADS to choose"
        if threads > 1 and load > usable_cpus():
            note += f" (the machine is busy, load {load:.1f}: OMP_NUM_THREADS=1 is often faster)"
    if log is not None:
        log(note)
    return ThreadChoice(threads, source, policy, note)
