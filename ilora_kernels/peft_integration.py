"""I-LoRA as a PEFT method of its own: ``peft_type="ILORA"``, config ``ILoRAPeftConfig``, tuner ``ILoRAPeftModel``.

``register_peft_method()`` adds the method to PEFT's registry; ``import ilora_kernels`` arranges for it to run as
soon as PEFT itself is imported (or at once if it already is), so the usual PEFT calls work on I-LoRA adapters:
``get_peft_model(model, ILoRAPeftConfig(...))``, ``save_pretrained``, ``PeftModel.from_pretrained``,
``load_adapter`` (more adapters), ``set_adapter``, ``delete_adapter``, ``disable_adapter``, ``unload`` and the HF
Trainer's adapter-only checkpoints. Saved folders say ``"peft_type": "ILORA"``: PEFT without this package refuses
them (``KeyError: 'ILORA'``) instead of building a plain LoRA. Each I-LoRA PEFT layer holds, per adapter,

    lora_A[adapter]       nn.Linear(d_in, r)      weight (r, d_in)         = ILoRALinear.lora_a
    lora_route[adapter]   nn.Linear(d_in, K)      weight (K, d_in)         = ILoRALinear.router_weight
    lora_B{i}[adapter]    nn.Linear(r, d_out)     weight (d_out, r), i < K = ILoRALinear.lora_b[i]

so ``save_pretrained`` writes exactly the Crab / HydraLoRA checkpoint layout
(``base_model.model.<module>.lora_A.weight``, ``.lora_B{i}.weight``, ``.lora_route.weight``), which
``ilora_kernels.load_crab_state_dict`` reads. Conversions in both directions:

    save_as_peft(model, path)            our patched model  -> PEFT adapter folder
    load_peft_adapter(model, path)       PEFT adapter folder -> our model (patched with apply_ilora if needed)
    from_pretrained(base_model, path)    PEFT or save_ilora folder -> PeftModel with I-LoRA layers
    load_peft_config(path)               adapter_config.json (PEFT or ours) -> ILoRAPeftConfig

Folders written before the method had its own type (``"peft_type": "LORA"`` with ``ilora_num_heads``) load through
``from_pretrained`` / ``load_peft_adapter`` / ``load_peft_config`` here (plain ``PeftModel.from_pretrained`` reads
them as LoRA, as it always did).

Limits: nn.Linear targets only; no merging (routing depends on the input, so ``merge_adapter``,
``merge_and_unload`` and ``add_weighted_adapter`` raise ``NotImplementedError`` and change nothing; ``unload``
works); no mixed-batch ``adapter_names``; no DoRA, rsLoRA, ``lora_bias``, ``fan_in_fan_out``, quantized base
layers, or non-boolean ``init_lora_weights``; several active adapters at once work, but only the first runs the
fused kernel (the others add a plain-PyTorch delta). PEFT versions: ``SUPPORTED_PEFT``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from . import settings

SUPPORTED_PEFT = ("0.19.0", "0.22.0")  # [lower, upper): tested; 0.18 lacks the update_layer(config=...) API we use
_OVERRIDE_ENV = "ILORA_ALLOW_UNTESTED_PEFT"


def _version_tuple(text: str) -> Tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def check_peft_version(version: Optional[str] = None) -> str:
    """Returns the installed PEFT version, or raises ``ImportError`` when PEFT is missing or outside
    ``SUPPORTED_PEFT`` (set ILORA_ALLOW_UNTESTED_PEFT=1 to try another version at your own risk)."""
    if version is None:
        try:
            import peft
        except ImportError:
            raise ImportError("ilora_kernels.peft_integration needs PEFT: pip install 'peft>=%s,<%s'"
                              % SUPPORTED_PEFT) from None
        version = peft.__version__
    low, high = SUPPORTED_PEFT
    if not (_version_tuple(low) <= _version_tuple(version) < _version_tuple(high)):
        if settings.get().allow_untested_peft:
            return version
        raise ImportError(f"ilora_kernels.peft_integration supports peft>={low},<{high} (it builds on PEFT's "
                          f"experimental custom-module API, which changes between releases); peft {version} is "
                          f"installed. Install a supported version, or set {_OVERRIDE_ENV}=1 to try anyway.")
    return version


PEFT_VERSION = check_peft_version()

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer, LoraModel  # noqa: E402
from peft.utils import set_peft_model_state_dict  # noqa: E402
from peft.utils.peft_types import PeftType  # noqa: E402

from ._validation import float32_masters, validate_hyperparameters  # noqa: E402
from .adapters import (  # noqa: E402
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_same_config,
    check_weights,
    export_crab_state_dict,
    load_crab_state_dict,
    weights_file,
    write_adapter,
)
from .config import ILoRAConfig  # noqa: E402
from .functional import ilora_linear  # noqa: E402
from .ops.layout import concat_heads, pack_shrink_  # noqa: E402
from .ops.reference import routed_activations, router_probabilities  # noqa: E402
from .patching import apply_ilora, get_ilora_config, ilora_layers, remove_ilora  # noqa: E402

__all__ = ["ILoRAPeftConfig", "ILoRAPeftLinear", "ILoRAPeftModel", "PEFT_TYPE", "PEFT_VERSION", "SUPPORTED_PEFT",
           "check_peft_version", "from_pretrained", "ilora_config_from_peft", "load_peft_adapter", "load_peft_config",
           "peft_config_from_ilora", "register_peft_method", "save_as_peft", "to_peft_model"]


def _peft_type_member(name: str) -> PeftType:
    """``PeftType[name]``, added to PEFT's ``PeftType`` enum first if it is not there (PEFT registers new methods
    only under names of that enum)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    if hasattr(PeftType, "_add_member_"):  # Python >= 3.13
        PeftType._add_member_(name, member)
    else:
        member._sort_order_ = len(PeftType._member_names_)
        PeftType._member_map_[name] = member
        PeftType._member_names_.append(name)
        type.__setattr__(PeftType, name, member)
    PeftType._value2member_map_[name] = member
    return member


