"""Adapter files: our safetensors format, and import/export of the Crab / HydraLoRA state-dict layout."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ._version import __version__
from .config import ILoRAConfig
from .patching import apply_ilora, get_ilora_config, ilora_layers, remove_ilora

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PARAM_NAMES = ("router_weight", "lora_a", "lora_b")
# the weights file kept during a save, named by its checksum: .adapter_model.<sha256>.safetensors
_BACKUP_PARTS = (f".{Path(WEIGHTS_NAME).stem}.", Path(WEIGHTS_NAME).suffix)
_BACKUP = re.compile(re.escape(_BACKUP_PARTS[0]) + r"(?P<sha>[0-9a-f]{64})" + re.escape(_BACKUP_PARTS[1]))
_SHA256 = re.compile(r"[0-9a-f]{64}")
# the dtypes torch.isfinite supports; others (float8) are checked in float32, which holds their values exactly
_ISFINITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _write_atomically(dest: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``dest``, flushed to disk, then renamed over ``dest``."""
    tmp: Optional[str] = _temp_path(dest.parent, dest.name)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, dest)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _backup_path(folder: Path, sha: str) -> Path:
    return folder / f"{_BACKUP_PARTS[0]}{sha}{_BACKUP_PARTS[1]}"


def _backups(folder: Path) -> Dict[str, Path]:
    return {match["sha"]: folder / name for name in os.listdir(folder) if (match := _BACKUP.fullmatch(name))}


