"""The backend registry: one row per backend, and the choice of a backend for a tensor.

``BACKEND_TABLE`` is the whole list. A row names the module that implements the backend; that module is imported
the first time the backend is asked for, defines its two custom ops, hooks them up to the op contract
(``ops.contract.attach``) and calls ``register(name, ops)``. A module that cannot provide its backend on this
machine raises ``BackendUnavailable(reason)`` while it is imported (or calls ``mark_unavailable`` for one of the
several backends it provides); the reason is what ``available_backends()`` reports and what an explicit request for
the backend raises. Adding a backend is one module plus one row (``docs/kernel_design.md``, "Adding a backend").

``backend="auto"`` takes the first row, in table order, that is available, lists the tensor's device type in
``auto_on`` (``None``: every device) and supports its dtype. The table is ordered fastest first.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .contract import OpPair

__all__ = ["BACKENDS", "BACKEND_TABLE", "Backend", "BackendUnavailable", "available_backends", "backend_ops",
           "mark_unavailable", "register", "registered", "resolve", "resolve_backend"]

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    name: str
    module: str                              # imported on first use; registers the ops
    devices: Optional[Tuple[str, ...]]       # device types whose tensors it takes (None: any)
    dtypes: Tuple[torch.dtype, ...]
    auto_on: Optional[Tuple[str, ...]]       # device types on which "auto" may pick it (None: any)
    about: str


BACKEND_TABLE: Tuple[Backend, ...] = (
    Backend("triton", "ilora_kernels.ops.triton_ilora", ("cuda",), ALL_DTYPES[:3], ("cuda",),
            "Triton kernels (on CPU tensors too under TRITON_INTERPRET=1)"),
    Backend("cuda", "ilora_kernels.ops.compiled", ("cuda",), ALL_DTYPES, ("cuda",),
            "C++/CUDA kernels of ilora_kernels._C"),
    Backend("cpu", "ilora_kernels.ops.compiled", ("cpu",), ALL_DTYPES, ("cpu",),
            "C++ CPU kernels of ilora_kernels._C"),
    Backend("reference", "ilora_kernels.ops.reference", None, ALL_DTYPES, None,
            "plain PyTorch: the specification"),
)
BACKENDS: Tuple[str, ...] = tuple(row.name for row in BACKEND_TABLE)
_ROWS: Dict[str, Backend] = {row.name: row for row in BACKEND_TABLE}


class BackendUnavailable(ImportError):
    """Raised by a backend module, while it is imported, when its backend cannot run here; the message says why."""


registered: Dict[str, OpPair] = {}       # the ops of every backend loaded so far, by name
_devices: Dict[str, Tuple[str, ...]] = {}  # the device types a loaded backend takes, where not its row's
_dtypes: Dict[str, Tuple[Tuple[torch.dtype, ...], str]] = {}  # (dtypes, why) of a loaded backend, where not its row's
_reasons: Dict[str, str] = {}
_failed_modules: Dict[str, str] = {}
_lock = threading.RLock()


def register(name: str, ops: OpPair, devices: Optional[Tuple[str, ...]] = None,
             dtypes: Optional[Tuple[torch.dtype, ...]] = None, dtypes_reason: str = "") -> None:
    """Called by a backend module: ``ops`` (from ``contract.define`` or ``contract.attach``) now serve backend
    ``name``. ``devices``: the device types this process's build takes when they differ from the row's (the Triton
    interpreter runs on CPU tensors); ``auto`` still follows the row. ``dtypes``: the dtypes this build computes
    correctly when fewer than the row's (``dtypes_reason`` says why; ``auto`` and explicit requests both follow it)."""
    if name not in _ROWS:
        raise KeyError(f"register: {name!r} has no row in BACKEND_TABLE")
    if devices is not None:
        _devices[name] = tuple(devices)
    if dtypes is not None:
        _dtypes[name] = (tuple(dtypes), dtypes_reason)
    registered[name] = ops


def mark_unavailable(name: str, reason: str) -> None:
    """Called by a module that provides several backends when one of them cannot run here."""
    _reasons[name] = reason


def _load(name: str) -> Optional[str]:
    """Imports the backend's module once; None when the backend is usable, else the reason it is not."""
    if name in registered:
        return None
    with _lock:
        if name in registered:
            return None
        if name in _reasons:
            return _reasons[name]
        module = _ROWS[name].module
        reason = _failed_modules.get(module)
        if reason is None:
            try:
                importlib.import_module(module)
            except BackendUnavailable as exc:
                reason = str(exc)
            except Exception as exc:  # pragma: no cover - depends on the installed triton / extension build
                reason = f"{module} failed to import: {exc!r}"
            if reason is not None:
                _failed_modules[module] = reason
        if reason is None and name not in registered:
            reason = _reasons.get(name, f"{module} registered no ops for backend {name!r}")
        if reason is not None:
            _reasons[name] = reason
        return reason


def _available_row(name: str) -> Backend:
    """The row of backend ``name`` once its module is loaded; raises naming the choices or the reason."""
    row = _ROWS.get(name) if isinstance(name, str) else None
    if row is None:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    reason = _load(name)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} is unavailable: {reason}")
    return row


def backend_ops(name: str) -> OpPair:
    """The ops of an available backend (imports its module on first use); raises with the reason otherwise."""
    _available_row(name)
    return registered[name]


def available_backends() -> Dict[str, Optional[str]]:
    """Maps every backend name to None when it is usable here, or to the reason it is not."""
    return {name: _load(name) for name in BACKENDS}


def _dtype_names(dtypes) -> str:
    names = [str(d).split(".")[1] for d in dtypes]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def resolve(backend: str, device: str, dtype: torch.dtype) -> str:
    """The backend that runs tensors of ``device`` type and ``dtype``: ``backend`` itself when it can (else
    raises naming why), or the first fitting row of the table for ``"auto"``."""
    if backend == "auto":
        for row in BACKEND_TABLE:
            if ((row.auto_on is None or device in row.auto_on) and dtype in row.dtypes and _load(row.name) is None
                    and dtype in _dtypes.get(row.name, (row.dtypes,))[0]):
                return row.name
        raise RuntimeError(f"no backend runs {dtype} tensors on {device}")  # pragma: no cover - reference always
    row = _available_row(backend)
    dtypes, why = _dtypes.get(backend, (row.dtypes, ""))
    if dtype not in dtypes:
        raise TypeError(f"backend={backend!r} supports {_dtype_names(dtypes)}{' (' + why + ')' if why else ''}; "
                        f"x has dtype {dtype}")
    devices = _devices.get(backend, row.devices)
    if devices is not None and device not in devices:
        raise ValueError(f"backend={backend!r} needs {' or '.join(devices)} tensors, but x is on {device}")
    return backend


_resolved: Dict[Tuple[str, str, torch.dtype], str] = {}


def resolve_cached(backend: str, device: str, dtype: torch.dtype) -> str:
    """``resolve`` memoised on its arguments (the eager path); failures are not cached."""
    key = (backend, device, dtype)
    name = _resolved.get(key)
    if name is None:
        name = resolve(backend, device, dtype)
        _resolved[key] = name
    return name


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend ``ilora_linear`` uses for ``x`` (its device and dtype), or raises with the reason."""
    return resolve(backend, x.device.type, x.dtype)
