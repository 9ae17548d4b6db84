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


def unwrapped_name(name: str) -> str:
    """A module or parameter name without the components FSDP1 units and activation-checkpoint wrappers insert
    (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``): the name in the unwrapped model."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _unwrapped_class(model: nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps in a subclass ``FSDP<Name>`` of it."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return cls
    while issubclass(cls, FSDPModule):
        cls = next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls


def _recorded_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The model's I-LoRA layers under the names adapter files record (``unwrapped_name``)."""
    return {unwrapped_name(name): layer for name, layer in ilora_layers(model).items()}


def base_model_identity(model: nn.Module) -> Dict[str, Optional[str]]:
    """What ``save_ilora`` records of the base model (``"base_model"`` in the config) and ``load_ilora`` checks: its
    class name (FSDP2's wrapper class unwrapped), and its Hugging Face ``config.model_type`` and ``name_or_path``
    (None where it has none)."""
    config = getattr(model, "config", None)

    def text(value) -> Optional[str]:
        return value if isinstance(value, str) and value else None
    return {"class": _unwrapped_class(model).__name__, "model_type": text(getattr(config, "model_type", None)),
            "name_or_path": text(getattr(config, "_name_or_path", None)) or text(getattr(model, "name_or_path", None))}


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{"<module>.router_weight" | ".lora_a" | ".lora_b": tensor}`` for every I-LoRA layer (``<module>``: its name
    in the unwrapped model, ``unwrapped_name``)."""
    return {f"{name}.{p}": getattr(layer, p).detach() for name, layer in _recorded_layers(model).items()
            for p in _PARAM_NAMES}


def save_ilora(model: nn.Module, path: Union[str, os.PathLike],
               tensors: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` into the folder ``path`` (atomically, with
    the weights' checksum: see ``write_adapter``; the config also records the base model, ``base_model_identity``).
    ``tensors``: the adapter tensors to write instead of the model's own, keyed like ``adapter_state_dict`` (e.g.
    gathered from FSDP shards); every key must be there. A model FSDP wrapped is recorded as the unwrapped model
    (its layer names and class), which is what ``load_ilora`` finds."""
    layers = _recorded_layers(model)
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
    layers = _recorded_layers(model)
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
# <module>.lora_route.weight (K, d_in), usually under the "base_model.model." prefix of the PeftModel that held the
# layers. Crab+ (GeWu-Lab/Crab_Plus), Crab (GeWu-Lab/Crab) and HydraLoRA (Clin0212/HydraLoRA) all name them so; Crab+
# names its modules in the transformers-4.51 layout of the Qwen2.5-Omni thinker (audio_tower..., visual...,
# model.layers...), which transformers 5 nests under model. (model.audio_tower, model.visual,
# model.language_model.layers).

_CRAB_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B(?P<head>0|[1-9]\d*)|lora_route)\.weight$")
_CRAB_KEY_FORMS = "<module>.lora_A.weight, <module>.lora_B<i>.weight or <module>.lora_route.weight"
_SAVE_ILORA_KEY = re.compile(r"\.(?:router_weight|lora_a|lora_b)$")
# wrappers around the module names: the PeftModel (base_model.model.) and the full Qwen2.5-Omni model (thinker.)
_CRAB_WRAPPERS = ("base_model.model.", "thinker.")
UPSTREAM_PREFIX = "base_model.model."
# thinker module names, transformers 4.51 -> 5 (the renames transformers 5 applies to such checkpoints itself) and back
_THINKER_TO_V5 = (
    (re.compile(r"^audio_tower\."), "model.audio_tower."),
    (re.compile(r"^visual\."), "model.visual."),
    (re.compile(r"^model\.(?!(?:language_model|visual|audio_tower)\.)"), "model.language_model."),
)
_THINKER_TO_V451 = (
    (re.compile(r"^model\.audio_tower\."), "audio_tower."),
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.language_model\."), "model."),
)
# the files upstream writes (finetune_weights.bin: its trainer's checkpoints and its inference script's input;
# lora_weights.bin: the end of its training; adapter_model.bin: peft_hyper's save_pretrained) and PEFT's
CRAB_CHECKPOINT_NAMES = ("finetune_weights.bin", "lora_weights.bin", "adapter_model.bin", "adapter_model.safetensors")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_EXAMPLES = 5