def write_adapter(path: Union[str, os.PathLike], tensors: Mapping[str, torch.Tensor], meta: Mapping) -> Path:
    """Writes one adapter folder: ``adapter_model.safetensors`` (``tensors``, stored contiguous on the CPU) and
    ``adapter_config.json`` (``meta`` plus ``"weights_sha256"``, the checksum of the weights file). The one writer of
    adapter files: ``save_ilora``, the trainer's checkpoints and ``peft_integration.save_as_peft`` all write through it.

    A save is atomic as a whole: killed at any point, it leaves the folder holding the previous adapter or the new
    one, each loadable through ``weights_file``. Both files are written in full to temporary files in the folder;
    then the weights the current config belongs to are kept as ``.adapter_model.<sha256>.safetensors`` (a hard link,
    or a copy where the file system has none); the weights and then the config are renamed over the old ones; and
    the backups are deleted. Between the two renames the folder holds the new weights beside the old config, and
    readers find the old weights by the config's checksum. An exception (rather than a kill) before the config is
    renamed puts the old weights back. Returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(meta)
    weights_tmp = config_tmp = backup = None
    weights_replaced = committed = False
    try:
        weights_tmp = _temp_path(folder, WEIGHTS_NAME)
        _write_weights(tensors, weights_tmp)
        _fsync(weights_tmp)
        meta["weights_sha256"] = _sha256(weights_tmp)
        config_tmp = _temp_path(folder, CONFIG_NAME)
        _write_config(meta, config_tmp)
        _fsync(config_tmp)
        backup = _backup_to_keep(folder)
        if backup is not None:
            _link_or_copy(folder / WEIGHTS_NAME, backup)
            _fsync(folder, directory=True)
        os.replace(weights_tmp, folder / WEIGHTS_NAME)
        weights_tmp, weights_replaced = None, True
        os.replace(config_tmp, folder / CONFIG_NAME)
        config_tmp, committed = None, True
        _fsync(folder, directory=True)
        for stale in _backups(folder).values():
            os.unlink(stale)
    except BaseException:
        if backup is not None and not committed:
            _restore(folder, backup, weights_replaced)
        raise
    finally:
        for tmp in (weights_tmp, config_tmp):
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    return folder


def _backup_to_keep(folder: Path) -> Optional[Path]:
    """Where ``write_adapter`` keeps the weights file the folder's config belongs to, while it replaces both; None
    when there is nothing to keep (no loadable adapter, or an interrupted save already kept the weights). A config
    without a checksum (written before checksums, or by PEFT itself) is first given the checksum of its weights."""
    weights, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or not weights.is_file():
        return None
    if meta.get("weights_sha256") is None:
        meta["weights_sha256"] = sha = _sha256(weights)
        _write_atomically(config_path, lambda tmp: _write_config(meta, tmp))
        return _backup_path(folder, sha)
    try:
        current = weights_file(folder, meta, "write_adapter", "write_adapter")
    except (OSError, ValueError):
        return None
    return _backup_path(folder, meta["weights_sha256"]) if current == weights else None


def _link_or_copy(source: Path, dest: Path) -> None:
    if dest.exists():                # left by a save killed before it replaced the weights, which still match it
        os.unlink(dest)
    try:
        os.link(source, dest)
    except OSError:
        _write_atomically(dest, lambda tmp: shutil.copyfile(source, tmp))


def _restore(folder: Path, backup: Path, weights_replaced: bool) -> None:
    """Undoes a save that failed before its config was renamed; where even that fails, readers still find the old
    weights in the backup."""
    try:
        if weights_replaced:
            os.replace(backup, folder / WEIGHTS_NAME)
        elif backup.exists():
            os.unlink(backup)
        _fsync(folder, directory=True)
    except OSError:
        pass


def weights_file(folder: Path, meta: Mapping, reader: str, writer: str) -> Path:
    """The weights file that belongs to ``meta`` (the folder's parsed ``adapter_config.json``): every reader of
    adapter folders opens the path this returns. That is ``adapter_model.safetensors`` when it matches the config's
    ``weights_sha256`` (or the config records none: folders written before checksums, or by PEFT itself), else the
    copy of the config's weights that an interrupted ``write_adapter`` kept (``.adapter_model.<sha256>.safetensors``,
    checked against the same checksum).

    Raises ``ValueError`` (naming ``reader``, the files, and ``writer`` as the save to suspect) when neither matches
    or ``weights_sha256`` is no SHA-256 hex digest, ``FileNotFoundError`` when there are no weights."""
    weights, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    expected = meta.get("weights_sha256")
    if expected is None:
        if not weights.is_file():
            raise FileNotFoundError(f"{reader}: {weights} does not exist")
        return weights
    if not isinstance(expected, str) or not _SHA256.fullmatch(expected):
        raise ValueError(f"{reader}: {config_path} has weights_sha256={expected!r}, which is not a SHA-256 hex digest "
                         f"(64 lowercase hexadecimal digits)")
    actual = _sha256(weights) if weights.is_file() else None
    if actual == expected:
        return weights
    backup = _backup_path(folder, expected)
    if backup.is_file() and _sha256(backup) == expected:
        return backup
    if actual is None:
        raise FileNotFoundError(f"{reader}: {weights} does not exist")
    raise ValueError(f"{reader}: {weights} does not match {config_path} (weights_sha256 {expected[:12]}... expected, "
                     f"{actual[:12]}... found): the folder mixes two saves (an interrupted {writer}?) or the weights "
                     f"file was modified")


def check_weights(folder: Path, meta: Mapping, reader: str, writer: str) -> None:
    """Refuses ``adapter_model.safetensors`` unless it is the weights file that belongs to ``meta`` (see
    ``weights_file``), for readers that then open that file by name. Open ``weights_file``'s path instead: it also
    reads a folder whose save was interrupted between its two renames, which this refuses."""
    path = weights_file(folder, meta, reader, writer)
    if path != folder / WEIGHTS_NAME:
        raise ValueError(f"{reader}: {folder / WEIGHTS_NAME} does not match {folder / CONFIG_NAME}: an interrupted "
                         f"{writer} left its new weights beside the old config, whose weights are intact in "
                         f"{path.name}; read them from the path adapters.weights_file returns")


def base_model_identity(model: nn.Module) -> Dict[str, Optional[str]]:
    """What ``save_ilora`` records of the base model (``"base_model"`` in the config) and ``load_ilora`` checks: its
    class name, and its Hugging Face ``config.model_type`` and ``name_or_path`` (None where it has none)."""
    config = getattr(model, "config", None)

    def text(value) -> Optional[str]:
        return value if isinstance(value, str) and value else None
    return {"class": type(model).__name__, "model_type": text(getattr(config, "model_type", None)),
            "name_or_path": text(getattr(config, "_name_or_path", None)) or text(getattr(model, "name_or_path", None))}


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{"<module>.router_weight" | ".lora_a" | ".lora_b": tensor}`` for every I-LoRA layer."""
    return {f"{name}.{p}": getattr(layer, p).detach() for name, layer in ilora_layers(model).items()
            for p in _PARAM_NAMES}


