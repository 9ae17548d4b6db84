"""CPU threads for the trainer's commands: a default per process, and a warning when processes x threads exceed
the cores (shared by ``ilora-crab`` train / eval / generate and the demo)."""

from __future__ import annotations

import os
import sys
from typing import Optional


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_world_size(env=None) -> int:
    """Processes of this launch on this machine: LOCAL_WORLD_SIZE, else WORLD_SIZE (torchrun / Accelerate set
    them), else 1."""
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        try:
            n = int(env.get(key, ""))
        except ValueError:
            continue
        if n > 0:
            return n
    return 1


def default_threads(cores: Optional[int] = None, processes: Optional[int] = None) -> int:
    """min(cores, 8) shared among this machine's processes, at least 1."""
    cores = available_cores() if cores is None else cores
    processes = local_world_size() if processes is None else processes
    return max(1, min(cores, 8) // max(1, processes))


def set_threads(requested: Optional[int], command: str = "train", env=None) -> int:
    """Sets torch's intra-op threads (and OMP_NUM_THREADS / MKL_NUM_THREADS, for worker processes) before any
    work: ``requested``, else OMP_NUM_THREADS when set, else ``default_threads()``. Warns in one line (local rank
    0 only) when threads x processes on this machine exceed the cores. Returns the thread count."""
    import torch

    env = os.environ if env is None else env
    cores, procs = available_cores(), local_world_size(env)
    n = requested
    if n is None:
        try:
            n = int(env.get("OMP_NUM_THREADS", ""))
        except ValueError:
            n = None
        if n is None or n < 1:
            n = default_threads(cores, procs)
    torch.set_num_threads(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(n)
    if n * procs > cores and env.get("LOCAL_RANK", "0") == "0":
        print(f"ilora-crab {command}: warning: {n} threads x {procs} process{'es' if procs > 1 else ''} = "
              f"{n * procs} > {cores} CPU cores: oversubscribed OpenMP threads wait on each other (often several "
              f"times slower); use --threads {max(1, cores // procs)}", file=sys.stderr, flush=True)
    return n
