"""Swap I-LoRA into any ``nn.Module`` tree (Hugging Face models included) and take it out again."""

from __future__ import annotations

import difflib
import re
import warnings
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


def _type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _describe(modules: Sequence[Tuple[str, nn.Module]]) -> str:
    """``name, name (package.Type); name (package.Other)``: the modules grouped by type, five names per type."""
    by_type: Dict[str, List[str]] = {}
    for name, module in modules:
        by_type.setdefault(_type_name(module), []).append(name)
    return "; ".join(f"{', '.join(names[:5])}{f' and {len(names) - 5} more' if len(names) > 5 else ''} ({type_name})"
                     for type_name, names in by_type.items())


def _no_match_error(model: nn.Module, targets, unsupported: Sequence[Tuple[str, nn.Module]]) -> ValueError:
    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    msg = f"apply_ilora: no nn.Linear module of {type(model).__name__} matches target_modules={targets!r}."
    if unsupported:
        return ValueError(f"{msg} It matches modules that are not nn.Linear, which I-LoRA does not support: "
                          f"{_describe(unsupported)}.")
    as_names = []
    if isinstance(targets, str):
        msg += (" A string is one regex, matched with re.fullmatch against the whole dotted module name"
                f"{f' (such as {linear_names[0]!r})' if linear_names else ''}.")
        if re.fullmatch(r"[\w.]+", targets):
            as_names = [n for n in linear_names if _target_matches(n, [targets])]
            msg += (f" For module names or name suffixes pass a list, target_modules={[targets]!r}"
                    f"{f' (it matches {len(as_names)} module(s))' if as_names else ''}, or a regex for the whole "
                    f'name, r".*\\.{targets}".')
    wanted = [targets] if isinstance(targets, str) else list(targets)
    near = sorted({c for t in wanted for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], leaf_names, n=5,
                                                                           cutoff=0.5)} - set(wanted))
    if near and not as_names:
        msg += f" Near misses: {near}."
    if leaf_names:
        msg += f" nn.Linear names in this model end with: {leaf_names[:30]}{' ...' if len(leaf_names) > 30 else ''}"
    else:
        msg += " The model has no nn.Linear modules."
    return ValueError(msg)


def _restore_requires_grad(model: nn.Module, flags: Dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])


def apply_ilora(model: nn.Module, config: ILoRAConfig) -> nn.Module:
    """Replaces every ``nn.Linear`` that ``config.target_modules`` matches by an ``ILoRALinear`` in place, freezes all
    other parameters, and returns ``model``. Matched modules of other types (GPT-2's ``Conv1D``, ``nn.Conv2d``,
    ``nn.Embedding``, ...) are not supported: they are named in a ``UserWarning`` and left as they are. Raises
    ``ValueError`` when no ``nn.Linear`` matches (naming the unsupported matches, or near-miss names and, for a
    string, the regex rule), or when a layer cannot be wrapped; a failure leaves the model as it was."""
    if not isinstance(config, ILoRAConfig):
        raise TypeError(f"config must be an ILoRAConfig, got {type(config).__name__}")
    if ilora_layers(model):
        raise ValueError("apply_ilora: the model already carries I-LoRA layers; call remove_ilora first")
    targets = config.target_modules
    matched = [(name, m) for name, m in model.named_modules() if name and _target_matches(name, targets)]
    matches = [(name, m) for name, m in matched if isinstance(m, nn.Linear)]
    # modules holding weights of their own; containers (attention blocks, layers) that a regex may match are not
    unsupported = [(name, m) for name, m in matched
                   if not isinstance(m, nn.Linear) and next(m.parameters(recurse=False), None) is not None]
    if not matches:
        raise _no_match_error(model, targets, unsupported)

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    wrapped = []
    try:
        for name, linear in matches:
            wrapped.append((name, ILoRALinear(linear, r=config.r, num_heads=config.num_heads, alpha=config.alpha,
                                              dropout=config.dropout, top_k=config.top_k, backend=config.backend,
                                              autocast_adapter_dtype=config.autocast_adapter_dtype)))
    except BaseException as exc:
        _restore_requires_grad(model, flags)        # ILoRALinear froze the layers wrapped so far
        if isinstance(exc, (RuntimeError, TypeError, ValueError)):
            raise ValueError(f"apply_ilora: cannot wrap {name} ({_type_name(linear)} with a {linear.weight.dtype} "
                             f"weight) in an ILoRALinear: {exc}") from exc
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in wrapped:
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, layer)
    setattr(model, _FROZEN_ATTR, flags)
    setattr(model, _CONFIG_ATTR, config)
    if unsupported:
        warnings.warn(f"apply_ilora: target_modules={targets!r} also matches modules that are not nn.Linear, which "
                      f"I-LoRA does not support; they are left unchanged: {_describe(unsupported)}", UserWarning,
                      stacklevel=2)
    return model


def remove_ilora(model: nn.Module) -> nn.Module:
    """Puts the original ``nn.Linear`` objects back and restores the parameters' ``requires_grad`` flags."""
    layers = ilora_layers(model)
    for name, layer in layers.items():
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, layer.base_layer)
    flags = getattr(model, _FROZEN_ATTR, None)
    if flags is not None:
        _restore_requires_grad(model, flags)
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


def set_packed_heads(model: nn.Module, packed: bool) -> List[str]:
    """``ILoRALinear.set_packed_heads(packed)`` on every I-LoRA layer; returns the layer names. ``False`` before
    FSDP (``fully_shard`` refuses non-contiguous parameters; FSDP1 resumed their optimizer state wrongly in our
    tests)."""
    layers = ilora_layers(model)
    for layer in layers.values():
        layer.set_packed_heads(packed)
    return list(layers)