def save_ilora(model: nn.Module, path: Union[str, os.PathLike],
               tensors: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` into the folder ``path`` (atomically, with
    the weights' checksum: see ``write_adapter``; the config also records the base model, ``base_model_identity``).
    ``tensors``: the adapter tensors to write instead of the model's own, keyed like ``adapter_state_dict`` (e.g.
    gathered from FSDP shards); every key must be there."""
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
    meta = {"format": "ilora", "ilora_kernels_version": __version__, **config.to_dict(), "modules": sorted(layers),
            "base_model": base_model_identity(model)}
    return write_adapter(path, tensors, meta)


def _read_config(folder: Path) -> dict:
    """The parsed ``adapter_config.json`` of a ``save_ilora`` folder, with the JSON types of the keys that are not
    hyperparameters checked (the hyperparameters are ``ILoRAConfig``'s to check)."""
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
    modules = meta.get("modules")
    if modules is not None and not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise ValueError(f"load_ilora: {config_path} has modules={modules!r}; expected the list of the adapted "
                         f"modules' names")
    base = meta.get("base_model")
    if base is not None and not (isinstance(base, dict) and isinstance(base.get("class"), str) and all(
            isinstance(base.get(k), (str, type(None))) for k in ("model_type", "name_or_path"))):
        raise ValueError(f"load_ilora: {config_path} has base_model={base!r}; expected an object "
                         f'{{"class": string, "model_type": string or null, "name_or_path": string or null}}')
    return meta


def load_ilora(model: nn.Module, path: Union[str, os.PathLike], allow_other_base: bool = False) -> nn.Module:
    """Loads an adapter saved by ``save_ilora``. An unpatched model is patched with the saved config first; a
    patched model must match the saved r, num_heads, alpha, dropout, top_k and target_modules. The model must be of
    the class and ``config.model_type`` the adapter was saved from (configs without that record pass);
    ``allow_other_base=True`` loads it into another base model all the same (e.g. a Llama with the module names and
    widths of the Qwen2 it was trained on). Returns ``model``.

    All checks (config, base model, keys, dtypes, shapes, values finite in the model's dtype, the weights' checksum)
    run before anything is copied: a refused adapter leaves the model exactly as it was (an unpatched model is
    unpatched again)."""
    folder = Path(path)
    config_path = folder / CONFIG_NAME
    meta = _read_config(folder)
    try:
        saved = ILoRAConfig.from_dict(meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"load_ilora: {config_path} holds an invalid config: {exc}") from None
    if not allow_other_base:
        _check_base_model(model, meta.get("base_model"), config_path)
    if ilora_layers(model):
        check_same_config(get_ilora_config(model), saved, config_path)
        _load_into_patched(model, folder, meta)
        return model
    try:
        apply_ilora(model, saved)
    except ValueError as exc:
        raise ValueError(f"load_ilora: {config_path}: {exc}") from None
    try:
        _load_into_patched(model, folder, meta)
    except BaseException:
        remove_ilora(model)
        raise
    return model


def _check_base_model(model: nn.Module, recorded: Optional[Mapping], config_path: Path) -> None:
    if recorded is None:
        return
    current = base_model_identity(model)
    if all(recorded.get(k) is None or current[k] is None or recorded[k] == current[k] for k in ("class", "model_type")):
        return
    raise ValueError(f"load_ilora: {config_path} was saved from a {recorded['class']} (model_type "
                     f"{recorded.get('model_type')!r}) but the model is a {current['class']} (model_type "
                     f"{current['model_type']!r}); pass allow_other_base=True to load it into this model anyway")


def check_same_config(current: ILoRAConfig, saved: ILoRAConfig, config_path: Path, reader: str = "load_ilora") -> None:
    """Refuses loading an adapter saved with ``saved`` into layers patched with ``current`` unless r, num_heads,
    alpha, dropout, top_k and target_modules agree (the backend may differ)."""
    for field in ("r", "num_heads", "alpha", "dropout", "top_k"):
        if getattr(current, field) != getattr(saved, field):
            raise ValueError(f"{reader}: {config_path} has {field}={getattr(saved, field)!r} but the model's I-LoRA "
                             f"layers have {field}={getattr(current, field)!r}")

    def targets(t):
        return t if isinstance(t, str) else frozenset(t)
    if targets(current.target_modules) != targets(saved.target_modules):
        raise ValueError(f"{reader}: {config_path} targets {saved.target_modules!r} but the model was patched for "
                         f"{current.target_modules!r} (target_modules)")


def _load_into_patched(model: nn.Module, folder: Path, meta: dict) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        path, refusal = weights_file(folder, meta, "load_ilora", "save_ilora"), None
    except ValueError as exc:
        # read the file all the same, so that a more specific fault (unreadable, keys, values) is the one reported
        path, refusal = folder / WEIGHTS_NAME, exc
    try:
        tensors = load_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"load_ilora: {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"load_ilora: {path} is not a readable safetensors file ({exc})") from None
    layers = ilora_layers(model)
    params = {f"{name}.{p}": getattr(layer, p) for name, layer in layers.items() for p in _PARAM_NAMES}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing:
        raise KeyError(f"{path} lacks {len(missing)} key(s) the model needs, e.g. {missing[:5]}")
    if unexpected:
        raise KeyError(f"{path} has {len(unexpected)} key(s) the model does not have, e.g. {unexpected[:5]}")
    checked = [(param, _checked(str(path), key, tensors[key], param.shape, param.dtype))
               for key, param in params.items()]
    modules = meta.get("modules")
    if modules is not None and set(modules) != set(layers):
        raise ValueError(f"load_ilora: {folder / CONFIG_NAME} has modules that are not the layers of its weights file "
                         f"(the model's I-LoRA layers): listed but not in the weights "
                         f"{sorted(set(modules) - set(layers))[:3]}, in the weights but not listed "
                         f"{sorted(set(layers) - set(modules))[:3]}")
    if refusal is not None:
        raise refusal
    _copy(checked)


def _copy(checked: List[Tuple[nn.Parameter, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, value in checked:
            param.copy_(value)


def _non_finite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t if t.dtype in _ISFINITE_DTYPES else t.float())).sum())


def _checked(source: str, key: str, t, shape, dtype: torch.dtype) -> torch.Tensor:
    """``t`` cast to ``dtype`` (that of the parameter it will be copied into), after refusing a non-tensor, a meta
    tensor, a non-floating dtype, another shape, and values that are not finite in the file or not in ``dtype``;
    errors name the key."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{source}: {key} is a {type(t).__name__}, not a tensor")
    if t.is_meta:
        raise ValueError(f"{source}: {key} is a meta tensor (shape and dtype, no values: a model built on the meta "
                         f"device?); refusing to load it")
    if not t.is_floating_point():
        raise TypeError(f"{source}: {key} has dtype {t.dtype}; expected a floating-point tensor")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{source}: {key} has shape {tuple(t.shape)} but the model expects {tuple(shape)}")
    bad = _non_finite(t)
    if bad:
        raise ValueError(f"{source}: {key} has {bad} non-finite value(s) (NaN or inf); refusing a corrupted adapter")
    cast = t.to(dtype)
    bad = _non_finite(cast)
    if bad:
        raise ValueError(f"{source}: {key} has {bad} value(s) that are not finite in {dtype}, the model's dtype "
                         f"(the {t.dtype} values reach {float(t.float().abs().max()):g}); refusing values that would "
                         f"load as inf")
    return cast


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
    checked = []
    for name, parts in grouped.items():
        layer = layers[name]
        expected = {"lora_A", "lora_route"} | {f"lora_B{i}" for i in range(layer.num_heads)}
        if set(parts) != expected:
            raise KeyError(f"load_crab_state_dict: layer {name!r} needs {sorted(expected)} but the state dict has "
                           f"{sorted(parts)}")
        wanted = {"lora_A": ((layer.r, layer.in_features), layer.lora_a.dtype),
                  "lora_route": ((layer.num_heads, layer.in_features), layer.router_weight.dtype),
                  **{f"lora_B{i}": ((layer.out_features, layer.r), layer.lora_b.dtype) for i in range(layer.num_heads)}}
        cast = {kind: _checked("load_crab_state_dict", original_key[(name, kind)], parts[kind], shape, dtype)
                for kind, (shape, dtype) in wanted.items()}
        checked += [(layer.lora_a, cast["lora_A"]), (layer.router_weight, cast["lora_route"]),
                    (layer.lora_b, torch.stack([cast[f"lora_B{i}"] for i in range(layer.num_heads)]))]
    # layers the state dict does not mention keep their values; all mentioned layers are checked in full
    _copy(checked)
    return sorted(grouped)


def export_crab_state_dict(model: nn.Module, prefix: str = "base_model.model.") -> Dict[str, torch.Tensor]:
    """The model's I-LoRA weights in the Crab / HydraLoRA layout (see ``load_crab_state_dict``)."""
    out = {}
    for name, layer in ilora_layers(model).items():
        out[f"{prefix}{name}.lora_A.weight"] = layer.lora_a.detach().clone()
        out[f"{prefix}{name}.lora_route.weight"] = layer.router_weight.detach().clone()
        for i in range(layer.num_heads):
            out[f"{prefix}{name}.lora_B{i}.weight"] = layer.lora_b[i].detach().clone()
    return out