class CrabCheckpointError(KeyError, ValueError):
    """A Crab-layout state dict that does not fit the model's I-LoRA layers (missing layers, unused keys, two
    spellings of one tensor). A ``KeyError`` (as before) and a ``ValueError``; its text is the plain message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CrabLoadReport(list):
    """What ``load_crab_checkpoint`` / ``load_crab_state_dict`` matched. The list itself holds the names of the
    I-LoRA layers loaded (sorted; with ``dry_run=True``: that would load). Attributes:

    * ``loaded``: the same names;
    * ``missing``: the model's I-LoRA layers not loaded (no tensors, or an incomplete set: see ``incomplete``);
    * ``incomplete``: ``{layer: [the tensors it lacks, e.g. "lora_B2"]}``;
    * ``unused``: ``{key: why}`` for every key of the state dict not loaded, in the state dict's order;
    * ``mapping``: ``{key: our name}`` for every key loaded, our name being ``<layer>.<lora_A|lora_B<i>|lora_route>``
      ``.weight`` (the key ``export_crab_state_dict(model, prefix="")`` writes);
    * ``dry_run``: whether nothing was copied on purpose.
    """

    def __init__(self, loaded, missing, incomplete, unused, mapping, dry_run: bool):
        super().__init__(sorted(loaded))
        self.loaded: List[str] = list(self)
        self.missing: List[str] = sorted(missing)
        self.incomplete: Dict[str, List[str]] = dict(incomplete)
        self.unused: Dict[str, str] = dict(unused)
        self.mapping: Dict[str, str] = dict(mapping)
        self.dry_run = dry_run

    @property
    def complete(self) -> bool:
        """Every I-LoRA layer covered and every key used (what ``strict=True`` requires)."""
        return not self.missing and not self.unused

    def __repr__(self) -> str:
        return (f"CrabLoadReport(loaded={len(self.loaded)}, missing={_examples(self.missing)}, "
                f"unused={_examples(list(self.unused))}, dry_run={self.dry_run})")


def _examples(items, n: int = _EXAMPLES) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:n])
    return f"[{shown}{f', ... ({len(items) - n} more)' if len(items) > n else ''}]"


def _rename(name: str, rules) -> str:
    for pattern, replacement in rules:
        new, count = pattern.subn(replacement, name, count=1)
        if count:
            return new
    return name


def _unwrapped(module: str) -> List[str]:
    """``module`` and what is left of it after each leading wrapper (``base_model.model.``, ``thinker.``, in any
    order) is removed, the fully unwrapped name last."""
    forms = [module]
    while True:
        rest = forms[-1]
        wrapper = next((w for w in _CRAB_WRAPPERS if rest.startswith(w) and len(rest) > len(w)), None)
        if wrapper is None:
            return forms
        forms.append(rest[len(wrapper):])


def _crab_candidates(module: str) -> List[str]:
    """The names a Crab key's module may have in our model: as written and without the leading wrappers
    (``_unwrapped``), each also in the transformers-5 thinker layout, each also under ``thinker.`` (our model being
    the full Qwen2.5-Omni model)."""
    names: Dict[str, None] = {}
    for form in _unwrapped(module):
        for name in (form, _rename(form, _THINKER_TO_V5)):
            names[name] = None
            names[f"thinker.{name}"] = None
    return list(names)


def _expected_kinds(layer) -> List[str]:
    return ["lora_A", *(f"lora_B{i}" for i in range(layer.num_heads)), "lora_route"]


def _checked_meta(source: str, key: str, t: torch.Tensor, shape) -> None:
    """A dry run's check of a meta tensor: the checks that need no values (``_checked`` does the rest)."""
    if not t.is_floating_point():
        raise TypeError(f"{source}: {key} has dtype {t.dtype}; expected a floating-point tensor")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{source}: {key} has shape {tuple(t.shape)} but the model expects {tuple(shape)}")


