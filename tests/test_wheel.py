"""Distribution: ``python -m build`` (sdist, then a wheel built from that sdist) with the extension skipped, and the
wheel installed into a fresh venv on this CPU machine. The fresh venv reuses the already-installed torch,
safetensors and numpy through a .pth file, so nothing is downloaded and no pip runs inside it (the outer pip
installs with ``--python``). About 10 s on 2 cores, so it is not marked slow."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import ilora_kernels

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("build") is None,
                       reason="needs the `build` package (pip install build)"),
    pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                       reason="needs a git checkout to list the source files"),
]

SMOKE = r"""
import importlib.metadata, json, os, sys, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ilora_kernels as ik
    report = ik.available_backends()
x = torch.randn(3, 8, requires_grad=True)
w, wr, a, b = torch.randn(6, 8), torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 6, 4)
y = ik.ilora_linear(x, w, None, wr, a, b, 2.0)
y.sum().backward()
pkg = os.path.dirname(ik.__file__)
print(json.dumps({"version": ik.__version__, "dist_version": importlib.metadata.version("ilora-kernels"),
                  "file": ik.__file__, "py_typed": os.path.exists(os.path.join(pkg, "py.typed")),
                  "backends": report, "y_shape": list(y.shape), "grad": x.grad is not None,
                  "warnings": [str(w.message) for w in caught]}))
"""


def _source_tree(dest: Path) -> Path:
    """A copy of the checkout's files (tracked + untracked, not ignored), so the build never writes into it."""
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listing):
        src = ROOT / rel
        if src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def test_build_sdist_and_wheel_and_install_into_fresh_venv(tmp_path):
    src = _source_tree(tmp_path / "src")
    out = tmp_path / "dist"
    env = {**os.environ, "ILORA_SKIP_EXTENSION": "1"}
    env.pop("PYTHONPATH", None)
    build = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    version = ilora_kernels.__version__
    sdists = list(out.glob("*.tar.gz"))
    wheels = list(out.glob("*.whl"))
    assert [p.name for p in sdists] == [f"ilora_kernels-{version}.tar.gz"]
    assert len(wheels) == 1 and wheels[0].name == f"ilora_kernels-{version}-py3-none-any.whl"

    import tarfile
    with tarfile.open(sdists[0]) as tar:
        names = tar.getnames()
    for needed in ("csrc/ilora_ops.cpp", "CHANGELOG.md", "ilora_kernels/py.typed", "setup.py", "pyproject.toml"):
        assert any(n.endswith(needed) for n in names), needed

    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
        metadata = whl.read(f"ilora_kernels-{version}.dist-info/METADATA").decode()
    assert "ilora_kernels/py.typed" in names and "ilora_kernels/peft_integration.py" in names
    assert not any(n.endswith((".so", ".pyd")) for n in names)
    assert f"Version: {version}" in metadata and "Requires-Dist: torch>=2.11" in metadata

    # a fresh venv that sees this interpreter's site-packages (torch & co.) through a .pth file
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "host_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "--quiet", str(wheels[0])], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]

    smoke = subprocess.run([str(python), "-c", SMOKE], cwd=tmp_path, env={**env, "PYTHONNOUSERSITE": "1"},
                           capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stdout[-4000:] + smoke.stderr[-4000:]
    report = json.loads(smoke.stdout.strip().splitlines()[-1])
    assert report["version"] == report["dist_version"] == version
    assert report["file"].startswith(str(env_dir)), report["file"]
    assert report["py_typed"] and report["grad"] and report["y_shape"] == [3, 6]
    assert report["backends"]["reference"] is None
    assert "not built" in report["backends"]["cpu"], report["backends"]
