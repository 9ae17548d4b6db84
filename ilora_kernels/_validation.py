"""Input checks: the tensors of every ``ilora_linear`` call (errors name the offending tensor and both shapes), and
the I-LoRA hyperparameters of every config and module."""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Optional

import torch

from .ops import registry

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT32_MAX = torch.finfo(torch.float32).max   # every kernel applies scaling as a float32


def float32_masters(base_dtype: torch.dtype, adapter) -> bool:
    """Whether the adapter tensors are float32 master weights on a float16 / bfloat16 base: the one dtype mix
    ``ilora_linear`` accepts (it casts them to the base's dtype); all of them float32, not some."""
    return base_dtype in HALF_DTYPES and all(t.dtype == torch.float32 for t in adapter)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_float(value, divisor=1) -> float:
    """``value / divisor`` as a float for an int or float ``value``; +-inf where that overflows (a huge int)."""
    try:
        return float(value) / divisor
    except OverflowError:
        return math.inf if value > 0 else -math.inf


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel, for a warning raised by this module's caller, of the nearest frame outside
    ilora_kernels and outside generated dataclass ``__init__`` code: the user's line, however deep the call."""
    frame, level = sys._getframe(2), 2
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or (frame.f_code.co_filename == "<string>" and frame.f_code.co_name == "__init__")):
        frame, level = frame.f_back, level + 1
    return level


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _is_dtensor(t: torch.Tensor) -> bool:
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _require_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if _is_dtensor(t):
        raise TypeError(f"{name} is a DTensor (placements {t.placements}); ilora_linear has no sharding rules and "
                        f"takes plain tensors: pass {name}.to_local() (this rank's shard) or {name}.full_tensor() "
                        f"(the whole tensor), or shard the model with FSDP, which hands the layer plain tensors")


def _require_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {_shape(t)}")


def validate_ilora_inputs(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, top_k) -> Optional[int]:
    """Checks the arguments of ``ilora_linear`` (plain tensors, not DTensors; |scaling| within float32); returns
    top_k normalised (0 = dense routing)."""
    for name, t in (("x", x), ("weight", weight), ("router_weight", router_weight), ("lora_a", lora_a),
                    ("lora_b", lora_b)):
        _require_tensor(name, t)
    if bias is not None:
        _require_tensor("bias", bias)

    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension (..., d_in), got shape {_shape(x)}")
    _require_ndim("weight", weight, 2, "(d_out, d_in)")
    _require_ndim("router_weight", router_weight, 2, "(K, d_in)")
    _require_ndim("lora_a", lora_a, 2, "(r, d_in)")
    _require_ndim("lora_b", lora_b, 3, "(K, d_out, r)")

    d_out, d_in = weight.shape
    num_heads, rank = router_weight.shape[0], lora_a.shape[0]
    if x.shape[-1] != d_in:
        raise ValueError(f"x has shape {_shape(x)} (last dim {x.shape[-1]}) but weight has shape {_shape(weight)} "
                         f"(d_in = {d_in})")
    if d_in < 1:
        raise ValueError(f"x has shape {_shape(x)} and weight has shape {_shape(weight)}: d_in must be >= 1 (an "
                         f"adapter over zero features has no router logits)")
    if router_weight.shape[1] != d_in:
        raise ValueError(f"router_weight has shape {_shape(router_weight)} but weight has shape {_shape(weight)}: "
                         f"expected (K, {d_in})")
    if lora_a.shape[1] != d_in:
        raise ValueError(f"lora_a has shape {_shape(lora_a)} but weight has shape {_shape(weight)}: "
                         f"expected (r, {d_in})")
    if num_heads < 1:
        raise ValueError(f"router_weight has shape {_shape(router_weight)}: K must be >= 1")
    if rank < 1:
        raise ValueError(f"lora_a has shape {_shape(lora_a)}: r must be >= 1")
    if tuple(lora_b.shape) != (num_heads, d_out, rank):
        raise ValueError(f"lora_b has shape {_shape(lora_b)} but router_weight {_shape(router_weight)}, weight "
                         f"{_shape(weight)} and lora_a {_shape(lora_a)} require (K, d_out, r) = "
                         f"({num_heads}, {d_out}, {rank})")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias has shape {_shape(bias)} but weight has shape {_shape(weight)}: expected ({d_out},)")

    named = [("x", x), ("weight", weight), ("router_weight", router_weight), ("lora_a", lora_a), ("lora_b", lora_b)]
    if bias is not None:
        named.append(("bias", bias))
    adapter = named[2:5]
    half_base = x.dtype in HALF_DTYPES and weight.dtype == x.dtype
    masters = [name for name, t in adapter if half_base and t.dtype == torch.float32]
    for name, t in named:
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; ilora_linear needs float16, bfloat16, float32 or float64")
        if t.dtype != x.dtype and name not in masters:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; all tensors must share one dtype, "
                            f"with one exception (mixed precision): router_weight, lora_a and lora_b may all be "
                            f"float32 when x and weight are float16 or bfloat16. Either keep the adapter in float32 on "
                            f"a half-precision base, or run under torch.autocast, which casts every tensor to its "
                            f"dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")
    if 0 < len(masters) < 3:
        rest = [name for name, _ in adapter if name not in masters]
        raise TypeError(f"{' and '.join(masters)} {'is' if len(masters) == 1 else 'are'} float32 but "
                        f"{' and '.join(rest)} {'has' if len(rest) == 1 else 'have'} dtype {x.dtype}: float32 master "
                        f"weights on a {x.dtype} base must be all three of router_weight, lora_a and lora_b (or "
                        f"none of them)")

    if not _is_number(scaling) or (isinstance(scaling, float) and not math.isfinite(scaling)):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    if not abs(_as_float(scaling)) <= _FLOAT32_MAX:
        raise ValueError(f"scaling = {_as_float(scaling):g} is beyond the float32 range the kernels apply it in "
                         f"(|scaling| <= {_FLOAT32_MAX:g})")
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if top_k is None:
        return 0
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not (1 <= top_k <= num_heads):
        raise ValueError(f"top_k must be None or an int in [1, K = {num_heads}] (router_weight shape "
                         f"{_shape(router_weight)}), got {top_k!r}")
    return 0 if top_k == num_heads else top_k


