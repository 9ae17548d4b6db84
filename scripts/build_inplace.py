"""Builds ``ilora_kernels/_C`` in place with ``torch.utils.cpp_extension.load``: no pip and no setuptools metadata.

The fallback of scripts/gpu_check.sh when ``pip install -e .`` cannot run there (for example a setuptools too old
for pyproject.toml), and a quick rebuild while editing csrc/. Uses the same sources, defines and switches as
setup.py: ILORA_SKIP_CUDA=1 (C++ CPU kernels only), TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME.

    python scripts/build_inplace.py        # -> ilora_kernels/_C.so (older _C*.so files there are removed)

The package is then used from the checkout (``python -m pytest`` from the repository root, or PYTHONPATH=.).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def main() -> int:
    import torch
    from torch.utils import cpp_extension

    sources = [ROOT / "csrc" / "ilora_ops.cpp", ROOT / "csrc" / "checks.cpp",
               *sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    cuda_sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    with_cuda = (not _flag("ILORA_SKIP_CUDA") and bool(cuda_sources) and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
    version = f'-DILORA_TORCH_VERSION=\\"{torch.__version__}\\"'  # the ninja file runs the compiler through a shell
    defines = ["-DILORA_WITH_CUDA"] if with_cuda else []
    build_dir = ROOT / "build" / "inplace"
    build_dir.mkdir(parents=True, exist_ok=True)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "(visible GPU)")
    print(f"build_inplace: torch {torch.__version__}, CUDA kernels: "
          f"{'yes, TORCH_CUDA_ARCH_LIST=' + archs if with_cuda else 'no'}", flush=True)
    start = time.time()
    cpp_extension.load(
        name="_C",
        sources=[str(p) for p in sources + (cuda_sources if with_cuda else [])],
        extra_cflags=["-O3", "-fopenmp", version, *defines],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo", version, *defines],
        extra_ldflags=["-fopenmp"],
        with_cuda=with_cuda,
        build_directory=str(build_dir),
        is_python_module=False,  # only load the ops here; the package imports the copy below as ilora_kernels._C
    )
    for stale in (ROOT / "ilora_kernels").glob("_C*.so"):
        stale.unlink()
    shutil.copy2(build_dir / "_C.so", ROOT / "ilora_kernels" / "_C.so")
    print(f"build_inplace: wrote ilora_kernels/_C.so in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
