"""Crab+ training: model building from the recipe config (``crab.config``), and a ``transformers.Trainer`` subclass
that trains only I-LoRA.

What ``CrabTrainer`` adds to ``transformers.Trainer``:

* the loss is next-token cross-entropy over the assistant span (labels != -100), summed and divided by the number
  of target tokens of the whole global batch (all gradient-accumulation micro-batches, all processes), so one
  process with batch B and P processes with batch B/P give the same gradients;
* per-task loss and router statistics (mean router weight per head per task, routing entropy) in every log entry
  (keys ``loss/<task>``, ``router/<task>/head<k>``, ``router/<task>/entropy``), in ``trainer_state.json``'s
  ``log_history`` and, with the per-layer detail, in ``<output_dir>/router_stats.jsonl`` (one line per logged step;
  a resumed run first drops the lines past its checkpoint);
* a start banner (model, adapter, trainable parameters, tasks and sample counts, engine, world size, schedule,
  resume point) and one short line per log entry (``format_log_line``) instead of the stock dict print;
* checkpoints hold ONLY the adapter, written by ``save_ilora`` / ``write_adapter`` (atomic, checksummed; gathered
  first under FSDP, the fp32 master weights under DeepSpeed), plus what resuming needs: the optimizer state
  (``optimizer.pt``; FSDP: ``optimizer.bin``; DeepSpeed: its engine checkpoint written with
  ``exclude_frozen_parameters=True``), ``scheduler.pt``, the RNG states and ``trainer_state.json``; never the frozen
  base. ``checkpoint_complete.json`` (every file with its size) is written last, once every process is done, and
  ``--resume latest`` takes the newest checkpoint whose marker and files check out, naming the ones it skipped;
  ``save_total_limit`` counts complete checkpoints only;
* resuming loads the adapter with ``load_ilora`` (before FSDP shards the model; DeepSpeed loads its engine
  checkpoint non-strictly, as the stock Trainer does for PEFT models).

Why not the stock Trainer with a PeftModel (``peft_integration.to_peft_model``), which writes adapter-only
checkpoints by itself: its adapter files are PEFT's (not atomic, no checksum, another layout than ``save_ilora``'s,
which ``ilora-crab eval`` and ``load_ilora`` read), and the router statistics hook ``ILoRALinear`` layers. What the
stock Trainer does right for this model is left to it: the optimizer/scheduler files without DeepSpeed or FSDP, the
RNG and trainer state, the optimizer and scheduler loading (but FSDP2's, which Accelerate loads strictly).

Engines (``describe_engine``): single process, DDP, FSDP1 / FSDP2, DeepSpeed ZeRO-1/2 (ZeRO-3 is refused), set up
by Accelerate from ``accelerate launch``. Accelerate runs FSDP only on accelerators: on a CPU host it would set up
DDP instead; the trainer then sets FSDP up on gloo itself (``configs/accelerate/fsdp_cpu.yaml``, used by the
tests). A launch that asks for FSDP or DeepSpeed and gets another engine is refused.

Precision: fp32 on CPU, bf16 autocast on GPU (``training.mixed_precision: auto``). Gradient checkpointing on
(non-reentrant). Multi-GPU / multi-node: ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..adapters import _PARAM_NAMES as ADAPTER_PARAMS
from ..adapters import save_ilora, unwrapped_name
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
    """The samples of ``split`` for the config's tasks (a ``data.SampleList``: its ``skips`` count what was skipped,
    per task and reason), capped per task by the config."""
    from .data import load_split

    if cfg.data.root is None:
        raise ConfigError("data.root is not set (use --data-root or the config's data.root)")
    cap = cfg.data.max_train_samples_per_task if split == "train" else cfg.data.max_eval_samples_per_task
    return load_split(cfg.data.root, split, tasks=list(tasks or cfg.data.tasks),
                      skip_missing=cfg.data.skip_missing_media, skip_bad=cfg.data.skip_bad_samples, max_per_task=cap)


def build_dataset(cfg: CrabConfig, processor, samples, prompts=None):
    from .data import AVUIEDataset

    return AVUIEDataset(samples, processor, num_frames=cfg.data.num_frames, frame_size=cfg.data.frame_size,
                        skip_missing=cfg.data.skip_missing_media, max_length=cfg.data.max_length, prompts=prompts,
                        upstream_media=cfg.data.upstream_media)


def load_prompt_file(cfg: CrabConfig):
    if cfg.data.prompts is None:
        return None
    from .prompts import load_prompts
    try:
        return load_prompts(cfg.data.prompts)
    except ValueError as exc:     # the message names the file and the key (crab.prompts)
        raise ConfigError(f"data.prompts: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: the completion marker, the newest complete checkpoint

CHECKPOINT_MARKER = "checkpoint_complete.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def _files_of(folder: Path) -> Dict[str, int]:
    """``{relative path: size}`` of every file under ``folder`` but the completion marker."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root, name)
            rel = path.relative_to(folder).as_posix()
            if rel != CHECKPOINT_MARKER:
                files[rel] = path.stat().st_size
    return dict(sorted(files.items()))