def _mismatch_message(source: str, n_layers: int, n_keys: int, missing, incomplete, unused, not_crab, no_layer,
                      extra_heads, example_layer: str) -> str:
    lines = [f"{source}: the state dict does not fit the model's {n_layers} I-LoRA layers; nothing was loaded "
             f"(strict=False loads the layers that fit and returns the report)"]
    uncovered = [name for name in missing if name not in incomplete]
    if uncovered:
        lines.append(f"  missing: {len(uncovered)} of {n_layers} layers have no tensors: {_examples(uncovered)}")
    if incomplete:
        name, (has, needs) = next(iter(incomplete.items()))
        lines.append(f"  incomplete: {len(incomplete)} layer(s), e.g. layer {name!r} needs {needs} but the state dict "
                     f"has {has}")
    if unused:
        lines.append(f"  unused: {len(unused)} of {n_keys} keys")
    if not_crab:
        hint = ("; keys ending in .router_weight / .lora_a / .lora_b are save_ilora's format: load that folder with "
                "load_ilora" if any(_SAVE_ILORA_KEY.search(k) for k in not_crab) else "")
        lines.append(f"    {len(not_crab)} key(s) that are not I-LoRA tensors (e.g. projector weights): "
                     f"{not_crab[0]!r} is not a Crab I-LoRA key ({_CRAB_KEY_FORMS}); all: {_examples(not_crab)}{hint}")
    if no_layer:
        modules = list(dict.fromkeys(module for _, module in no_layer))
        lines.append(f"    {len(no_layer)} key(s) with no I-LoRA layer named {_examples(modules)} in the model "
                     f"(e.g. {no_layer[0][0]!r}; tried each name without 'base_model.model.' / 'thinker.', in the "
                     f"transformers-5 thinker layout and under 'thinker.'; the model's layers are named like "
                     f"{example_layer!r})")
    if extra_heads:
        key, name, heads = extra_heads[0]
        lines.append(f"    {len(extra_heads)} key(s) for heads the layers do not have, e.g. {key!r}: layer {name!r} "
                     f"has {heads} heads (lora_B0..lora_B{heads - 1})")
    of_incomplete = len(unused) - len(not_crab) - len(no_layer) - len(extra_heads)
    if of_incomplete:
        lines.append(f"    {of_incomplete} key(s) of the incomplete layer(s)")
    return "\n".join(lines)


def _load_crab(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool, dry_run: bool,
               source: str) -> CrabLoadReport:
    """The one engine behind ``load_crab_state_dict`` and ``load_crab_checkpoint``: matches every key to a layer,
    checks everything (names, then shapes, dtypes and values), and copies only when all checks passed."""
    layers = ilora_layers(model)
    if not layers:
        raise ValueError(f"{source}: {type(model).__name__} has no I-LoRA layers (call apply_ilora first)")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{source}: expected a mapping of key -> tensor, got a {type(state_dict).__name__}")
    targets: Dict[Tuple[str, str], List[str]] = {}
    not_crab: List[str] = []
    no_layer: List[Tuple[str, str]] = []
    extra_heads: List[Tuple[str, str, int]] = []
    ambiguous: List[Tuple[str, List[str]]] = []
    unused: Dict[str, str] = {}
    for key in state_dict:
        match = _CRAB_KEY.match(key) if isinstance(key, str) else None
        if match is None:
            not_crab.append(key)
            unused[key] = "not a Crab I-LoRA key"
            continue
        hits = [name for name in _crab_candidates(match["module"]) if name in layers]
        if not hits:
            module = _unwrapped(match["module"])[-1]
            no_layer.append((key, module))
            unused[key] = f"no I-LoRA layer named {module!r} in the model"
            continue
        if len(hits) > 1:
            ambiguous.append((key, hits))
            continue
        name, kind = hits[0], match["kind"]
        if match["head"] is not None and int(match["head"]) >= layers[name].num_heads:
            extra_heads.append((key, name, layers[name].num_heads))
            unused[key] = f"layer {name!r} has {layers[name].num_heads} heads"
            continue
        targets.setdefault((name, kind), []).append(key)
    duplicates = {target: keys for target, keys in targets.items() if len(keys) > 1}
    if ambiguous or duplicates:
        lines = [f"{source}: the state dict names some tensors ambiguously; nothing was loaded"]
        if duplicates:
            (name, kind), keys = next(iter(duplicates.items()))
            lines.append(f"  {len(duplicates)} tensor(s) spelled twice (refused even when the values agree: keep one "
                         f"spelling), e.g. {_examples(keys)} all load into {name}.{kind}.weight")
        if ambiguous:
            key, hits = ambiguous[0]
            lines.append(f"  {len(ambiguous)} key(s) that fit several layers, e.g. {key!r} fits {_examples(hits)}")
        raise CrabCheckpointError("\n".join(lines))

    by_layer: Dict[str, Dict[str, str]] = {}
    for (name, kind), (key,) in targets.items():
        by_layer.setdefault(name, {})[kind] = key
    complete: Dict[str, Dict[str, str]] = {}
    incomplete: Dict[str, Tuple[List[str], List[str]]] = {}
    for name, kinds in by_layer.items():
        expected = _expected_kinds(layers[name])
        if set(kinds) == set(expected):
            complete[name] = kinds
        else:
            incomplete[name] = (sorted(kinds), sorted(expected))
            for key in kinds.values():
                unused[key] = f"layer {name!r} lacks {sorted(set(expected) - set(kinds))}"
    missing = [name for name in layers if name not in complete]
    if strict and (missing or unused):
        raise CrabCheckpointError(_mismatch_message(source, len(layers), len(state_dict), missing, incomplete,
                                                    unused, not_crab, no_layer, extra_heads, next(iter(layers))))

    checked = []
    for name, kinds in complete.items():
        layer = layers[name]
        wanted = {"lora_A": ((layer.r, layer.in_features), layer.lora_a),
                  "lora_route": ((layer.num_heads, layer.in_features), layer.router_weight),
                  **{f"lora_B{i}": ((layer.out_features, layer.r), layer.lora_b) for i in range(layer.num_heads)}}
        cast = {}
        for kind, (shape, param) in wanted.items():
            key, tensor = kinds[kind], state_dict[kinds[kind]]
            if dry_run and isinstance(tensor, torch.Tensor) and tensor.is_meta:
                _checked_meta(source, key, tensor, shape)
            else:
                cast[kind] = _checked(source, key, tensor, shape, param.dtype)
        if not dry_run:
            checked += [(layer.lora_a, cast["lora_A"]), (layer.router_weight, cast["lora_route"]),
                        (layer.lora_b, torch.stack([cast[f"lora_B{i}"] for i in range(layer.num_heads)]))]
    if not dry_run:
        _copy(checked)
    mapping = {key: f"{name}.{kind}.weight" for name, kinds in complete.items() for kind, key in kinds.items()}
    return CrabLoadReport(complete, missing, {name: sorted(set(needs) - set(has))
                                              for name, (has, needs) in incomplete.items()},
                          unused, mapping, dry_run)


