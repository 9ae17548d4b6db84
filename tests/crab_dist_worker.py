"""One rank of a distributed Crab+ training run for tests/test_crab_distributed.py (launched by torchrun or
``accelerate launch``): the tiny thinker on the text-only tasks of tests/test_crab_train.py, trained with
``ilora_kernels.crab.train.train`` exactly as ``ilora-crab train`` calls it (only the data differ: text turns
instead of AV-UIE media).

    python tests/crab_dist_worker.py OUT [--resume latest] [--max-steps 8] [--save-steps 3] [--batch 2]
                                         [--pause-at N | --pause-in-save N]

--pause-at N: every rank stops after optimizer step N (checkpoints up to N are complete) and sleeps, after rank 0
wrote OUT/paused; the test then SIGKILLs every process. --pause-in-save N: the same, in the middle of writing
checkpoint-N (adapter, optimizer and scheduler written; RNG states, trainer state and completion marker not yet).
Each rank writes its pid to OUT/pids/<rank>; rank 0 writes OUT/result.json at the end (losses per step, engine).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from test_crab_train import _processor, pad_collate, text_dataset, tiny_config  # noqa: E402


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _pause(out: Path, what: str) -> None:
    if _rank() == 0:
        (out / "paused").write_text(what + "\n")
    while True:  # until the test kills the process
        time.sleep(1)


def config(out, batch: int = 2, max_steps: int = 8, save_steps: int = 3, gradient_checkpointing: bool = True):
    return tiny_config(Path(out) / "run", dropout=0.0, max_steps=max_steps, per_device_train_batch_size=batch,
                       save_steps=save_steps, gradient_checkpointing=gradient_checkpointing)


def build_reference_model():
    """The model the worker trains (before training)."""
    from ilora_kernels.crab.train import build_model

    return build_model(config("unused"), processor=_processor())[0]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume")
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--save-steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--pause-at", type=int)
    p.add_argument("--pause-in-save", type=int)
    a = p.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    (out / "pids").mkdir(parents=True, exist_ok=True)
    (out / "pids" / str(_rank())).write_text(str(os.getpid()))

    from transformers import TrainerCallback

    from ilora_kernels.crab.train import build_model, crab_trainer_class, train

    callbacks = []
    if a.pause_at is not None:
        class PauseAt(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == a.pause_at:
                    _pause(out, f"step {state.global_step}")

            def on_save(self, args, state, control, **kw):  # the checkpoint of the pause step is complete
                if state.global_step == a.pause_at:
                    _pause(out, f"saved {state.global_step}")
        callbacks.append(PauseAt())
    if a.pause_in_save is not None:
        cls = crab_trainer_class()
        original = cls._save_rng_state

        def save_rng_then_pause(self, output_dir):
            original(self, output_dir)
            if self.state.global_step == a.pause_in_save:
                _pause(out, f"in save {self.state.global_step}")
        cls._save_rng_state = save_rng_then_pause

    processor = _processor()
    cfg = config(out, a.batch, a.max_steps, a.save_steps, not a.no_gradient_checkpointing)
    model, processor = build_model(cfg, processor=processor)
    result = train(cfg, resume=a.resume, model=model, processor=processor,
                   train_dataset=text_dataset(processor, n=16), data_collator=pad_collate, callbacks=callbacks)
    import torch.distributed as dist

    if _rank() == 0:
        losses = {e["step"]: e["loss"] for e in result["log_history"] if "loss" in e}
        (out / "result.json").write_text(json.dumps({"losses": losses, "engine": result.get("engine"),
                                                     "global_step": result["global_step"]}, indent=1))
    if dist.is_initialized():  # a clean gloo shutdown (else a rank can abort at exit)
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
