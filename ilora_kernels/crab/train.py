"""Crab+ training: model building from the recipe config (``crab.config``), and a ``transformers.Trainer`` subclass
that trains only I-LoRA.

What ``CrabTrainer`` adds to ``transformers.Trainer``:

* the loss is next-token cross-entropy over the assistant span (labels != -100), summed and divided by the number
  of target tokens of the whole global batch (all gradient-accumulation micro-batches, all processes), so one
  process with batch B and P processes with batch B/P give the same gradients;
* per-task loss and router statistics (mean router weight per head per task, routing entropy) in every log entry
  (keys ``loss/<task>``, ``router/<task>/head<k>``, ``router/<task>/entropy``), in ``trainer_state.json``'s
  ``log_history`` and, with the per-layer detail, in ``<output_dir>/router_stats.jsonl``;
* checkpoints hold ONLY the adapter, in ``save_ilora`` format (``adapter_model.safetensors`` +
  ``adapter_config.json``), plus the optimizer, scheduler, RNG and trainer state that resuming needs; never the
  frozen base weights (under DeepSpeed the engine checkpoint is written with ``exclude_frozen_parameters=True``);
* ``resume_from_checkpoint`` loads the adapter with ``load_ilora``.

Precision: fp32 on CPU, bf16 autocast on GPU (``training.mixed_precision: auto``). Gradient checkpointing on
(non-reentrant). Multi-GPU / multi-node: launch with ``accelerate launch --config_file configs/accelerate/zero2.yaml``
(or ``fsdp.yaml``); the Trainer picks the Accelerate setup up from the environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import torch

from .config import ConfigError, CrabConfig, dump_config

ROUTER_STATS_FILE = "router_stats.jsonl"
CONFIG_COPY = "crab_config.yaml"


# ---------------------------------------------------------------------------------------------------------------
# model and data

def build_model(cfg: CrabConfig, device: Optional[str] = None, apply_adapter: bool = True, processor=None):
    """(model with I-LoRA applied, processor). ``model.name_or_path: tiny`` builds the toy thinker locally.
    ``apply_adapter=False``: the frozen base only (``load_ilora`` then patches it with the saved config).
    ``processor``: reuse an already built processor (the tiny one is deterministic)."""
    from .model import apply_crab_ilora, build_tiny_processor, build_tiny_thinker, load_processor, load_thinker

    if cfg.model.name_or_path == "tiny":
        processor = build_tiny_processor() if processor is None else processor
        model = build_tiny_thinker(seed=cfg.model.tiny_seed, processor=processor)
        if cfg.model.tiny_init_std is not None:
            redraw_token_embeddings(model, cfg.model.tiny_init_std, seed=cfg.model.tiny_seed)
        if cfg.model.dtype not in ("auto", "float32"):
            model.to(getattr(torch, cfg.model.dtype))
    else:
        dtype = cfg.model.dtype
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        model = load_thinker(cfg.model.name_or_path, torch_dtype=getattr(torch, dtype),
                             attn_implementation=cfg.model.attn_implementation)
        processor = load_processor(cfg.model.name_or_path) if processor is None else processor
    from transformers.trainer_utils import set_seed

    set_seed(cfg.training.seed)  # the adapter's random init (A, W_r) is part of the run: seed it
    if not apply_adapter:
        for p in model.parameters():
            p.requires_grad_(False)
        return (model.to(device) if device is not None else model), processor
    apply_crab_ilora(model, r=cfg.ilora.r, num_heads=cfg.ilora.num_heads, alpha=cfg.ilora.alpha,
                     dropout=cfg.ilora.dropout, gradient_checkpointing=False, top_k=cfg.ilora.top_k,
                     backend=cfg.ilora.backend)
    # a bf16/fp16 base gets fp32 adapter weights (ILoRAConfig.autocast_adapter_dtype): ilora_linear computes in
    # the base's dtype and their gradients and AdamW updates stay fp32
    if device is not None:
        model.to(device)
    return model, processor


def redraw_token_embeddings(model, std: float, seed: int = 0):
    """Redraws the input embeddings and the LM head (tied or not) with N(0, std), seeded (see
    ``model.tiny_init_std``)."""
    gen = torch.Generator().manual_seed(int(seed) + 1)
    with torch.no_grad():
        seen = set()
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is None or id(module.weight) in seen:
                continue
            seen.add(id(module.weight))
            w = torch.empty(module.weight.shape).normal_(0.0, std, generator=gen)
            module.weight.copy_(w.to(module.weight.dtype))
    return model


def load_samples(cfg: CrabConfig, split: str, tasks: Optional[Sequence[str]] = None):
    """The samples of ``split`` for the config's tasks, capped per task by the config."""
    from .data import load_split

    if cfg.data.root is None:
        raise ConfigError("data.root is not set (use --data-root or the config's data.root)")
    tasks = list(tasks or cfg.data.tasks)
    samples = load_split(cfg.data.root, split, tasks=tasks, skip_missing=cfg.data.skip_missing_media)
    cap = cfg.data.max_train_samples_per_task if split == "train" else cfg.data.max_eval_samples_per_task
    if cap is not None:
        kept, seen = [], {}
        for s in samples:
            seen[s.task] = seen.get(s.task, 0) + 1
            if seen[s.task] <= cap:
                kept.append(s)
        samples = kept
    return samples


