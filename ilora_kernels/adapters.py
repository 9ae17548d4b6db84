"""Adapter files: our safetensors format, and import/export of the Crab / HydraLoRA state-dict layout."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from ._version import __version__
from .config import ILoRAConfig
from .patching import apply_ilora, get_ilora_config, ilora_layers, remove_ilora

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PARAM_NAMES = ("router_weight", "lora_a", "lora_b")


def _temp_path(folder: Path, name: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _fsync(path: Union[str, Path], directory: bool = False) -> None:
    """Flushes a file (or a folder's entries) to disk; best effort where the platform cannot (Windows folders)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_weights(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file
    save_file(dict(tensors), path, metadata={"format": "pt", "ilora_kernels_version": __version__})


def _write_config(meta: Mapping, path: str) -> None:
    Path(path).write_text(json.dumps(meta, indent=2) + "\n")


def write_adapter(path: Union[str, os.PathLike], tensors: Mapping[str, torch.Tensor], meta: Mapping) -> Path:
    """Writes one adapter folder: ``adapter_model.safetensors`` (``tensors``, stored contiguous on the CPU) and
    ``adapter_config.json`` (``meta`` plus ``"weights_sha256"``, the checksum of the weights file). The one writer of
    adapter files: ``save_ilora``, the trainer's checkpoints and ``peft_integration.save_as_peft`` all write through it.

    Both files are written in full to temporary files in the folder first and only then renamed over the old ones,
    so a crash while writing leaves the previous adapter intact (and no temporary file, unless the process is
    killed). A crash between the two renames (new weights beside the old config) is refused at load time by the
    checksum (``check_weights``) instead of silently mixing two saves. Returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(meta)
    weights_tmp = config_tmp = None
    try:
        weights_tmp = _temp_path(folder, WEIGHTS_NAME)
        _write_weights(tensors, weights_tmp)
        _fsync(weights_tmp)
        meta["weights_sha256"] = _sha256(weights_tmp)
        config_tmp = _temp_path(folder, CONFIG_NAME)
        _write_config(meta, config_tmp)
        _fsync(config_tmp)
        os.replace(weights_tmp, folder / WEIGHTS_NAME)
        weights_tmp = None
        os.replace(config_tmp, folder / CONFIG_NAME)
        config_tmp = None
        _fsync(folder, directory=True)
    finally:
        for tmp in (weights_tmp, config_tmp):
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    return folder


def check_weights(folder: Path, meta: Mapping, reader: str, writer: str) -> None:
    """Refuses a weights file that does not match the ``weights_sha256`` its config records (a folder that mixes
    two saves, or a modified file); configs written before checksums (no key) pass."""
    expected_sha = meta.get("weights_sha256")
    if expected_sha is None:
        return
    actual_sha = _sha256(folder / WEIGHTS_NAME)
    if actual_sha != expected_sha:
        raise ValueError(f"{reader}: {folder / WEIGHTS_NAME} does not match {folder / CONFIG_NAME} "
                         f"(weights_sha256 {str(expected_sha)[:12]}... expected, {actual_sha[:12]}... found): the "
                         f"folder mixes two saves (an interrupted {writer}?) or the weights file was modified")


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{"<module>.router_weight" | ".lora_a" | ".lora_b": tensor}`` for every I-LoRA layer."""
    return {f"{name}.{p}": getattr(layer, p).detach() for name, layer in ilora_layers(model).items()
            for p in _PARAM_NAMES}


def save_ilora(model: nn.Module, path: Union[str, os.PathLike],
               tensors: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` into the folder ``path`` (atomically, with
    the weights' checksum: see ``write_adapter``). ``tensors``: the adapter tensors to write instead of the model's
    own, keyed like ``adapter_state_dict`` (e.g. gathered from FSDP shards); every key must be there."""
    layers = ilora_layers(model)
    if not layers:
        raise ValueError(f"save_ilora: {type(model).__name__} has no I-LoRA layers (call apply_ilora first)")
    config = get_ilora_config(model)
    if tensors is None:
        tensors = adapter_state_dict(model)
    else:
        wanted = {f"{name}.{p}" for name in layers for p in _PARAM_NAMES}
        missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
        if missing or extra:
            raise KeyError(f"save_ilora: the tensors given do not match the model's I-LoRA layers: missing "
                           f"{missing[:3]}, unexpected {extra[:3]}")
    meta = {"format": "ilora", "ilora_kernels_version": __version__, **config.to_dict(), "modules": sorted(layers)}
    return write_adapter(path, tensors, meta)


def _read_config(folder: Path) -> dict:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"load_ilora: {config_path} does not exist")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_ilora: {config_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"load_ilora: {config_path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format", "ilora") != "ilora":
        raise ValueError(f"load_ilora: {config_path} has format={meta['format']!r}; expected 'ilora' (a PEFT LoRA "
                         f"adapter? Crab checkpoints load with load_crab_state_dict)")
    for key in ("r", "num_heads", "alpha", "target_modules"):
        if key not in meta:
            raise ValueError(f"load_ilora: {config_path} lacks the key {key!r}")
    return meta


def load_ilora(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Loads an adapter saved by ``save_ilora``. An unpatched model is patched with the saved config first;
    a patched model must match the saved r, K and targets. Returns ``model``.

    All checks (config, keys, dtypes, shapes, finite values, the weights' checksum) run before anything is copied:
    a refused adapter leaves the model as it was (an unpatched model is unpatched again)."""
    folder = Path(path)
    meta = _read_config(folder)
    try:
        saved = ILoRAConfig.from_dict(meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"load_ilora: {folder / CONFIG_NAME} holds an invalid config: {exc}") from None
    patched_here = not ilora_layers(model)
    if patched_here:
        apply_ilora(model, saved)
    try:
        _load_into_patched(model, folder, meta, saved)
    except BaseException:
        if patched_here:
            remove_ilora(model)
        raise
    return model


def _load_into_patched(model: nn.Module, folder: Path, meta: dict, saved: ILoRAConfig) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
    _copy_into_layers(model, tensors, source=str(folder / WEIGHTS_NAME),
                      before_copy=lambda: check_weights(folder, meta, "load_ilora", "save_ilora"))


def _copy_into_layers(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str,
                      before_copy=None) -> None:
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
        _check_tensor(source, key, tensors[key], tuple(param.shape))
    if before_copy is not None:
        before_copy()
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])


def _check_tensor(source: str, key: str, t, shape) -> None:
    """Refuses a tensor of the wrong type, dtype or shape, or with NaN / inf values, naming the key."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{source}: {key} is a {type(t).__name__}, not a tensor")
    if not t.is_floating_point():
        raise TypeError(f"{source}: {key} has dtype {t.dtype}; expected a floating-point tensor")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{source}: {key} has shape {tuple(t.shape)} but the model expects {tuple(shape)}")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{source}: {key} has {bad} non-finite value(s) (NaN or inf); refusing a corrupted adapter")


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
    original_key = {}
    for key in state_dict:
        match = _CRAB_KEY.match(key)
        original_key[(match["module"], match["kind"])] = key
    tensors = {}
    for name, parts in grouped.items():
        layer = layers[name]
        expected = {"lora_A", "lora_route"} | {f"lora_B{i}" for i in range(layer.num_heads)}
        if set(parts) != expected:
            raise KeyError(f"load_crab_state_dict: layer {name!r} needs {sorted(expected)} but the state dict has "
                           f"{sorted(parts)}")
        shapes = {"lora_A": (layer.r, layer.in_features), "lora_route": (layer.num_heads, layer.in_features),
                  **{f"lora_B{i}": (layer.out_features, layer.r) for i in range(layer.num_heads)}}
        for kind, shape in shapes.items():
            _check_tensor("load_crab_state_dict", original_key[(name, kind)], parts[kind], shape)
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