def load_crab_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                         dry_run: bool = False) -> CrabLoadReport:
    """Imports Crab-layout tensors (Crab+, Crab, HydraLoRA, PEFT-saved I-LoRA, ``export_crab_state_dict``) into the
    model's I-LoRA layers. Each key's module is looked up as written, without the ``base_model.model.`` /
    ``thinker.`` wrappers and in the transformers-5 thinker layout (``audio_tower.`` -> ``model.audio_tower.``,
    ``visual.`` -> ``model.visual.``, ``model.layers.`` -> ``model.language_model.layers.``).

    ``strict=True``: every I-LoRA layer must be covered (``lora_A``, every ``lora_B<i>``, ``lora_route``) and every
    key used, else one ``CrabCheckpointError`` (a ``KeyError``) lists what is missing and unused. ``strict=False``
    loads the layers that are complete and reports the rest. Always refused: two spellings of one tensor (even with
    equal values) and a key that fits several layers. Shapes, dtypes, meta tensors and non-finite values raise
    naming the key. Nothing is copied unless every check passed. ``dry_run=True`` checks the same (meta tensors
    only for shape and dtype) and copies nothing. Returns a ``CrabLoadReport`` (a list of the layers loaded)."""
    return _load_crab(model, state_dict, strict, dry_run, "load_crab_state_dict")


def _crab_file(path: Path) -> Path:
    """The checkpoint file of ``path``: the file itself, or the one file of ``CRAB_CHECKPOINT_NAMES`` in a folder."""
    if not path.exists():
        raise FileNotFoundError(f"load_crab_checkpoint: {path} does not exist")
    if path.is_file():
        return path
    config = path / CONFIG_NAME
    if config.is_file():
        try:
            fmt = json.loads(config.read_text()).get("format")
        except (ValueError, AttributeError):
            fmt = None
        if fmt == "ilora":
            raise ValueError(f"load_crab_checkpoint: {path} is a save_ilora adapter ({config} says format 'ilora'); "
                             f"load it with load_ilora")
    found = [path / name for name in CRAB_CHECKPOINT_NAMES if (path / name).is_file()]
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"load_crab_checkpoint: {path} holds several checkpoint files {[p.name for p in found]}; "
                         f"pass the one to load")
    others = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in (*_TORCH_SUFFIXES, ".safetensors")
                    and not p.name.startswith("."))
    raise FileNotFoundError(f"load_crab_checkpoint: {path} holds none of {list(CRAB_CHECKPOINT_NAMES)}"
                            + (f"; it has {others}: pass the file to load" if others else ""))


