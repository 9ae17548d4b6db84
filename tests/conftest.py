"""Test configuration. Without a CUDA device the Triton kernels run under the interpreter, which must be
switched on before any ``triton.jit`` decorator runs, so this happens before ilora_kernels is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def ilora_env(monkeypatch):
    """``ilora_env(ILORA_X="value", ...)`` sets environment variables for one test and has ``ilora_kernels.settings``
    read them again (it reads them once per process otherwise); both are restored after the test."""
    from ilora_kernels import settings

    def set_variables(**variables):
        for name, value in variables.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        settings.reload()

    yield set_variables
    monkeypatch.undo()
    settings.reload()
