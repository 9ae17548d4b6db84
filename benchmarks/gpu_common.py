"""Shared by the stages of ``scripts/gpu_check.sh`` (``gpu_ceilings``, ``gpu_correctness``, ``gpu_sweep``,
``gpu_profile``, ``gpu_summary``): dry-run setup, the device, markdown tables, JSON files, SIGTERM handling.

    python -m benchmarks.gpu_common stem [--dry-run]    # prints the results' file stem, <device-slug>-<YYYY-MM-DD>

Every stage has a ``--dry-run`` that runs its plumbing on tiny CPU stand-ins (no CUDA device needed): the ``cpu``
backend stands in for ``cuda``, Triton runs under ``TRITON_INTERPRET=1`` (set here before Triton is imported),
CUDA graphs and CUDA events are skipped with a note. The interpreter must be switched on before ``ilora_kernels``
(which imports triton) is imported, so the stage modules import only this module at their top and everything else
inside ``main`` after ``prepare``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["Terminated", "error_text", "log", "prepare", "device", "sync", "md_table", "text_table", "write_json",
           "read_json", "write_text", "install_sigterm", "backend_for_run", "Deadline", "time_ms"]


class Terminated(Exception):
    """Raised by the SIGTERM handler (``install_sigterm``): the stage writes what it has and exits."""


def error_text(exc: BaseException) -> str:
    """``Type: first line`` of an exception, at most 300 characters (the benchmark runner's format)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(dry_run: bool) -> None:
    """Call first thing in a stage's ``main``: a dry run switches the Triton interpreter on before triton and
    ilora_kernels are imported (both read TRITON_INTERPRET once per process); refuses if that is too late."""
    if not dry_run or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise SystemExit("--dry-run needs TRITON_INTERPRET=1 before triton is imported: set it in the environment")
    os.environ["TRITON_INTERPRET"] = "1"


def device(dry_run: bool):
    """cuda (a real run, which needs a CUDA device) or cpu (a dry run)."""
    import torch

    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("this stage needs a CUDA device (use --dry-run to exercise it on CPU stand-ins)")
    return torch.device("cuda")


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def backend_for_run(name: str, dry_run: bool) -> str:
    """The backend a stage runs for ``name``: in a dry run the C++ CPU kernels stand in for the CUDA ones."""
    return "cpu" if dry_run and name == "cuda" else name


def time_ms(fn: Callable[[], object], dev, reps: int, rounds: int = 3) -> float:
    """Best over ``rounds`` of the mean time of ``reps`` back-to-back calls, in ms: CUDA events on a GPU (kernel
    time, the calls queued back to back), perf_counter on CPU."""
    import torch

    best = float("inf")
    for _ in range(rounds):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - t0) * 1e3 / reps)
    return best


class Deadline:
    """Wall-clock budget of a stage: ``left()`` seconds remain; ``spent()`` once none do (None: no limit)."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> List[str]:
    """A markdown table; the columns whose index is in ``right`` are right-aligned; ``|`` in cells is escaped."""
    def cell(v) -> str:
        return str("" if v is None else v).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return lines


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> List[str]:
    """A fixed-width text table (the summary printed last)."""
    cells = [[str("" if v is None else v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells if i < len(r)]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*(r + [""] * (len(headers) - len(r)))) for r in cells]
    return [line.rstrip() for line in out]


def write_json(path: Optional[str], obj) -> None:
    """Atomic: a stage killed mid-write leaves the previous version."""
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> Optional[Dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_text(path: Optional[str], lines: Sequence[str]) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _on_sigterm(signum, frame):
    raise Terminated(f"signal {signum}")


def install_sigterm() -> None:
    """SIGTERM (from ``timeout``) raises Terminated, so a stage writes what it measured before it exits."""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_common", description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("stem",))
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    from .run import result_stem

    print(result_stem("gpu", dry=args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
