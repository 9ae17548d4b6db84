"""``ILoRAConfig``: which layers get I-LoRA and with which hyperparameters (defaults = the Crab+ recipe)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

from ._validation import validate_hyperparameters

CRAB_PLUS_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ILoRAConfig:
    """I-LoRA hyperparameters. ``target_modules``: names matched exactly or as a ``.suffix``, or one regex string
    matched with ``re.fullmatch`` against the full module name (PEFT semantics). ``autocast_adapter_dtype``
    (PEFT's name and default): adapter weights on a float16 / bfloat16 base layer are float32 master weights;
    False keeps them in the base's dtype."""

    r: int = 128
    num_heads: int = 3
    alpha: float = 256.0
    dropout: float = 0.1
    target_modules: Union[Sequence[str], str] = field(default_factory=lambda: CRAB_PLUS_TARGETS)
    top_k: Optional[int] = None
    backend: str = "auto"
    autocast_adapter_dtype: bool = True

    def __post_init__(self):
        validate_hyperparameters(r=self.r, num_heads=self.num_heads, alpha=self.alpha, dropout=self.dropout,
                                 top_k=self.top_k, backend=self.backend, prefix="ILoRAConfig.")
        if not isinstance(self.autocast_adapter_dtype, bool):
            raise ValueError(f"ILoRAConfig.autocast_adapter_dtype must be a bool, got {self.autocast_adapter_dtype!r}")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("ILoRAConfig.target_modules must not be empty")
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ValueError(f"ILoRAConfig.target_modules={self.target_modules!r} is a string, hence a regex, "
                                 f"and it does not compile ({exc})") from None
        elif not isinstance(self.target_modules, (list, tuple)):
            raise ValueError(f"ILoRAConfig.target_modules must be a list or tuple of module names, or one regex "
                             f"string, got {type(self.target_modules).__name__} {self.target_modules!r}")
        else:
            targets = tuple(self.target_modules)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"ILoRAConfig.target_modules must be a non-empty sequence of names or a regex "
                                 f"string, got {self.target_modules!r}")
            self.target_modules = targets

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        d = asdict(self)
        if not isinstance(d["target_modules"], str):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ILoRAConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if isinstance(known.get("target_modules"), list):
            known["target_modules"] = tuple(known["target_modules"])
        return cls(**known)
