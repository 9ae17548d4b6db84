"""``python -m ilora_kernels.env``: versions, every backend with its availability (and the reason when it is not
available), and what backend="auto" picks per device and dtype."""

from __future__ import annotations

import subprocess
import sys

import torch

from ilora_kernels import env
from ilora_kernels.functional import BACKENDS, available_backends, resolve_backend


def test_report_lists_every_backend_with_a_reason():
    text = env.report()
    lines = text.splitlines()
    assert lines[0].startswith("ilora_kernels ") and any(line.startswith("torch ") for line in lines)
    rows = lines[lines.index("backends:") + 1:]
    for name, reason in available_backends().items():
        row = next(line for line in rows if line.split()[:1] == [name])
        assert row.split(None, 1)[1] == ("available" if reason is None else f"unavailable: {reason}")
    assert set(BACKENDS) == set(available_backends())


def test_report_states_the_auto_choice():
    lines = env.report().splitlines()
    cpu_row = lines[lines.index('backend="auto" picks:') + 1].split(None, 1)
    assert cpu_row[0] == "cpu"
    for item in cpu_row[1].split(", "):
        dtype_name, picked = item.split(" -> ")
        assert picked == resolve_backend("auto", torch.empty(0, dtype=getattr(torch, dtype_name)))


def test_module_runs_as_a_script():
    out = subprocess.run([sys.executable, "-m", "ilora_kernels.env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout and 'backend="auto" picks:' in out.stdout
