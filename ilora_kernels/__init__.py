"""ilora-kernels: fused kernels, modules and patching for Interaction-aware LoRA (I-LoRA)."""

from . import _peft_hook
from ._version import __version__
from .adapters import (
    CrabCheckpointError,
    CrabLoadReport,
    export_crab_state_dict,
    load_crab_checkpoint,
    load_crab_state_dict,
    load_ilora,
    save_ilora,
)
from .config import CRAB_PLUS_TARGETS, ILoRAConfig
from .functional import BACKENDS, available_backends, ilora_linear
from .modules import ILoRALinear
from .patching import apply_ilora, ilora_layers, remove_ilora

__all__ = [
    "__version__", "BACKENDS", "CRAB_PLUS_TARGETS", "CrabCheckpointError", "CrabLoadReport", "ILoRAConfig",
    "ILoRALinear", "apply_ilora", "available_backends", "export_crab_state_dict", "ilora_layers", "ilora_linear",
    "load_crab_checkpoint", "load_crab_state_dict", "load_ilora", "remove_ilora", "save_ilora",
]

_peft_hook.install()  # PEFT learns the "ILORA" method when it is imported (see ilora_kernels.peft_integration)
