"""Registers I-LoRA as a PEFT method as soon as PEFT is imported, without importing PEFT (about 4 s) with us.

``install()`` (run by ``import ilora_kernels``) registers at once when PEFT is already imported; otherwise it puts a
finder on ``sys.meta_path`` that lets PEFT's own loader run and then calls
``ilora_kernels.peft_integration.register_peft_method``. A PEFT outside the tested range gets a warning, not an
error, so the user's ``import peft`` keeps working."""

from __future__ import annotations

import importlib.abc
import sys
import warnings

_PEFT = "peft"


def _register() -> None:
    try:
        from . import peft_integration  # noqa: F401  (registers the method when imported)
    except ImportError as exc:
        warnings.warn(f"ilora_kernels: I-LoRA is not registered as a PEFT method: {exc}", stacklevel=3)


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    """Finds ``peft`` through the other finders and wraps its loader so that registration follows its import."""

    def find_spec(self, name, path=None, target=None):
        if name != _PEFT:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


def install() -> None:
    if _PEFT in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterPeft) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())