def write_checkpoint_marker(folder, **info) -> Path:
    """Writes ``<folder>/checkpoint_complete.json`` (the last file of a checkpoint): every other file of the folder
    with its size, plus ``info``; the files are flushed to disk first and the marker is written atomically."""
    from ..adapters import _fsync

    folder = Path(folder)
    files = _files_of(folder)
    for rel in files:
        _fsync(folder / rel)
    tmp = folder / f".{CHECKPOINT_MARKER}.tmp"
    tmp.write_text(json.dumps({**info, "files": files}, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, folder / CHECKPOINT_MARKER)
    _fsync(folder, directory=True)
    return folder / CHECKPOINT_MARKER


def checkpoint_problem(folder) -> Optional[str]:
    """None when ``folder`` is a complete checkpoint (its marker is there and every file the marker lists is there
    with its size), else what is wrong, in words."""
    folder = Path(folder)
    marker = folder / CHECKPOINT_MARKER
    if not marker.is_file():
        return f"no {CHECKPOINT_MARKER} (its save did not finish: killed while writing?)"
    try:
        files = json.loads(marker.read_text())["files"]
        files = {str(k): int(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{CHECKPOINT_MARKER} is unreadable ({type(exc).__name__}: {exc})"
    for rel, size in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, {size} when the checkpoint was written"
    return None


def _checkpoint_folders(output_dir) -> List[Tuple[int, Path]]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m[1]), child) for child in root.iterdir() if (m := _CHECKPOINT_DIR.match(child.name))
             and child.is_dir()]
    return sorted(found)


