"""The ``cpu`` and ``cuda`` backends: the C++ CPU and CUDA kernels compiled into ``ilora_kernels._C``.

Both are the one op pair ``ilora_kernels::fused_forward`` / ``fused_backward`` (schemas in ``csrc/op_schemas.h``),
which the dispatcher routes to the CPU or the CUDA kernel by the tensors' device. Without a usable ``_C``
(not built, or built for another torch; see ``ilora_kernels._extension``) neither backend is available.
"""

from __future__ import annotations

import torch

from .. import _extension
from .contract import attach
from .registry import BackendUnavailable, mark_unavailable, register

if not _extension.load():
    raise BackendUnavailable(_extension.unavailable_reason())

_FUSED = attach("ilora_kernels::fused_forward", "ilora_kernels::fused_backward")
register("cpu", _FUSED)
if not _extension.cuda_built():
    mark_unavailable("cuda", "ilora_kernels._C was built without CUDA (no CUDA toolkit at build time, "
                             "ILORA_FORCE_CUDA unset, or a CPU-only torch)")
elif not torch.cuda.is_available():
    mark_unavailable("cuda", "built with CUDA, but no CUDA device is visible")
else:
    register("cuda", _FUSED)
