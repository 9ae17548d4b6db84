"""The Crab+ recipe config: the YAML file's sections as dataclasses (defaults = the Crab+ recipe), its reader
and its validator.

``load_config(path, overrides)`` reads a YAML recipe (``configs/crab_plus.yaml``) and ``{"section.key": value}``
overrides (the CLI's options); ``config_from_dict`` builds and validates a ``CrabConfig`` from a mapping. Unknown
sections or keys and bad values raise ``ConfigError`` naming the key (``section.key``). The I-LoRA hyperparameters
go through the package's one validator (``ilora_kernels._validation.validate_hyperparameters``), the task keys
through the task registry (``crab.tasks.TASKS``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional

from .._validation import validate_hyperparameters
from .tasks import TASK_KEYS


class ConfigError(ValueError):
    """A bad recipe config: the message names the key (``section.key``)."""


# ---------------------------------------------------------------------------------------------------------------
# the recipe config

@dataclass
class ModelSection:
    """``name_or_path``: a local folder or hub id of a Qwen2.5-Omni checkpoint, or ``tiny`` (random toy model)."""
    name_or_path: str = "Qwen/Qwen2.5-Omni-7B"
    dtype: str = "auto"                      # base weights: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    attn_implementation: str = "sdpa"
    tiny_seed: int = 0                       # weights seed of the tiny model
    # tiny model only: redraw the (frozen, random) token embeddings and LM head with N(0, tiny_init_std). With the
    # HF default std 0.02 the logits of a 64-wide toy model cannot leave a ~1.3 range (lm_head rows have norm
    # ~0.16 after the final RMSNorm), so no adapter can fit the toy tasks; 0.2 makes them learnable. null = keep.
    tiny_init_std: Optional[float] = 0.2


@dataclass
class ILoRASection:
    r: int = 128
    num_heads: int = 3
    alpha: float = 256.0
    dropout: float = 0.1
    top_k: Optional[int] = None
    backend: str = "auto"                    # auto | a name of ilora_kernels.BACKENDS


@dataclass
class DataSection:
    root: Optional[str] = None               # the data root (holding AVUIE_2/) or the AVUIE_2 folder itself
    tasks: List[str] = field(default_factory=lambda: list(TASK_KEYS))
    prompts: Optional[str] = None            # a prompt file replacing the built-in instruction wording
    skip_missing_media: bool = False         # skip (and count) samples whose media is missing, instead of failing
    skip_bad_samples: bool = False           # skip (and count) null / empty targets and empty split files
    num_frames: int = 10
    # upstream Crab+'s media per task (crab.tasks.UPSTREAM_AUDIO_WINDOWS / UPSTREAM_NUM_FRAMES): avqa ten 2-s
    # windows, the emotion tasks the first 4 s and 4 frames, s4/ms3/ref_avs 1 s at the frame index, frames sampled
    # first to last. false: the first 30 s of every clip and num_frames segment midpoints everywhere.
    upstream_media: bool = True
    frame_size: int = 224
    max_length: Optional[int] = None
    max_train_samples_per_task: Optional[int] = None
    max_eval_samples_per_task: Optional[int] = None


@dataclass
class TrainingSection:
    output_dir: str = "runs/crab"
    num_train_epochs: float = 5.0
    max_steps: int = -1                      # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: str = "auto"            # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | no
    gradient_checkpointing: bool = True
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    dataloader_num_workers: int = 0
    ddp_find_unused_parameters: bool = True  # tasks without audio or video leave encoder adapters unused
    report_to: List[str] = field(default_factory=lambda: ["none"])
    router_stats: bool = True
    progress_bar: bool = True


@dataclass
class EvalSection:
    max_new_tokens: int = 512  # upstream Crab+ (scripts/finetune/inference_omni.py)
    split: str = "test"


@dataclass
class CrabConfig:
    model: ModelSection = field(default_factory=ModelSection)
    ilora: ILoRASection = field(default_factory=ILoRASection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTION_TYPES = {"model": ModelSection, "ilora": ILoRASection, "data": DataSection, "training": TrainingSection,
                  "eval": EvalSection}
_CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "training.mixed_precision": ("auto", "bf16", "fp16", "no"),
    "training.lr_scheduler_type": ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                   "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau",
                                   "cosine_with_min_lr", "warmup_stable_decay"),
    "eval.split": ("train", "test"),
}


def _coerce(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(key, value, inner)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
        return value
    if origin in (list, List):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key} must be a list of strings, got {value!r}")
        return list(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _validate(cfg: CrabConfig) -> CrabConfig:
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")

    def positive(key, value, allow_zero=False):
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

    if cfg.model.tiny_init_std is not None:
        positive("model.tiny_init_std", cfg.model.tiny_init_std)
    i = cfg.ilora
    validate_hyperparameters(r=i.r, num_heads=i.num_heads, alpha=i.alpha, dropout=i.dropout, top_k=i.top_k,
                             backend=i.backend, prefix="ilora.", none_word="null", error=ConfigError)
    if not cfg.data.tasks:
        raise ConfigError("data.tasks must name at least one task")
    unknown = [t for t in cfg.data.tasks if t not in TASK_KEYS]
    if unknown:
        raise ConfigError(f"data.tasks: unknown task key(s) {unknown}; AV-UIE v2 keys are {list(TASK_KEYS)}")
    if len(set(cfg.data.tasks)) != len(cfg.data.tasks):
        raise ConfigError(f"data.tasks lists a task twice: {cfg.data.tasks}")
    positive("data.num_frames", cfg.data.num_frames)
    positive("data.frame_size", cfg.data.frame_size)
    for key in ("max_length", "max_train_samples_per_task", "max_eval_samples_per_task"):
        value = getattr(cfg.data, key)
        if value is not None:
            positive(f"data.{key}", value)
    t = cfg.training
    positive("training.num_train_epochs", t.num_train_epochs)
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"training.max_steps must be -1 (use num_train_epochs) or > 0, got {t.max_steps!r}")
    positive("training.per_device_train_batch_size", t.per_device_train_batch_size)
    positive("training.gradient_accumulation_steps", t.gradient_accumulation_steps)
    positive("training.learning_rate", t.learning_rate)
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"training.warmup_ratio must be in [0, 1), got {t.warmup_ratio!r}")
    positive("training.weight_decay", t.weight_decay, allow_zero=True)
    positive("training.max_grad_norm", t.max_grad_norm, allow_zero=True)
    positive("training.seed", t.seed, allow_zero=True)
    positive("training.logging_steps", t.logging_steps)
    positive("training.save_steps", t.save_steps)
    if t.save_total_limit is not None:
        positive("training.save_total_limit", t.save_total_limit)
    positive("training.dataloader_num_workers", t.dataloader_num_workers, allow_zero=True)
    positive("eval.max_new_tokens", cfg.eval.max_new_tokens)
    return cfg


def config_from_dict(data: Optional[Mapping], source: str = "config") -> CrabConfig:
    """Builds and validates a ``CrabConfig``; unknown sections/keys and bad values raise ``ConfigError`` naming
    the key."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections {sorted(_SECTION_TYPES)}")
    sections = {}
    for name, value in data.items():
        if name not in _SECTION_TYPES:
            raise ConfigError(f"{source}: unknown section {name!r}; known sections: {sorted(_SECTION_TYPES)}")
        cls = _SECTION_TYPES[name]
        value = {} if value is None else value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {value!r}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, v in value.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {name}.{key}; known keys of {name!r}: {sorted(hints)}")
            kwargs[key] = _coerce(f"{name}.{key}", v, hints[key])
        sections[name] = cls(**kwargs)
    return _validate(CrabConfig(**sections))


def load_config(path=None, overrides: Optional[Mapping[str, Any]] = None) -> CrabConfig:
    """Reads a YAML recipe (or the defaults when ``path`` is None) and applies ``{"section.key": value}``
    overrides (None values are ignored)."""
    import yaml

    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML ({exc})") from None
        source = str(p)
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections {sorted(_SECTION_TYPES)}")
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"override {key!r} must be 'section.key'")
        if not isinstance(data.get(section, {}), dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        data.setdefault(section, {})[name] = value
    return config_from_dict(data, source)


def dump_config(cfg: CrabConfig, path) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