def latest_complete_checkpoint(output_dir) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """(the complete ``checkpoint-N`` folder of ``output_dir`` with the highest N or None, [(newer folder skipped,
    why)])."""
    skipped = []
    for _, folder in reversed(_checkpoint_folders(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def resolve_resume(resume, output_dir) -> Tuple[Optional[str], List[str]]:
    """The checkpoint folder to resume from and notes for the banner. ``"latest"`` (or True): the newest complete
    checkpoint of ``output_dir`` (incomplete newer ones are skipped and named); a folder: itself, refused when its
    marker says files are missing, taken with a note when it has no marker."""
    if resume is None or resume is False:
        return None, []
    if resume is True or resume == "latest":
        folder, skipped = latest_complete_checkpoint(output_dir)
        notes = [f"skipped {f.name}: {why}" for f, why in skipped]
        if folder is None:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint-* folder in {output_dir}"
                                    + (f" ({'; '.join(notes)})" if notes else ""))
        return str(folder), notes
    folder = Path(resume)
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume: checkpoint folder {folder} does not exist")
    problem = checkpoint_problem(folder)
    if problem is not None and (folder / CHECKPOINT_MARKER).is_file():
        raise FileNotFoundError(f"--resume: {folder} is incomplete: {problem}")
    return str(folder), ([f"{folder.name} has no {CHECKPOINT_MARKER} (written before completion markers, or its "
                          f"save was interrupted): resuming from it all the same"] if problem else [])


def _rotate_checkpoints(run_dir, limit: Optional[int], keep: Sequence) -> None:
    """Keeps the newest ``limit`` complete checkpoints (and ``keep``); the marker of each one deleted goes first."""
    if not limit or limit <= 0:
        return
    keep = {Path(k).resolve() for k in keep if k}
    complete = [f for _, f in _checkpoint_folders(run_dir) if checkpoint_problem(f) is None]
    for folder in complete[:-limit]:
        if folder.resolve() in keep:
            continue
        (folder / CHECKPOINT_MARKER).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def _load_adapter(model, folder) -> None:
    from ..adapters import WEIGHTS_NAME, load_ilora

    if not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        raise FileNotFoundError(f"resume: {folder} holds no {WEIGHTS_NAME} (not a Crab I-LoRA checkpoint)")
    load_ilora(model, folder)


def _adapter_tensors(model, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The I-LoRA tensors of a gathered (FSDP) state dict, keyed like ``adapter_state_dict`` of the unwrapped
    model."""
    from ..patching import ilora_layers

    wanted = {f"{unwrapped_name(name)}.{p}" for name in ilora_layers(model) for p in ADAPTER_PARAMS}
    tensors = {}
    for key, value in state.items():
        k = unwrapped_name(key)
        if k in wanted:
            tensors[k] = value
    missing = wanted - set(tensors)
    if missing:
        raise RuntimeError(f"the FSDP state dict lacks {len(missing)} I-LoRA tensors, e.g. {sorted(missing)[:3]}")
    return tensors


def _save_adapter_state(model, state: Mapping[str, torch.Tensor], output_dir) -> Path:
    """The adapter of a gathered (FSDP) state dict, keys freed of the wrappers' prefixes, through ``save_ilora``."""
    return save_ilora(model, output_dir, tensors=_adapter_tensors(model, state))


# ---------------------------------------------------------------------------------------------------------------
# what a person reads: the start banner, one short line per log

def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def describe_engine(trainer) -> dict:
    """``{"name", "world_size", "backend", "device", "precision"}`` of a trainer's Accelerate setup; ``name`` is
    ``single process``, ``DDP``, ``FSDP1``, ``FSDP2`` or ``DeepSpeed ZeRO-<stage>``."""
    import torch.distributed as dist

    state = trainer.accelerator.state
    world = trainer.accelerator.num_processes
    if trainer.is_deepspeed_enabled:
        name = f"DeepSpeed ZeRO-{state.deepspeed_plugin.zero_stage}"
    elif trainer.is_fsdp_enabled:
        name = f"FSDP{getattr(state.fsdp_plugin, 'fsdp_version', 1)}"
    else:
        name = "DDP" if world > 1 else "single process"
    args = trainer.args
    precision = "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32")
    return {"name": name, "world_size": world, "backend": dist.get_backend() if dist.is_initialized() else None,
            "device": str(args.device), "precision": precision}


def _task_counts(dataset) -> Dict[str, int]:
    from collections import Counter

    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return dict(Counter(getattr(s, "task", "?") for s in samples))
    if isinstance(dataset, (list, tuple)):
        return dict(Counter(item.get("task", "?") if isinstance(item, Mapping) else "?" for item in dataset))
    return {}


def start_banner(trainer, cfg: CrabConfig, dataset, resume: Optional[str], notes: Sequence[str]) -> str:
    """The lines printed when training starts: model, adapter, trainable parameters, tasks and their sample
    counts, engine and world size, schedule, resume point."""
    from ..patching import ilora_layers
    from .model import count_parameters

    model = trainer.accelerator.unwrap_model(trainer.model)
    layers = ilora_layers(model)
    backend = cfg.ilora.backend
    if layers:
        from ..ops.registry import resolve

        w = next(iter(layers.values())).weight
        try:
            backend = resolve(cfg.ilora.backend, w.device.type, w.dtype)
        except Exception:  # noqa: BLE001 - the banner shows the configured name then
            pass
    n = count_parameters(model)
    i, t, e = cfg.ilora, cfg.training, describe_engine(trainer)
    counts = _task_counts(dataset)
    tasks = ", ".join(f"{k} {v}" for k, v in counts.items()) + f" ({sum(counts.values())} samples)" if counts else \
        ", ".join(cfg.data.tasks)
    steps = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.num_train_epochs:g} epochs"
    global_batch = t.per_device_train_batch_size * e["world_size"] * t.gradient_accumulation_steps
    lines = [
        f"Crab+ train: {cfg.model.name_or_path} ({type(model).__name__}), I-LoRA r={i.r} K={i.num_heads} "
        f"alpha={i.alpha:g} dropout={i.dropout:g} on {len(layers)} modules, kernels {backend}",
        f"  parameters: {n['trainable']:,} trainable of {n['total']:,} "
        f"({100 * n['trainable'] / max(n['total'], 1):.2f}%)",
        f"  tasks: {tasks}",
        f"  engine: {e['name']}, {e['world_size']} process{'es' if e['world_size'] > 1 else ''}"
        + (f" ({e['backend']})" if e["backend"] else "") + f", {e['device']}, {e['precision']}, "
        f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''} per process",
        f"  schedule: {steps}, batch {t.per_device_train_batch_size} x {e['world_size']} process"
        f"{'es' if e['world_size'] > 1 else ''} x {t.gradient_accumulation_steps} accumulation = {global_batch}, "
        f"lr {t.learning_rate:g} {t.lr_scheduler_type}, checkpoint every {t.save_steps} steps -> {t.output_dir}",
    ]
    if resume is not None:
        step = _checkpoint_step(resume)
        lines.append(f"  resume: {resume}" + (f" (step {step})" if step is not None else ""))
    lines += [f"  note: {note}" for note in notes]
    return "\n".join(lines)


