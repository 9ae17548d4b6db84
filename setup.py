"""Builds ilora_kernels and its optional compiled extension ``ilora_kernels._C``.

Install torch first, then ``pip install --no-build-isolation -e .`` so the extension is compiled against the
torch you run (build isolation would download another torch). Switches (environment variables, described in the
table of docs/api.md, "Environment variables"): ILORA_SKIP_EXTENSION, ILORA_FORCE_CUDA, ILORA_SKIP_CUDA,
TORCH_CUDA_ARCH_LIST (default: the visible GPU, else "8.0;9.0a"), MAX_JOBS.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _version() -> str:
    namespace = {}
    exec((ROOT / "ilora_kernels" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


def _extensions():
    if _flag("ILORA_SKIP_EXTENSION"):
        print("ilora_kernels: ILORA_SKIP_EXTENSION set, installing without the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit("ilora_kernels: torch must be installed before building the extension; install torch, then run "
                 "`pip install --no-build-isolation .` (or set ILORA_SKIP_EXTENSION=1 for a pure-Python install)")

    sources = [str(p.relative_to(ROOT)) for p in [ROOT / "csrc" / "ilora_ops.cpp", ROOT / "csrc" / "checks.cpp",
                                                  *sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]]
    cuda_sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
    cxx_flags = ["-O3", f'-DILORA_TORCH_VERSION="{torch.__version__}"']
    if sys.platform != "win32":
        cxx_flags.append("-fopenmp")

    has_toolkit = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    want_cuda = not _flag("ILORA_SKIP_CUDA") and (
        _flag("ILORA_FORCE_CUDA") or (has_toolkit and torch.cuda.is_available())
        or (has_toolkit and bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))))
    if _flag("ILORA_FORCE_CUDA") and not has_toolkit:
        sys.exit("ilora_kernels: ILORA_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME) or torch "
                 f"{torch.__version__} is a CPU-only build")
    if want_cuda and cuda_sources:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
        print(f"ilora_kernels: building the CUDA kernels for TORCH_CUDA_ARCH_LIST="
              f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPU)')}")
        ext = cpp_extension.CUDAExtension(
            "ilora_kernels._C", sources + cuda_sources,
            define_macros=[("ILORA_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                                         f'-DILORA_TORCH_VERSION="{torch.__version__}"']},
            extra_link_args=["-fopenmp"] if sys.platform != "win32" else [])
    else:
        print("ilora_kernels: building the C++ CPU kernels only (no CUDA toolkit, CPU-only torch, or ILORA_SKIP_CUDA)")
        ext = cpp_extension.CppExtension("ilora_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=["-fopenmp"] if sys.platform != "win32" else [])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="ilora-kernels",
    version=_version(),
    packages=find_packages(include=["ilora_kernels", "ilora_kernels.*"]),
    package_data={"ilora_kernels": ["py.typed", "crab/prompts.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
