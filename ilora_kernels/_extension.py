"""Loads the optional compiled extension ``ilora_kernels._C`` and remembers why it is unavailable."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

_loaded: Optional[bool] = None
_reason: str = ""
_cuda_built: bool = False


def load() -> bool:
    """Imports ``ilora_kernels._C`` once; on failure warns once and returns False (the package falls back)."""
    global _loaded, _reason, _cuda_built
    if _loaded is not None:
        return _loaded
    try:
        from . import _C  # noqa: F401  (registers the C++ ops)
    except ImportError as exc:
        _loaded = False
        text = str(exc)
        if "undefined symbol" in text or "version" in text.lower():
            _reason = (f"ilora_kernels._C was built for another torch than the installed {torch.__version__} "
                       f"({text.splitlines()[0]}); rebuild with `pip install --no-build-isolation -e .`")
        elif "No module named" in text or "cannot import name '_C'" in text:
            _reason = ("ilora_kernels._C is not built (installed with ILORA_SKIP_EXTENSION=1, or from a pure-Python "
                       "wheel); the cpu and cuda backends fall back to reference")
        else:
            _reason = f"ilora_kernels._C failed to import: {text.splitlines()[0] if text else exc!r}"
        warnings.warn(_reason, RuntimeWarning, stacklevel=3)
        return False
    built_for = _C.torch_version()
    if built_for.split("+")[0] != torch.__version__.split("+")[0]:
        _loaded = False
        _reason = (f"ilora_kernels._C was built for torch {built_for} but torch {torch.__version__} is installed; "
                   f"rebuild with `pip install --no-build-isolation -e .`")
        warnings.warn(_reason, RuntimeWarning, stacklevel=3)
        return False
    _loaded = True
    _cuda_built = bool(_C.with_cuda())
    return True


def cuda_built() -> bool:
    return load() and _cuda_built


def unavailable_reason() -> str:
    load()
    return _reason
