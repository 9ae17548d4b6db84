"""The Crab+ trainer: AV-UIE v2 data, prompts, the Qwen2.5-Omni thinker with I-LoRA, training, evaluation and the
transfer report; the ``ilora-crab`` command line (``python -m ilora_kernels.crab``).

Kept import-light: nothing here imports transformers at package import time. Import the sub-modules directly:

    from ilora_kernels.crab.tasks import TASKS, TASK_KEYS, METRICS                   # the task registry
    from ilora_kernels.crab.prompts import load_prompts                              # the prompt file
    from ilora_kernels.crab.config import CrabConfig, load_config, config_from_dict  # the YAML recipe config
    from ilora_kernels.crab.data import load_split, AVUIEDataset, collate, build_generation_inputs, Sample
    from ilora_kernels.crab.model import (load_thinker, load_processor, build_tiny_thinker, build_tiny_processor,
                                          apply_crab_ilora)
    from ilora_kernels.crab.train import train, build_model, crab_trainer_class      # the Trainer
    from ilora_kernels.crab.evaluate import evaluate_samples, score_task, RouterStats # generation and metrics
    from ilora_kernels.crab.report import transfer_table, format_transfer, plot_router
    from ilora_kernels.crab.demo_data import write_demo_dataset
    from ilora_kernels.crab.cli import main                                           # ilora-crab
"""

__all__ = ["tasks", "config", "data", "model", "train", "evaluate", "report", "demo_data", "demo", "cli"]
