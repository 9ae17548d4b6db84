"""Swap I-LoRA into any ``nn.Module`` tree (Hugging Face models included) and take it out again."""

from __future__ import annotations

import difflib
import re
from typing import Dict, List, Sequence, Tuple, Union

from torch import nn

from .config import ILoRAConfig
from .modules import ILoRALinear

_CONFIG_ATTR = "_ilora_config"
_FROZEN_ATTR = "_ilora_requires_grad"


def _target_matches(name: str, targets: Union[str, Sequence[str]]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _parent_and_attr(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def ilora_layers(model: nn.Module) -> Dict[str, ILoRALinear]:
    """All ``ILoRALinear`` modules of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ILoRALinear)}


def _no_match_error(model: nn.Module, targets) -> ValueError:
    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    near = sorted({c for t in wanted for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], leaf_names, n=5,
                                                                           cutoff=0.5)})
    msg = f"apply_ilora: no nn.Linear module of {type(model).__name__} matches target_modules={targets!r}."
    if near:
        msg += f" Near misses: {near}."
    if leaf_names:
        msg += f" nn.Linear names in this model end with: {leaf_names[:30]}{' ...' if len(leaf_names) > 30 else ''}"
    else:
        msg += " The model has no nn.Linear modules."
    return ValueError(msg)


def apply_ilora(model: nn.Module, config: ILoRAConfig) -> nn.Module:
    """Replaces every matching ``nn.Linear`` by an ``ILoRALinear`` in place, freezes all other parameters,
    and returns ``model``. Raises ``ValueError`` (listing near-miss names) when nothing matches."""
    if not isinstance(config, ILoRAConfig):
        raise TypeError(f"config must be an ILoRAConfig, got {type(config).__name__}")
    if ilora_layers(model):
        raise ValueError("apply_ilora: the model already carries I-LoRA layers; call remove_ilora first")
    matches = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name and _target_matches(name, config.target_modules)]
    if not matches:
        raise _no_match_error(model, config.target_modules)

    setattr(model, _FROZEN_ATTR, {name: p.requires_grad for name, p in model.named_parameters()})
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in matches:
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, ILoRALinear(linear, r=config.r, num_heads=config.num_heads, alpha=config.alpha,
                                          dropout=config.dropout, top_k=config.top_k, backend=config.backend))
    setattr(model, _CONFIG_ATTR, config)
    return model


def remove_ilora(model: nn.Module) -> nn.Module:
    """Puts the original ``nn.Linear`` objects back and restores the parameters' ``requires_grad`` flags."""
    layers = ilora_layers(model)
    for name, layer in layers.items():
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, layer.base_layer)
    flags = getattr(model, _FROZEN_ATTR, None)
    if flags is not None:
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
        delattr(model, _FROZEN_ATTR)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model


def get_ilora_config(model: nn.Module) -> ILoRAConfig:
    config = getattr(model, _CONFIG_ATTR, None)
    if config is None:
        raise ValueError(f"{type(model).__name__} carries no I-LoRA layers applied by apply_ilora")
    return config


def set_adapter_enabled(model: nn.Module, enabled: bool) -> List[str]:
    """Turns every I-LoRA layer's adapter on or off (off = exactly the base layer); returns the layer names."""
    layers = ilora_layers(model)
    for layer in layers.values():
        layer.disable_adapter = not enabled
    return list(layers)