def _checkpoint_step(folder) -> Optional[int]:
    try:
        return int(json.loads(Path(folder, "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def format_log_line(logs: Mapping, max_steps: Optional[int] = None, step: Optional[int] = None,
                    seconds_per_step: Optional[float] = None) -> str:
    """One log entry as one short line, e.g. ``step 4/8  loss 5.7862 (ks 6.101, avqa 5.470)  lr 8.09e-03
    grad 3.01  epoch 1.00  router ks .33/.32/.36 H0.99, avqa .33/.32/.35 H0.99  0.05 s/step``; keys it does not
    know are appended as ``key value``."""
    logs = {k: v for k, v in logs.items() if k != "total_flos"}
    if "train_runtime" in logs:
        parts = [f"done: {step} steps in {float(logs.pop('train_runtime')):.1f} s"]
        if "train_loss" in logs:
            parts.append(f"mean train loss {float(logs.pop('train_loss')):.4f}")
        for k in ("train_samples_per_second", "train_steps_per_second", "epoch"):
            logs.pop(k, None)
        parts += [f"{k} {_fmt(v)}" for k, v in logs.items()]
        return ", ".join(parts)
    parts = [f"step {step}" + (f"/{max_steps}" if max_steps and max_steps > 0 else "")]
    if "loss" in logs:
        per_task = [f"{k[5:]} {float(v):.3f}" for k, v in logs.items() if k.startswith("loss/")]
        parts.append(f"loss {float(logs['loss']):.4f}" + (f" ({', '.join(per_task)})" if per_task else ""))
    if "learning_rate" in logs:
        parts.append(f"lr {float(logs['learning_rate']):.2e}")
    if "grad_norm" in logs:
        parts.append(f"grad {float(logs['grad_norm']):.2f}")
    if "epoch" in logs:
        parts.append(f"epoch {float(logs['epoch']):.2f}")
    router = {}
    for k, v in logs.items():
        if k.startswith("router/"):
            _, task, what = k.split("/", 2)
            router.setdefault(task, {})[what] = float(v)
    if router:
        parts.append("router " + ", ".join(
            f"{task} " + "/".join(f"{v[h]:.2f}".lstrip("0") for h in sorted((h for h in v if h.startswith("head")),
                                                                            key=lambda h: int(h[4:])))
            + (f" H{v['entropy']:.2f}" if "entropy" in v else "") for task, v in router.items()))
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.2f} s/step")
    known = {"loss", "learning_rate", "grad_norm", "epoch"}
    parts += [f"{k} {_fmt(v)}" for k, v in logs.items()
              if k not in known and not k.startswith(("loss/", "router/"))]
    return "  ".join(parts)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------------------------
# the trainer

def _make_trainer_class():
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _Pace:
        def __init__(self):
            self.last = None

        def seconds_per_step(self, step):
            import time

            now, out = time.perf_counter(), None
            if self.last is not None and step > self.last[1]:
                out = (now - self.last[0]) / (step - self.last[1])
            self.last = (now, step)
            return out

    class CompactProgress(ProgressCallback):
        """The progress bar, with each log entry written as one short line (``format_log_line``)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pace = _Pace()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                self.training_bar.write(format_log_line(logs, state.max_steps, state.global_step,
                                                        self.pace.seconds_per_step(state.global_step)))

    class CompactPrinter(TrainerCallback):
        """Each log entry as one short line on process 0 (no progress bar)."""

        def __init__(self):
            self.pace = _Pace()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                print(format_log_line(logs, state.max_steps, state.global_step,
                                      self.pace.seconds_per_step(state.global_step)), flush=True)

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
            self._router_stats_step = 0  # the last step written to router_stats.jsonl
            self.loss_history: List[float] = []
            for stock, compact in ((PrinterCallback, CompactPrinter), (ProgressCallback, CompactProgress)):
                if self.pop_callback(stock) is not None:
                    self.add_callback(compact)

        # ---- the engine: the one the launch configured, FSDP on CPU hosts too ---------------------------------
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            from accelerate.utils import DistributedType

            state = self.accelerator.state
            if (_env_flag("ACCELERATE_USE_FSDP") and not self.is_fsdp_enabled
                    and state.distributed_type == DistributedType.MULTI_CPU):
                # Accelerate shards only on accelerators: on a CPU host it sets up DDP on gloo and drops the FSDP
                # plugin. torch's FSDP runs on gloo: set it up as Accelerate would on GPUs.
                from accelerate.utils import FullyShardedDataParallelPlugin

                try:
                    plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))
                except RuntimeError as exc:
                    raise ConfigError(f"FSDP on CPU: {exc} (fsdp_sync_module_states and fsdp_cpu_ram_efficient_loading "
                                      f"need an accelerator: use configs/accelerate/fsdp_cpu.yaml)") from None
                if plugin.activation_checkpointing and self.args.gradient_checkpointing:
                    raise ConfigError("fsdp_activation_checkpointing and training.gradient_checkpointing are both on: "
                                      "turn one off")
                from accelerate.state import PartialState

                if getattr(plugin, "optim_state_dict_config", None) is not None:
                    # FSDP1's full optimizer state dict with offload_to_cpu on a CPU compute device returns every
                    # state (exp_avg, exp_avg_sq) as a view of one reused gather buffer (.cpu() copies nothing):
                    # all would be saved as the last one. The state is on the CPU anyway.
                    plugin.optim_state_dict_config.offload_to_cpu = False
                state.fsdp_plugin = plugin
                # AcceleratorState() copies PartialState's fields each time it is built: set both. FSDP1 refuses
                # device_id cpu:<rank> for parameters on cpu.
                for shared in (PartialState(), state):
                    shared.distributed_type = DistributedType.FSDP
                    shared.device = torch.device("cpu")
                self.is_fsdp_enabled = True
            for flag, enabled, name in (("ACCELERATE_USE_FSDP", self.is_fsdp_enabled, "FSDP"),
                                        ("ACCELERATE_USE_DEEPSPEED", self.is_deepspeed_enabled, "DeepSpeed")):
                if _env_flag(flag) and not enabled:
                    raise ConfigError(f"the launch asks for {name} ({flag}=true) but Accelerate set up "
                                      f"{state.distributed_type}: refusing to train with another engine")
            if self.is_deepspeed_enabled and state.deepspeed_plugin.zero_stage == 3:
                raise ConfigError("DeepSpeed ZeRO-3 is not supported (it partitions the adapter weights that the "
                                  "checkpoints write whole): use configs/accelerate/zero2.yaml or fsdp.yaml")

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
                    step = self.state.global_step
                    if self.args.should_save and step > self._router_stats_step:  # one line per step
                        os.makedirs(self.args.output_dir, exist_ok=True)
                        with open(os.path.join(self.args.output_dir, ROUTER_STATS_FILE), "a") as f:
                            f.write(json.dumps({"step": step, **summary}) + "\n")
                        self._router_stats_step = step
                self.router_stats.reset()
            super().log(logs, start_time)

        def _trim_router_stats(self, step: int) -> None:
            """Drops the lines of router_stats.jsonl past ``step`` (the resumed checkpoint's; 0 for a new run):
            the steps a killed run logged after its last checkpoint are trained and logged again."""
            self._router_stats_step = step
            path = Path(self.args.output_dir, ROUTER_STATS_FILE)
            if not self.args.should_save or not path.is_file():
                return
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if int(json.loads(line)["step"]) <= step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by the kill
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

        # ---- checkpoints: the adapter only ------------------------------------------------------------------
        def save_model(self, output_dir=None, _internal_call=False):
            """The adapter alone through ``save_ilora`` (atomic, checksummed) and the recipe config; never the
            frozen base. Call it on every process: under FSDP and DeepSpeed the adapter is gathered first."""
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            model = self.accelerator.unwrap_model(self.model)
            tensors = self._gathered_adapter(model)
            if self.args.should_save:
                save_ilora(model, output_dir, tensors=tensors)
                if self.crab_config is not None:
                    dump_config(self.crab_config, os.path.join(output_dir, CONFIG_COPY))

        def _gathered_adapter(self, model) -> Optional[Dict[str, torch.Tensor]]:
            """The full adapter tensors where the model's own are not them (collective): FSDP shards -> gathered
            (the frozen parameters left out); DeepSpeed -> the fp32 master weights. None: the model's own."""
            if self.is_fsdp_enabled:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                # rank 0 gets the full tensors on CPU. FSDP2 leaves the frozen ones out before gathering; FSDP1
                # gathers whole flat parameters anyway, and ignore_frozen_params fails on its empty rank > 0 dicts
                fsdp2 = getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2
                state = get_model_state_dict(self.model, options=StateDictOptions(
                    full_state_dict=True, cpu_offload=True, ignore_frozen_params=fsdp2))
                return _adapter_tensors(model, state) if self.args.should_save else None
            if self.is_deepspeed_enabled:
                from deepspeed.utils import safe_get_full_fp32_param

                from ..patching import ilora_layers

                tensors = {}
                for name, layer in ilora_layers(model).items():
                    for p in ADAPTER_PARAMS:
                        param = getattr(layer, p)
                        full = safe_get_full_fp32_param(param)
                        tensors[f"{unwrapped_name(name)}.{p}"] = (full if full is not None else param).detach().cpu()
                return tensors
            return None

        def _save_optimizer_and_scheduler(self, output_dir):
            if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
                return super()._save_optimizer_and_scheduler(output_dir)
            # the stock DeepSpeed / FSDP paths also write the whole model (frozen base included) unless it is a
            # PeftModel: write the engine's optimizer state alone, then the scheduler as the stock path does
            if self.is_deepspeed_enabled:
                self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            else:
                from accelerate.utils import save_fsdp_optimizer

                save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                                    output_dir)
            from accelerate.utils import DeepSpeedSchedulerWrapper

            if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

        def _load_optimizer_and_scheduler(self, checkpoint):
            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            full = "FULL_STATE_DICT" in str(getattr(plugin, "state_dict_type", ""))
            if checkpoint is None or not self.is_fsdp_enabled or getattr(plugin, "fsdp_version", 1) != 2 or not full:
                return super()._load_optimizer_and_scheduler(checkpoint)
            # FSDP2: Accelerate loads strictly, which refuses adapter parameters that never had a gradient (an
            # encoder's adapters when no sample had its modality) and so no optimizer state
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            state = torch.load(os.path.join(checkpoint, "optimizer.bin"), map_location="cpu", weights_only=True)
            set_optimizer_state_dict(self.model, self.optimizer, state,
                                     options=StateDictOptions(full_state_dict=True, strict=False))
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

        def _save_checkpoint(self, model, trial):
            """The stock checkpoint, then (every process done) ``checkpoint_complete.json`` written last, then
            the rotation (``save_total_limit``), which counts complete checkpoints only."""
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            run_dir = self._get_output_dir(trial=trial)
            folder = Path(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            if self.args.should_save:
                (folder / CHECKPOINT_MARKER).unlink(missing_ok=True)  # a folder written again is incomplete
            limit, self.args.save_total_limit = self.args.save_total_limit, None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            self.accelerator.wait_for_everyone()  # every process's files (RNG states, engine partitions) written
            if self.args.should_save:
                write_checkpoint_marker(folder, global_step=self.state.global_step,
                                        engine=describe_engine(self)["name"],
                                        world_size=self.accelerator.num_processes)
                _rotate_checkpoints(run_dir, limit, keep=[folder, self.state.best_model_checkpoint])

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if self.is_fsdp_enabled:
                return  # train() loaded the adapter before FSDP sharded the model
            _load_adapter(self.accelerator.unwrap_model(model if model is not None else self.model),
                          resume_from_checkpoint)

        def train(self, resume_from_checkpoint=None, *args, **kwargs):
            if self.is_fsdp_enabled:   # FSDP2 refuses non-contiguous parameters, FSDP1 resumes them wrongly
                from ..patching import set_packed_heads

                set_packed_heads(self.accelerator.unwrap_model(self.model), False)
            resume, _ = resolve_resume(resume_from_checkpoint, self.args.output_dir)
            self._trim_router_stats((_checkpoint_step(resume) or 0) if resume is not None else 0)
            if resume is not None and self.is_fsdp_enabled:
                _load_adapter(self.accelerator.unwrap_model(self.model), resume)  # not yet sharded
            if resume is None or not self.is_deepspeed_enabled:
                return super().train(resume, *args, **kwargs)
            # the DeepSpeed checkpoint holds the trainable parameters only: load it non-strictly (the stock
            # Trainer does so for PeftModels alone)
            import transformers.trainer as tt

            original = tt.deepspeed_load_checkpoint

            def non_strict(engine, path, load_module_strict=True):
                return original(engine, path, load_module_strict=False)

            tt.deepspeed_load_checkpoint = non_strict
            try:
                return super().train(resume, *args, **kwargs)
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
    """Runs the recipe: builds (or takes) the model, the training set, the Trainer; prints the start banner;
    trains; saves the final adapter into ``training.output_dir``. ``resume``: a checkpoint folder, or ``"latest"``
    for the newest complete ``checkpoint-*`` in the output dir (newer incomplete ones are skipped and named).
    Returns ``{"output_dir", "global_step", "train_loss", "loss_history", "log_history", "train_seconds",
    "engine", "resumed_from"}`` (``loss_history``: the logged losses of the whole run, resumed steps included)."""
    from transformers.trainer_utils import set_seed

    set_seed(cfg.training.seed)
    if model is None:
        model, processor = build_model(cfg)
    if train_dataset is None:
        samples = load_samples(cfg, "train")
        if not samples:
            raise ValueError(f"no training samples for tasks {cfg.data.tasks} under {cfg.data.root}")
        train_dataset = build_dataset(cfg, processor, samples, prompts=load_prompt_file(cfg))
    args = training_arguments(cfg)
    resume, notes = resolve_resume(resume, cfg.training.output_dir)
    if data_collator is None:
        from .data import collate as data_collator
    trainer = crab_trainer_class()(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
                                   task_names=cfg.data.tasks, crab_config=cfg,
                                   router_stats=cfg.training.router_stats, callbacks=callbacks)
    if args.should_save:
        print(start_banner(trainer, cfg, train_dataset, resume, notes), flush=True)
    import time
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    trainer.save_model(cfg.training.output_dir)
    if trainer.router_stats is not None:
        trainer.router_stats.detach()
    out = {"output_dir": cfg.training.output_dir, "global_step": trainer.state.global_step,
           "train_loss": result.training_loss,
           "loss_history": [float(e["loss"]) for e in trainer.state.log_history if "loss" in e],
           "log_history": trainer.state.log_history, "train_seconds": round(seconds, 2),
           "engine": describe_engine(trainer), "resumed_from": resume}
    skips = getattr(train_dataset, "skips", None)
    if skips is not None and hasattr(skips, "to_dict"):
        out["skipped"] = skips.to_dict()
    if args.should_save:
        Path(cfg.training.output_dir, "train_summary.json").write_text(json.dumps(out, indent=2) + "\n")
    return out