def read_crab_checkpoint(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], Path]:
    """The tensors of a checkpoint file (``.bin`` / ``.pt`` / ``.pth`` through ``torch.load(weights_only=True)``,
    ``.safetensors``) or of the one known checkpoint file in a folder (``CRAB_CHECKPOINT_NAMES``), on the CPU, and
    the file read."""
    file = _crab_file(Path(path))
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(file), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"load_crab_checkpoint: cannot read {file} as safetensors: {e}") from e
    elif file.suffix in _TORCH_SUFFIXES:
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # an unpickling error, a truncated file, ...
            raise ValueError(f"load_crab_checkpoint: cannot read {file} with torch.load(weights_only=True): {e}") from e
    else:
        raise ValueError(f"load_crab_checkpoint: {file} is neither a torch.save file (.bin, .pt, .pth) nor "
                         f".safetensors")
    if not isinstance(tensors, Mapping):
        raise TypeError(f"load_crab_checkpoint: {file} holds a {type(tensors).__name__}, not a state dict")
    return dict(tensors), file


def load_crab_checkpoint(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                         strict: bool = True, dry_run: bool = False) -> CrabLoadReport:
    """Loads a released Crab+ / Crab / HydraLoRA checkpoint into the model's I-LoRA layers: a state dict, a file
    (``finetune_weights.bin``, ``lora_weights.bin``, ``adapter_model.bin``, any ``.bin`` / ``.pt`` / ``.pth``
    through ``torch.load(weights_only=True)``, or ``.safetensors``), or a folder holding exactly one of
    ``CRAB_CHECKPOINT_NAMES``. Key matching, ``strict``, ``dry_run`` and the checks: see ``load_crab_state_dict``."""
    if isinstance(path_or_state_dict, Mapping):
        return _load_crab(model, path_or_state_dict, strict, dry_run, "load_crab_checkpoint")
    tensors, file = read_crab_checkpoint(path_or_state_dict)
    return _load_crab(model, tensors, strict, dry_run, f"load_crab_checkpoint: {file}")


def _upstream_name(name: str) -> str:
    """Our layer name -> the module path in upstream's PeftModel of the transformers-4.51 thinker."""
    return _rename(name.removeprefix("thinker."), _THINKER_TO_V451)


def export_crab_state_dict(model: nn.Module, prefix: str = UPSTREAM_PREFIX,
                           layout: str = "ours") -> Dict[str, torch.Tensor]:
    """The model's I-LoRA weights in the Crab / HydraLoRA layout (see ``load_crab_state_dict``):
    ``<prefix><module>.lora_A.weight``, ``.lora_B<i>.weight``, ``.lora_route.weight``.

    ``layout="ours"`` (the default, as before): ``<module>`` is our layer name (e.g.
    ``model.language_model.layers.0.self_attn.q_proj`` in the transformers-5 thinker). ``layout="upstream"``: the
    names Crab+ writes and its inference script loads (``load_state_dict(strict=False)`` into its PeftModel of the
    thinker): the transformers-4.51 thinker path (``audio_tower.``, ``visual.``, ``model.layers.``; a leading
    ``thinker.`` dropped), under ``base_model.model.`` with the default ``prefix``."""
    if layout not in ("ours", "upstream"):
        raise ValueError(f"export_crab_state_dict: layout={layout!r}; expected 'ours' or 'upstream'")
    out = {}
    seen: Dict[str, str] = {}
    for name, layer in ilora_layers(model).items():
        module = _upstream_name(name) if layout == "upstream" else name
        if module in seen:
            raise ValueError(f"export_crab_state_dict: layers {seen[module]!r} and {name!r} both become {module!r} in "
                             f"the {layout} layout")
        seen[module] = name
        out[f"{prefix}{module}.lora_A.weight"] = layer.lora_a.detach().clone()
        out[f"{prefix}{module}.lora_route.weight"] = layer.router_weight.detach().clone()
        for i in range(layer.num_heads):
            out[f"{prefix}{module}.lora_B{i}.weight"] = layer.lora_b[i].detach().clone()
    return out