PEFT_TYPE = _peft_type_member("ILORA")

_PEFT_PREFIX = "base_model.model."
# the hyperparameters under their LoraConfig / ILoRAPeftConfig field names
_PEFT_FIELD_NAMES = {"num_heads": "ilora_num_heads", "alpha": "lora_alpha", "dropout": "lora_dropout",
                     "top_k": "ilora_top_k", "backend": "ilora_backend"}


@dataclass
class ILoRAPeftConfig(LoraConfig):
    """The config of PEFT's I-LoRA method (``peft_type="ILORA"``): targeted ``nn.Linear`` layers become I-LoRA layers
    (``ILoRAPeftLinear``). It extends ``LoraConfig``, so every LoRA option keeps its meaning where I-LoRA has it.

    ``r``, ``lora_alpha`` (scaling = lora_alpha / r), ``lora_dropout`` and ``target_modules`` keep their PEFT
    meaning; ``ilora_num_heads`` is K, ``ilora_top_k`` the optional top-k routing (None = dense), ``ilora_backend``
    the kernel backend ("auto", "reference", "cpu", "triton", "cuda"). Crab+ recipe: r=128, lora_alpha=256,
    lora_dropout=0.1, ilora_num_heads=3.
    """

    ilora_num_heads: int = field(default=3, metadata={"help": "I-LoRA: number of B heads K (router outputs)"})
    ilora_top_k: Optional[int] = field(default=None, metadata={"help": "I-LoRA: top-k routing; None = dense"})
    ilora_backend: str = field(default="auto", metadata={"help": "I-LoRA kernel backend"})
    init_weights: Optional[bool] = field(default=None, metadata={
        "help": "alias of init_lora_weights (the name PEFT's other methods use); None = use init_lora_weights"})

    def __post_init__(self):
        if self.init_weights is not None:
            self.init_lora_weights = self.init_weights
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        validate_hyperparameters(r=self.r, num_heads=self.ilora_num_heads, alpha=self.lora_alpha,
                                 dropout=self.lora_dropout, top_k=self.ilora_top_k, backend=self.ilora_backend,
                                 prefix="ILoRAPeftConfig.", names=_PEFT_FIELD_NAMES)
        unsupported = {"use_dora": self.use_dora, "use_rslora": self.use_rslora, "lora_bias": self.lora_bias,
                       "fan_in_fan_out": self.fan_in_fan_out}
        bad = sorted(name for name, value in unsupported.items() if value)
        if bad:
            raise ValueError(f"ILoRAPeftConfig does not support {bad} (I-LoRA layers implement plain routed LoRA)")
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError("ILoRAPeftConfig supports init_lora_weights=True (Crab+ init: A and the router "
                             "kaiming-uniform, every B_k zero) or False (B_k random too), got "
                             f"{self.init_lora_weights!r}")
        self._register_custom_module({nn.Linear: ILoRAPeftLinear})


