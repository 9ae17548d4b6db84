"""``ILoRAConfig``: which layers get I-LoRA and with which hyperparameters (defaults = the Crab+ recipe)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

CRAB_PLUS_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ILoRAConfig:
    """I-LoRA hyperparameters. ``target_modules``: names matched exactly or as a ``.suffix``, or one regex string
    matched with ``re.fullmatch`` against the full module name (PEFT semantics)."""

    r: int = 128
    num_heads: int = 3
    alpha: float = 256.0
    dropout: float = 0.1
    target_modules: Union[Sequence[str], str] = field(default_factory=lambda: CRAB_PLUS_TARGETS)
    top_k: Optional[int] = None
    backend: str = "auto"

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"ILoRAConfig.r must be a positive int, got {self.r!r}")
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads <= 0:
            raise ValueError(f"ILoRAConfig.num_heads must be a positive int, got {self.num_heads!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"ILoRAConfig.alpha must be a finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"ILoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or not (1 <= self.top_k <= self.num_heads)):
            raise ValueError(f"ILoRAConfig.top_k must be None or an int in [1, num_heads={self.num_heads}], "
                             f"got {self.top_k!r}")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("ILoRAConfig.target_modules must not be empty")
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
