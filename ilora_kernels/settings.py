"""The ``ILORA_*`` environment variables of the runtime, read in one place, once, on first use.

``VARIABLES`` lists them (variable, ``Settings`` field, parser); the table in ``docs/api.md`` ("Environment
variables") says what each one does, and a test keeps the two in step. ``TRITON_INTERPRET`` (Triton's own switch)
is read here too.

Booleans accept ``1/0``, ``true/false``, ``yes/no``, ``on/off``; an unset or empty variable takes the default; any
other value raises ``ValueError`` naming the variable. The values are read the first time ``get()`` is called (the
first kernel call, or importing the PEFT integration) and then kept: a process that changes ``os.environ`` later
calls ``reload()``. ``override(...)`` changes fields for a ``with`` block (tests, benchmarks).

Build-time switches (``ILORA_SKIP_EXTENSION``, ``ILORA_FORCE_CUDA``, ``ILORA_SKIP_CUDA``, ``TORCH_CUDA_ARCH_LIST``,
``MAX_JOBS``) are read by ``setup.py`` alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Callable, Iterator, List, Mapping, Optional, Tuple, Union

__all__ = ["Settings", "VARIABLES", "describe", "get", "override", "reload"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
BASE_GEMM_MODES = ("auto", "fused", "cublas")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The runtime switches (field = lower-case variable name without ``ILORA_``)."""

    triton_base_gemm: str = "auto"
    triton_fused_v: Optional[bool] = None      # None: the backend's default (on under the interpreter, off on CUDA)
    triton_shrink_split: Union[str, int] = "auto"   # "auto" or a positive int: the d_in split of the shrink-route
    deterministic: bool = False
    eager_fast_path: bool = True
    allow_untested_peft: bool = False
    triton_interpret: bool = False


def _boolean(variable: str, text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{variable} must be one of {_TRUE + _FALSE}, got {text!r}")


def _base_gemm(variable: str, text: str) -> str:
    low = text.lower()
    if low not in BASE_GEMM_MODES:
        raise ValueError(f"{variable} must be 'fused', 'cublas' or 'auto', got {text!r}")
    return low


def _split(variable: str, text: str) -> Union[str, int]:
    low = text.lower()
    if low == "auto":
        return low
    try:
        value = int(low)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{variable} must be 'auto' or a positive integer (the number of d_in chunks), got {text!r}")
    return value


# (environment variable, Settings field, parser of a non-empty value)
VARIABLES: Tuple[Tuple[str, str, Callable[[str, str], object]], ...] = (
    ("ILORA_TRITON_BASE_GEMM", "triton_base_gemm", _base_gemm),
    ("ILORA_TRITON_FUSED_V", "triton_fused_v", _boolean),
    ("ILORA_TRITON_SHRINK_SPLIT", "triton_shrink_split", _split),
    ("ILORA_DETERMINISTIC", "deterministic", _boolean),
    ("ILORA_EAGER_FAST_PATH", "eager_fast_path", _boolean),
    ("ILORA_ALLOW_UNTESTED_PEFT", "allow_untested_peft", _boolean),
    ("TRITON_INTERPRET", "triton_interpret", _boolean),
)

_current: Optional[Settings] = None
_lock = threading.Lock()


def read(environ: Mapping[str, str]) -> Settings:
    """The settings an environment gives (raises ``ValueError`` naming a variable with a bad value)."""
    values = {}
    for variable, name, parse in VARIABLES:
        text = environ.get(variable, "").strip()
        if text:
            values[name] = parse(variable, text)
    return Settings(**values)


def get() -> Settings:
    """The settings of this process, read from ``os.environ`` on the first call."""
    current = _current
    if current is None:
        current = reload()
    return current


def reload() -> Settings:
    """Re-reads ``os.environ`` (after a change to it) and returns the new settings."""
    global _current
    with _lock:
        _current = read(os.environ)
        return _current


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """``with override(triton_base_gemm="cublas"):`` runs the block with those fields changed."""
    global _current
    previous = get()
    with _lock:
        _current = dataclasses.replace(previous, **changes)
    try:
        yield _current
    finally:
        with _lock:
            _current = previous


def describe() -> List[str]:
    """One ``VARIABLE=value`` line per setting, as this process sees them (for ``python -m ilora_kernels.env``)."""
    def text(value) -> str:
        if value is None:
            return "(unset: the backend's default)"
        return str(int(value)) if isinstance(value, bool) else str(value)

    current = get()
    return [f"{variable}={text(getattr(current, name))}" for variable, name, _ in VARIABLES]
