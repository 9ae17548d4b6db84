"""Crab+ trainer support: AV-UIE v2 data, media decoding, prompts, processor and model loading.

Kept import-light: nothing here imports transformers at package import time. Import the sub-modules directly:

    from ilora_kernels.crab.tasks import TASKS, load_prompts
    from ilora_kernels.crab.data import load_split, AVUIEDataset, collate, build_generation_inputs, Sample
    from ilora_kernels.crab.model import (load_thinker, load_processor, build_tiny_thinker, build_tiny_processor,
                                          apply_crab_ilora)
    from ilora_kernels.crab.demo_data import write_demo_dataset
"""

__all__ = ["tasks", "data", "model", "demo_data"]