# ---------------------------------------------------------------------------------------------------------------
# hyperparameters: the one validator of ILoRAConfig, ILoRALinear, ILoRAPeftConfig and the trainer's config


def validate_hyperparameters(*, r, num_heads, alpha, dropout, top_k=None, backend="auto", prefix="", names=None,
                             none_word="None", error=ValueError) -> None:
    """Checks one set of I-LoRA hyperparameters: r and num_heads positive ints, alpha a finite number with
    alpha / r within float32, dropout in [0, 1), top_k None or an int in [1, num_heads], backend "auto" or a
    registered backend name. Bools are refused where numbers are expected. Warns (UserWarning) for top_k = 1 with
    num_heads > 1, which leaves the router untrained.

    Messages name the argument as the caller's user wrote it: ``prefix`` + ``names.get(argument, argument)``
    (``prefix="ILoRAPeftConfig.", names={"num_heads": "ilora_num_heads"}``); ``none_word`` spells None (``null``
    for YAML configs); ``error`` is the exception class raised (``ValueError`` or a subclass)."""
    names = dict(names or {})

    def name(arg: str) -> str:
        return prefix + names.get(arg, arg)

    for arg, value in (("r", r), ("num_heads", num_heads)):
        if not _is_int(value) or value <= 0:
            raise error(f"{name(arg)} must be a positive int, got {value!r}")
    if not _is_number(alpha) or (isinstance(alpha, float) and not math.isfinite(alpha)):
        raise error(f"{name('alpha')} must be a finite number, got {alpha!r}")
    if not abs(_as_float(alpha, r)) <= _FLOAT32_MAX:
        raise error(f"{name('alpha')} = {_as_float(alpha):g} gives scaling = alpha / r = {_as_float(alpha, r):g}, "
                    f"beyond the float32 range the kernels apply it in (|alpha / r| <= {_FLOAT32_MAX:g})")
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise error(f"{name('dropout')} must be in [0, 1), got {dropout!r}")
    if top_k is not None:
        if not _is_int(top_k):
            raise error(f"{name('top_k')} must be {none_word} or an int, got {top_k!r}")
        if not 1 <= top_k <= num_heads:
            raise error(f"{name('top_k')} must be {none_word} or in [1, {name('num_heads')}={num_heads}], "
                        f"got {top_k!r}")
    if not isinstance(backend, str) or backend not in ("auto",) + registry.BACKENDS:
        raise error(f"{name('backend')} must be one of {('auto',) + registry.BACKENDS}, got {backend!r}")
    if top_k == 1 and num_heads > 1:
        warnings.warn(f"{name('top_k')}=1 with {name('num_heads')}={num_heads}: the router will not train (the "
                      f"softmax over the one kept logit is 1, so router_weight gets an exactly zero gradient); use "
                      f"top_k >= 2 or dense routing ({name('top_k')}={none_word})", UserWarning,
                      stacklevel=_user_stacklevel())