def build_dataset(cfg: CrabConfig, processor, samples, prompts=None):
    from .data import AVUIEDataset

    return AVUIEDataset(samples, processor, num_frames=cfg.data.num_frames, frame_size=cfg.data.frame_size,
                        skip_missing=cfg.data.skip_missing_media, max_length=cfg.data.max_length, prompts=prompts)


def load_prompt_file(cfg: CrabConfig):
    if cfg.data.prompts is None:
        return None
    from .tasks import load_prompts
    return load_prompts(cfg.data.prompts)


# ---------------------------------------------------------------------------------------------------------------
# the trainer

def _make_trainer_class():
    from transformers import Trainer

    class CrabTrainer(Trainer):
        """``transformers.Trainer`` that trains only I-LoRA; see the module docstring."""

        def __init__(self, *args, task_names: Sequence[str] = (), crab_config: Optional[CrabConfig] = None,
                     router_stats: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            from .evaluate import RouterStats

            self.loss_is_scaled_for_ga = True
            self.task_names = list(task_names)
            self.crab_config = crab_config
            self._task_loss = None
            self.router_stats = RouterStats(self.model, self.task_names).attach() if router_stats else None
            self.loss_history: List[float] = []

        # ---- loss -------------------------------------------------------------------------------------------
        def _get_num_items_in_batch(self, batch_samples, device):
            count = sum(int(b["labels"][..., 1:].ne(-100).sum()) for b in batch_samples)
            n = torch.tensor(count, device=device, dtype=torch.long)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                n = self.accelerator.gather(n).sum()
            return n

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            tasks = inputs.pop("task", None)
            inputs.pop("index", None)
            inputs = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
            if tasks is None:
                tasks = ["?"] * labels.shape[0]
            if isinstance(tasks, str):
                tasks = [tasks]
            if self.router_stats is not None:
                self.router_stats.enabled = model.training
                self.router_stats.set_context(list(tasks), inputs.get("attention_mask"))
            outputs = model(**inputs, use_cache=False)
            logits = outputs.logits[:, :-1].float()
            target = labels[:, 1:].to(logits.device)
            tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                    ignore_index=-100, reduction="none").view(target.shape)
            per_sum = tok.sum(1)
            per_cnt = target.ne(-100).sum(1)
            if num_items_in_batch is not None:
                loss = per_sum.sum() / torch.as_tensor(num_items_in_batch, device=per_sum.device).clamp_min(1)
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    loss = loss * self.accelerator.num_processes
            else:
                loss = per_sum.sum() / per_cnt.sum().clamp_min(1)
            if model.training and self.task_names:
                if self._task_loss is None:
                    self._task_loss = torch.zeros(len(self.task_names), 2, dtype=torch.float64, device=loss.device)
                idx = torch.tensor([self.task_names.index(t) if t in self.task_names else -1 for t in tasks],
                                   device=loss.device)
                keep = idx >= 0
                rows = torch.stack([per_sum.detach().double(), per_cnt.double()], 1)
                self._task_loss.index_add_(0, idx[keep], rows[keep])
            return (loss, outputs) if return_outputs else loss

        # ---- logging ----------------------------------------------------------------------------------------
        def log(self, logs, start_time=None):
            logs = dict(logs)
            if "loss" in logs and self.model.training:
                self.loss_history.append(float(logs["loss"]))
            if self._task_loss is not None:
                acc = self._task_loss
                if self.accelerator.num_processes > 1:
                    acc = self.accelerator.reduce(acc.clone(), reduction="sum")
                for t, task in enumerate(self.task_names):
                    if acc[t, 1] > 0:
                        logs[f"loss/{task}"] = round(float(acc[t, 0] / acc[t, 1]), 4)
                self._task_loss.zero_()
            if self.router_stats is not None:
                self.router_stats.reduce_(self.accelerator)
                summary = self.router_stats.summary()
                if summary["tasks"]:
                    for task, v in summary["tasks"].items():
                        for h, w in enumerate(v["mean_weight"]):
                            logs[f"router/{task}/head{h + 1}"] = round(w, 4)
                        logs[f"router/{task}/entropy"] = round(v["entropy"], 4)
                    if self.args.should_save:
                        os.makedirs(self.args.output_dir, exist_ok=True)
                        with open(os.path.join(self.args.output_dir, ROUTER_STATS_FILE), "a") as f:
                            f.write(json.dumps({"step": self.state.global_step, **summary}) + "\n")
                self.router_stats.reset()
            super().log(logs, start_time)

        # ---- checkpoints: the adapter only ------------------------------------------------------------------
        def save_model(self, output_dir=None, _internal_call=False):
            from ..adapters import save_ilora

            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if self.is_fsdp_enabled:
                state = self.accelerator.get_state_dict(self.model)  # collective: every rank
                if self.args.should_save:
                    _save_adapter_state(self.accelerator.unwrap_model(self.model), state, output_dir)
            elif self.args.should_save:
                save_ilora(self.accelerator.unwrap_model(self.model), output_dir)
            if self.args.should_save and self.crab_config is not None:
                dump_config(self.crab_config, os.path.join(output_dir, CONFIG_COPY))

        def _save_optimizer_and_scheduler(self, output_dir):
            if self.is_deepspeed_enabled:
                # the engine checkpoint (optimizer partitions, scheduler) without the frozen base weights
                self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
                return
            super()._save_optimizer_and_scheduler(output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            from ..adapters import WEIGHTS_NAME, load_ilora

            model = self.accelerator.unwrap_model(model if model is not None else self.model)
            if not os.path.isfile(os.path.join(resume_from_checkpoint, WEIGHTS_NAME)):
                raise FileNotFoundError(f"resume: {resume_from_checkpoint} holds no {WEIGHTS_NAME} (not a Crab "
                                        f"I-LoRA checkpoint)")
            load_ilora(model, resume_from_checkpoint)

        def _load_best_model(self):
            if self.state.best_model_checkpoint:
                self._load_from_checkpoint(self.state.best_model_checkpoint)

        def train(self, *args, **kwargs):
            if not self.is_deepspeed_enabled:
                return super().train(*args, **kwargs)
            # DeepSpeed checkpoints are written without the frozen weights: load them non-strictly
            import transformers.trainer as tt

            original = tt.deepspeed_load_checkpoint

            def non_strict(engine, path, load_module_strict=True):
                return original(engine, path, load_module_strict=False)

            tt.deepspeed_load_checkpoint = non_strict
            try:
                return super().train(*args, **kwargs)
            finally:
                tt.deepspeed_load_checkpoint = original

    return CrabTrainer


_TRAINER_CLASS = None


def crab_trainer_class():
    """The ``CrabTrainer`` class (built lazily so importing this module does not import transformers)."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        _TRAINER_CLASS = _make_trainer_class()
    return _TRAINER_CLASS


def _save_adapter_state(model, state: Mapping[str, torch.Tensor], output_dir) -> None:
    """save_ilora from a gathered (FSDP) state dict: the I-LoRA tensors, their keys freed of the FSDP and
    checkpoint wrappers' prefixes."""
    from ..adapters import adapter_state_dict, save_ilora

    wanted = set(adapter_state_dict(model))
    tensors = {}
    for key, value in state.items():
        k = key.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        if k in wanted:
            tensors[k] = value
    missing = wanted - set(tensors)
    if missing:
        raise RuntimeError(f"FSDP state dict lacks {len(missing)} I-LoRA tensors, e.g. {sorted(missing)[:3]}")
    save_ilora(model, output_dir, tensors=tensors)


def training_arguments(cfg: CrabConfig, **extra):
    from transformers import TrainingArguments

    t = cfg.training
    on_gpu = torch.cuda.is_available()
    mp = t.mixed_precision if t.mixed_precision != "auto" else ("bf16" if on_gpu else "no")
    kwargs = dict(
        output_dir=t.output_dir, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=float(t.warmup_ratio), weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, seed=t.seed, bf16=(mp == "bf16"), fp16=(mp == "fp16"),
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, dataloader_num_workers=t.dataloader_num_workers,
        report_to=list(t.report_to), remove_unused_columns=False, label_names=["labels"],
        average_tokens_across_devices=True, ddp_find_unused_parameters=t.ddp_find_unused_parameters,
        disable_tqdm=not t.progress_bar, use_cpu=not on_gpu, eval_strategy="no", optim="adamw_torch",
        logging_first_step=False,
    )
    # transformers >= 5.x renames gradient_checkpointing to activation_checkpointing
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs[prefix] = t.gradient_checkpointing
    kwargs[prefix + "_kwargs"] = {"use_reentrant": False} if t.gradient_checkpointing else None
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


def train(cfg: CrabConfig, resume: Optional[str] = None, model=None, processor=None, train_dataset=None,
          data_collator=None, callbacks=None) -> dict:
    """Runs the recipe: builds (or takes) the model, the training set, the Trainer; trains; saves the final
    adapter into ``training.output_dir``. ``resume``: a checkpoint folder, or ``"latest"`` for the newest
    ``checkpoint-*`` in the output dir. Returns ``{"output_dir", "global_step", "train_loss", "loss_history",
    "log_history", "train_seconds"}``."""
    from transformers.trainer_utils import get_last_checkpoint, set_seed

    set_seed(cfg.training.seed)
    if model is None:
        model, processor = build_model(cfg)
    if train_dataset is None:
        samples = load_samples(cfg, "train")
        if not samples:
            raise ValueError(f"no training samples for tasks {cfg.data.tasks} under {cfg.data.root}")
        train_dataset = build_dataset(cfg, processor, samples, prompts=load_prompt_file(cfg))
    args = training_arguments(cfg)
    if resume == "latest":
        resume = get_last_checkpoint(cfg.training.output_dir)
        if resume is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint-* folder in {cfg.training.output_dir}")
    if resume is not None and not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume: checkpoint folder {resume} does not exist")
    if data_collator is None:
        from .data import collate as data_collator
    trainer = crab_trainer_class()(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
                                   task_names=cfg.data.tasks, crab_config=cfg,
                                   router_stats=cfg.training.router_stats, callbacks=callbacks)
    import time
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    trainer.save_model(cfg.training.output_dir)
    if trainer.router_stats is not None:
        trainer.router_stats.detach()
    out = {"output_dir": cfg.training.output_dir, "global_step": trainer.state.global_step,
           "train_loss": result.training_loss, "loss_history": trainer.loss_history,
           "log_history": trainer.state.log_history, "train_seconds": round(seconds, 2)}
    if args.should_save:
        Path(cfg.training.output_dir, "train_summary.json").write_text(
            json.dumps({k: v for k, v in out.items()}, indent=2) + "\n")
    return out