class ILoRAPeftLinear(nn.Module, LoraLayer):
    """PEFT tuner layer for one ``nn.Linear``: y = base(x) + s * sum_k g_k B_k A dropout(x), g = softmax(W_r x),
    computed by ``ilora_kernels.ilora_linear`` (the fused kernels) for the first active adapter.

    Per adapter: ``lora_A`` (r, d_in), ``lora_route`` (K, d_in), ``lora_B0 .. lora_B{K-1}`` (d_out, r) each;
    ``scaling = lora_alpha / r``. x (..., d_in) -> (..., d_out).
    """

    adapter_layer_names: Tuple[str, ...] = ("lora_A", "lora_B", "lora_route")
    other_param_names: Tuple[str, ...] = LoraLayer.other_param_names + ("num_heads", "top_k", "ilora_backend")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: float = 1, **kwargs: Any) -> None:
        super().__init__()
        target = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if type(target) is not nn.Linear:
            raise TypeError(f"ILoRAPeftLinear adapts plain nn.Linear layers, got {type(target).__name__}")
        if kwargs.get("loaded_in_8bit") or kwargs.get("loaded_in_4bit"):
            raise ValueError("ILoRAPeftLinear does not support quantized (8-bit / 4-bit) base layers")
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self.lora_route = nn.ModuleDict({})
        self.num_heads: Dict[str, int] = {}
        self.top_k: Dict[str, Optional[int]] = {}
        self.ilora_backend: Dict[str, str] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self.register_load_state_dict_post_hook(_pack_after_load)

    def _head_dict(self, i: int) -> nn.ModuleDict:
        name = f"lora_B{i}"
        if not hasattr(self, name):
            setattr(self, name, nn.ModuleDict({}))
        return getattr(self, name)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs: Any) -> None:
        if not isinstance(config, ILoRAPeftConfig):
            raise TypeError(f"ILoRAPeftLinear needs an ILoRAPeftConfig, got {type(config).__name__}")
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        k = config.ilora_num_heads
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.num_heads[adapter_name] = k
        self.top_k[adapter_name] = config.ilora_top_k
        self.ilora_backend[adapter_name] = config.ilora_backend
        self.use_dora[adapter_name] = False
        self.use_rslora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p=p) if p > 0.0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_route[adapter_name] = nn.Linear(self.in_features, k, bias=False)
        for i in range(k):
            self._head_dict(i)[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        heads = max(self.num_heads.values())
        self.adapter_layer_names = ("lora_A", "lora_B", "lora_route") + tuple(f"lora_B{i}" for i in range(heads))
        self.reset_ilora_parameters(adapter_name, bool(config.init_lora_weights))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_ilora_parameters(self, adapter_name: str, zero_b: bool = True) -> None:
        """Crab+ initialisation: A and W_r kaiming_uniform(a=sqrt(5)); every B_k zero (or random if not zero_b)."""
        nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_route[adapter_name].weight, a=math.sqrt(5))
        for i in range(self.num_heads[adapter_name]):
            weight = self._head_dict(i)[adapter_name].weight
            nn.init.zeros_(weight) if zero_b else nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def _heads(self, adapter_name: str) -> List[nn.Parameter]:
        return [self._head_dict(i)[adapter_name].weight for i in range(self.num_heads[adapter_name])]

    def pack_adapter(self, adapter_name: str) -> None:
        """Puts one adapter's lora_route and lora_A in one (K + r, d_in) buffer (``ops/layout.py``), so that the
        kernels' [W_r; A] is a view; parameters that live in another buffer (FSDP, DeepSpeed) are left as they are.
        The heads stay separate contiguous parameters (every distributed engine takes them; strided slices of one
        buffer are refused by FSDP2): lora_b is stacked per call."""
        pack_shrink_(self.lora_route[adapter_name].weight, self.lora_A[adapter_name].weight)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        if adapter_name in self.lora_route:
            self.pack_adapter(adapter_name)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        for adapter_name in self.lora_route:
            self.pack_adapter(adapter_name)
        return module

    def adapter_tensors(self, adapter_name: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router_weight (K, d_in), lora_a (r, d_in), lora_b (K, d_out, r)) of one adapter (lora_b is stacked)."""
        return self.lora_route[adapter_name].weight, self.lora_A[adapter_name].weight, torch.stack(
            self._heads(adapter_name))

    # merging is impossible: the routing weights depend on every input token
    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        raise NotImplementedError("I-LoRA cannot be merged into the base weight: its router mixes the B heads per "
                                  "token. Use unload() to drop the adapter, or keep the PeftModel for inference.")

    def unmerge(self) -> None:
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError("I-LoRA has no input-independent delta weight (its routing is per token)")

    def _delta(self, adapter: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Plain-PyTorch adapter output s * sum_k g_k B_k A dropout(x) for extra active adapters."""
        router, lora_a, lora_b = (t.to(dtype) for t in self.adapter_tensors(adapter))
        top_k = self.top_k[adapter] or 0
        x2 = x.reshape(-1, x.shape[-1])
        g = router_probabilities(x2, router, 0 if top_k == router.shape[0] else top_k)
        h = self.lora_dropout[adapter](x2) @ lora_a.t()
        delta = (routed_activations(g, h) @ concat_heads(lora_b).t()) * self.scaling[adapter]
        return delta.view(*x.shape[:-1], lora_b.shape[1])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x (..., d_in) -> (..., d_out)."""
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("I-LoRA PEFT layers do not support mixed-batch `adapter_names`")
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or not active or args or kwargs:
            if args or kwargs:
                raise TypeError("ILoRAPeftLinear.forward takes only x (nn.Linear semantics)")
            return self.base_layer(x)
        base = self.get_base_layer()
        dtype = base.weight.dtype
        x_in = x if x.dtype == dtype else x.to(dtype)
        first = active[0]
        router, lora_a, lora_b = self.adapter_tensors(first)
        if not float32_masters(dtype, (router, lora_a, lora_b)):
            # (float32 master weights on a half base are cast by ilora_linear, keeping the packed layout)
            router, lora_a, lora_b = (t if t.dtype == dtype else t.to(dtype) for t in (router, lora_a, lora_b))
        dropout = self.lora_dropout[first]
        y = ilora_linear(x_in, base.weight, base.bias, router, lora_a, lora_b, self.scaling[first],
                         dropout_p=getattr(dropout, "p", 0.0), training=self.training, top_k=self.top_k[first],
                         backend=self.ilora_backend[first])
        for adapter in active[1:]:
            y = y + self._delta(adapter, x_in, y.dtype)
        return y

    def __repr__(self) -> str:
        return "ilora." + super().__repr__()


def _pack_after_load(layer: ILoRAPeftLinear, incompatible_keys) -> None:
    """``load_state_dict(assign=True)`` (PEFT's ``low_cpu_mem_usage=True``) puts the loaded tensors in place."""
    for adapter_name in layer.lora_route:
        layer.pack_adapter(adapter_name)


class ILoRAPeftModel(LoraModel):
    """PEFT's tuner for ``peft_type="ILORA"``: LoRA's tuner building ``ILoRAPeftLinear`` layers, without the
    operations that need an input-independent delta weight (merging, weighted combinations), which raise
    ``NotImplementedError`` before anything changes."""

    prefix: str = "lora_"

    def _check_merge_allowed(self):
        raise NotImplementedError("I-LoRA adapters cannot be merged into the base weights: the router mixes the B "
                                  "heads per token. Use unload() to drop the adapters, or keep the PeftModel.")

    def add_weighted_adapter(self, adapters, weights, adapter_name, *args, **kwargs) -> None:
        raise NotImplementedError("add_weighted_adapter is not available for I-LoRA adapters: a weighted sum of "
                                  "routed adapters is not an I-LoRA adapter (each has its own router). Nothing "
                                  "was changed.")


def register_peft_method() -> None:
    """Registers I-LoRA in PEFT's method registry (``peft_type="ILORA"``: ``ILoRAPeftConfig``, ``ILoRAPeftModel``).
    Idempotent. ``import ilora_kernels`` calls it when PEFT gets imported."""
    from peft import mapping

    if mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is ILoRAPeftModel:
        return
    # PEFT's register_peft_method refuses a second method with the prefix "lora_"; the I-LoRA parameters are LoRA's
    # (lora_A, lora_B<i>, plus lora_route), so the mappings are filled in directly
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = ILoRAPeftConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = ILoRAPeftModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = ILoRAPeftModel.prefix


register_peft_method()


# ---------------------------------------------------------------------------------------------------------------
# configs and files


def _peft_field_names() -> set:
    return {f.name for f in fields(ILoRAPeftConfig) if f.init}


def peft_config_from_ilora(config: ILoRAConfig, **lora_kwargs: Any) -> ILoRAPeftConfig:
    """The ``ILoRAPeftConfig`` equivalent of an ``ILoRAConfig`` (same layers, same numbers)."""
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    return ILoRAPeftConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                           ilora_num_heads=config.num_heads, ilora_top_k=config.top_k,
                           ilora_backend=config.backend, **lora_kwargs)


