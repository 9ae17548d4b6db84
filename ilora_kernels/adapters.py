"""Adapter files: our safetensors format, and import/export of the Crab / HydraLoRA state-dict layout."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Union

import torch
from torch import nn

from ._version import __version__
from .config import ILoRAConfig
from .patching import apply_ilora, get_ilora_config, ilora_layers

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PARAM_NAMES = ("router_weight", "lora_a", "lora_b")


def _atomic_write(path: Path, write) -> None:
    """Writes through a temporary file in the same folder and renames it, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{"<module>.router_weight" | ".lora_a" | ".lora_b": tensor}`` for every I-LoRA layer."""
    return {f"{name}.{p}": getattr(layer, p).detach() for name, layer in ilora_layers(model).items()
            for p in _PARAM_NAMES}


def save_ilora(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` into the folder ``path``."""
    from safetensors.torch import save_file

    layers = ilora_layers(model)
    if not layers:
        raise ValueError(f"save_ilora: {type(model).__name__} has no I-LoRA layers (call apply_ilora first)")
    config = get_ilora_config(model)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    meta = {"format": "ilora", "ilora_kernels_version": __version__, **config.to_dict(), "modules": sorted(layers)}
    _atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return folder


def _read_config(folder: Path) -> dict:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"load_ilora: {config_path} does not exist")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_ilora: {config_path} is not valid JSON ({exc})") from None
    for key in ("r", "num_heads", "alpha", "target_modules"):
        if key not in meta:
            raise ValueError(f"load_ilora: {config_path} lacks the key {key!r}")
    return meta


def load_ilora(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Loads an adapter saved by ``save_ilora``. An unpatched model is patched with the saved config first;
    a patched model must match the saved r, K and targets. Returns ``model``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    meta = _read_config(folder)
    saved = ILoRAConfig.from_dict(meta)
    if not ilora_layers(model):
        apply_ilora(model, saved)
    current = get_ilora_config(model)
    for field in ("r", "num_heads"):
        if getattr(current, field) != getattr(saved, field):
            raise ValueError(f"load_ilora: the adapter in {folder} has {field}={getattr(saved, field)} but the model's "
                             f"I-LoRA layers have {field}={getattr(current, field)}")
    if tuple(current.target_modules) != tuple(saved.target_modules) and current.target_modules != saved.target_modules:
        raise ValueError(f"load_ilora: the adapter in {folder} targets {saved.target_modules!r} but the model was "
                         f"patched for {current.target_modules!r}")
    try:
        tensors = load_file(folder / WEIGHTS_NAME)
    except FileNotFoundError:
        raise FileNotFoundError(f"load_ilora: {folder / WEIGHTS_NAME} does not exist") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"load_ilora: {folder / WEIGHTS_NAME} is not a readable safetensors file ({exc})") from None
    _copy_into_layers(model, tensors, source=str(folder / WEIGHTS_NAME))
    return model


def _copy_into_layers(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    params = {}
    for name, layer in ilora_layers(model).items():
        for p in _PARAM_NAMES:
            params[f"{name}.{p}"] = getattr(layer, p)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing:
        raise KeyError(f"{source} lacks {len(missing)} key(s) the model needs, e.g. {missing[:5]}")
    if unexpected:
        raise KeyError(f"{source} has {len(unexpected)} key(s) the model does not have, e.g. {unexpected[:5]}")
    for key, param in params.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"{source}: {key} has shape {tuple(t.shape)} but the model expects {tuple(param.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{source}: {key} has dtype {t.dtype}; expected a floating-point tensor")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])


# ---------------------------------------------------------------------------------------------------------------
# Crab / HydraLoRA layout: <module>.lora_A.weight (r, d_in), <module>.lora_B{i}.weight (d_out, r),
# <module>.lora_route.weight (K, d_in), optionally under a "base_model.model." prefix.

_CRAB_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B(?P<head>\d+)|lora_route)"
                       r"\.weight$")


def load_crab_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Imports Crab-layout tensors into the model's I-LoRA layers; returns the names of the layers loaded."""
    layers = ilora_layers(model)
    if not layers:
        raise ValueError(f"load_crab_state_dict: {type(model).__name__} has no I-LoRA layers (call apply_ilora first)")
    grouped: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = _CRAB_KEY.match(key)
        if match is None:
            raise KeyError(f"load_crab_state_dict: {key!r} is not a Crab I-LoRA key "
                           f"(<module>.lora_A.weight, <module>.lora_B<i>.weight or <module>.lora_route.weight)")
        grouped.setdefault(match["module"], {})[match["kind"]] = tensor
    unknown = sorted(set(grouped) - set(layers))
    if unknown:
        raise KeyError(f"load_crab_state_dict: no I-LoRA layer named {unknown[:5]} in the model")
    tensors = {}
    for name, parts in grouped.items():
        layer = layers[name]
        expected = {"lora_A", "lora_route"} | {f"lora_B{i}" for i in range(layer.num_heads)}
        if set(parts) != expected:
            raise KeyError(f"load_crab_state_dict: layer {name!r} needs {sorted(expected)} but the state dict has "
                           f"{sorted(parts)}")
        tensors[f"{name}.lora_a"] = parts["lora_A"]
        tensors[f"{name}.router_weight"] = parts["lora_route"]
        heads = [parts[f"lora_B{i}"] for i in range(layer.num_heads)]
        for i, b in enumerate(heads):
            if tuple(b.shape) != (layer.out_features, layer.r):
                raise ValueError(f"load_crab_state_dict: {name}.lora_B{i}.weight has shape {tuple(b.shape)} but the "
                                 f"layer expects ({layer.out_features}, {layer.r})")
        tensors[f"{name}.lora_b"] = torch.stack(heads)
    # layers the state dict does not mention keep their values; all mentioned layers are checked in full
    subset = {name: layers[name] for name in grouped}
    _copy_into_subset(subset, tensors)
    return sorted(grouped)


def _copy_into_subset(layers: Mapping[str, nn.Module], tensors: Mapping[str, torch.Tensor]) -> None:
    holder = nn.Module()
    holder.layers = nn.ModuleDict({name.replace(".", "__"): layer for name, layer in layers.items()})
    remapped = {f"layers.{k.rsplit('.', 1)[0].replace('.', '__')}.{k.rsplit('.', 1)[1]}": v for k, v in tensors.items()}
    _copy_into_layers(holder, remapped, source="the Crab state dict")


def export_crab_state_dict(model: nn.Module, prefix: str = "base_model.model.") -> Dict[str, torch.Tensor]:
    """The model's I-LoRA weights in the Crab / HydraLoRA layout (see ``load_crab_state_dict``)."""
    out = {}
    for name, layer in ilora_layers(model).items():
        out[f"{prefix}{name}.lora_A.weight"] = layer.lora_a.detach().clone()
        out[f"{prefix}{name}.lora_route.weight"] = layer.router_weight.detach().clone()
        for i in range(layer.num_heads):
            out[f"{prefix}{name}.lora_B{i}.weight"] = layer.lora_b[i].detach().clone()
    return out