def ilora_config_from_peft(config: LoraConfig) -> ILoRAConfig:
    """The ``ILoRAConfig`` equivalent of an ``ILoRAPeftConfig``; raises for PEFT options ours cannot express."""
    if not isinstance(config, ILoRAPeftConfig):
        raise TypeError(f"expected an ILoRAPeftConfig, got {type(config).__name__} (a plain LoRA adapter?)")
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("rank_pattern / alpha_pattern have no ILoRAConfig equivalent (one r and alpha per model)")
    if config.exclude_modules or config.layers_to_transform is not None or config.modules_to_save:
        raise ValueError("exclude_modules, layers_to_transform and modules_to_save have no ILoRAConfig equivalent")
    targets = config.target_modules
    if targets is None:
        raise ValueError("the PEFT config has no target_modules")
    targets = targets if isinstance(targets, str) else tuple(sorted(targets))
    return ILoRAConfig(r=config.r, num_heads=config.ilora_num_heads, alpha=float(config.lora_alpha),
                       dropout=float(config.lora_dropout), target_modules=targets, top_k=config.ilora_top_k,
                       backend=config.ilora_backend)


def _read_json(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def load_peft_config(path: Union[str, os.PathLike]) -> ILoRAPeftConfig:
    """Reads ``adapter_config.json`` written by PEFT for I-LoRA (or by ``save_ilora``) as an ``ILoRAPeftConfig``."""
    folder = Path(path)
    meta = _read_json(folder)
    if meta.get("format") == "ilora":
        return peft_config_from_ilora(ILoRAConfig.from_dict(meta))
    peft_type = str(meta.get("peft_type", "")).upper()
    legacy = peft_type == "LORA" and "ilora_num_heads" in meta  # written before I-LoRA had its own PEFT type
    if peft_type != PEFT_TYPE.value and not legacy:
        raise ValueError(f"{folder / CONFIG_NAME} is not an I-LoRA adapter config (peft_type="
                         f"{meta.get('peft_type')!r}; expected {PEFT_TYPE.value!r})")
    known = _peft_field_names()
    kwargs = {k: v for k, v in meta.items() if k in known}
    if isinstance(kwargs.get("runtime_config"), dict):
        kwargs.pop("runtime_config")
    return ILoRAPeftConfig(**kwargs)


def _load_safetensors(folder: Path, reader: str) -> Dict[str, torch.Tensor]:
    """The weights of an adapter folder that match its config (``adapters.weights_file``: the weights file, or the
    previous weights a save interrupted between its renames kept)."""
    from safetensors.torch import load_file

    meta = _read_json(folder)
    writer = "save_ilora" if meta.get("format") == "ilora" else "save_as_peft"
    return load_file(weights_file(folder, meta, reader, writer))


def _ilora_to_crab(tensors: Dict[str, torch.Tensor], prefix: str = _PEFT_PREFIX) -> Dict[str, torch.Tensor]:
    """Our safetensors keys (<module>.router_weight / .lora_a / .lora_b) -> the Crab / PEFT layout."""
    out = {}
    for key, value in tensors.items():
        module, _, param = key.rpartition(".")
        if param == "lora_a":
            out[f"{prefix}{module}.lora_A.weight"] = value
        elif param == "router_weight":
            out[f"{prefix}{module}.lora_route.weight"] = value
        elif param == "lora_b":
            for i in range(value.shape[0]):
                out[f"{prefix}{module}.lora_B{i}.weight"] = value[i].contiguous()
        else:
            raise KeyError(f"unexpected key {key!r} in an ilora_kernels adapter file")
    return out


def save_as_peft(model: nn.Module, path: Union[str, os.PathLike], **lora_kwargs: Any) -> Path:
    """Writes the I-LoRA adapter of a model patched by ``apply_ilora`` as a PEFT adapter folder
    (``adapter_config.json`` of an ``ILoRAPeftConfig`` + ``adapter_model.safetensors`` in the Crab/PEFT layout),
    atomically and checksummed (``adapters.write_adapter``)."""
    config = peft_config_from_ilora(get_ilora_config(model), **lora_kwargs)
    meta = {key: sorted(value) if isinstance(value, set) else value
            for key, value in sorted(config.to_dict().items())}      # as PeftConfig.save_pretrained writes it
    return write_adapter(path, export_crab_state_dict(model, prefix=_PEFT_PREFIX), meta)


def load_peft_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Loads a PEFT-saved I-LoRA adapter folder into a plain model (patched with ``apply_ilora`` first, from the
    saved config) or into a model already patched with the same r, K, alpha, dropout, top_k and targets. Every
    I-LoRA layer must be covered. A refused adapter leaves the model as it was (a model patched here is unpatched)."""
    folder = Path(path)
    saved = ilora_config_from_peft(load_peft_config(folder))
    patched_here = not ilora_layers(model)
    if patched_here:
        apply_ilora(model, saved)
    try:
        check_same_config(get_ilora_config(model), saved, folder / CONFIG_NAME, reader="load_peft_adapter")
        tensors = _load_safetensors(folder, "load_peft_adapter")
        named = {_module_of_crab_key(key) for key in tensors}
        missing = sorted(set(ilora_layers(model)) - named)
        if missing:
            raise KeyError(f"load_peft_adapter: {folder / WEIGHTS_NAME} has no weights for {len(missing)} I-LoRA "
                           f"layer(s), e.g. {missing[:5]}")
        load_crab_state_dict(model, tensors)
    except BaseException:
        if patched_here:
            remove_ilora(model)
        raise
    return model


def _module_of_crab_key(key: str) -> str:
    """``base_model.model.<module>.lora_X.weight`` -> ``<module>``."""
    return key.removeprefix(_PEFT_PREFIX).rsplit(".", 2)[0]


def from_pretrained(model: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default",
                    is_trainable: bool = False, **kwargs: Any) -> PeftModel:
    """A ``PeftModel`` with I-LoRA layers from a folder saved by PEFT (``save_pretrained``) or by
    ``ilora_kernels.save_ilora``. ``kwargs`` go to ``PeftModel.from_pretrained`` for PEFT folders."""
    folder = Path(path)
    meta = _read_json(folder)
    config = load_peft_config(folder)
    if meta.get("format") != "ilora":
        # PEFT reads the weights file by name: refuse one that is not the weights this config was saved with
        check_weights(folder, meta, "from_pretrained", "save_as_peft")
        return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable,
                                         config=config, **kwargs)
    config.inference_mode = not is_trainable
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    state = _ilora_to_crab(_load_safetensors(folder, "from_pretrained"))
    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if adapter_name in k.split(".")]
    if unexpected or missing:
        raise KeyError(f"from_pretrained: {folder / WEIGHTS_NAME} does not fit the model: unexpected "
                       f"{unexpected[:5]}, missing {missing[:5]}")
    if not is_trainable:
        peft_model.eval()
    return peft_model


def to_peft_model(model: nn.Module, adapter_name: str = "default") -> PeftModel:
    """The ``PeftModel`` equivalent of a model patched by ``apply_ilora``: same layers, same adapter values (so the
    HF Trainer writes adapter-only checkpoints, which it does only for PEFT models). ``model`` itself is unpatched
    and becomes the PeftModel's base model; if the conversion fails it is left patched as it was."""
    config = peft_config_from_ilora(get_ilora_config(model))
    state = {key: value.clone() for key, value in export_crab_state_dict(model, prefix=_PEFT_PREFIX).items()}
    training = model.training
    remove_ilora(model)
    try:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
        missing = [k for k in (getattr(result, "missing_keys", []) or []) if adapter_name in k.split(".")]
        if result.unexpected_keys or missing:
            raise RuntimeError(f"to_peft_model: the adapter does not map onto the PEFT layers: unexpected "
                               f"{list(result.unexpected_keys)[:5]}, missing {missing[:5]}")
    except BaseException:
        if hasattr(model, "peft_config") or any(isinstance(m, ILoRAPeftLinear) for m in model.modules()):
            raise  # PEFT changed the model in a way we cannot undo here; its own error says more
        apply_ilora(model, ilora_config_from_peft(config))
        load_crab_state_dict(model, state)
        raise
    peft_model.train(training)
    return peft_model
