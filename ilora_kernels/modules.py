"""``ILoRALinear``: a drop-in I-LoRA layer around an existing, frozen ``nn.Linear``."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ._validation import HALF_DTYPES, validate_hyperparameters
from .functional import ilora_linear
from .ops.contract import router_dtype
from .ops.layout import heads_packed, new_packed_parameters, repack_


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of the adapter parameters on a base layer of ``base_dtype``: float32 for a float16 / bfloat16 base
    when ``autocast_adapter_dtype`` (PEFT's default and name), else the base's."""
    return torch.float32 if autocast_adapter_dtype and base_dtype in HALF_DTYPES else base_dtype


class ILoRALinear(nn.Module):
    """y = base_layer(x) + scaling * sum_k g_k(x) B_k A dropout(x), g = softmax(router_weight x).

    Shares ``base_layer``'s weight (never copies it) and freezes it. Parameters: router_weight (K, d_in),
    lora_a (r, d_in), lora_b (K, d_out, r): float32 master weights on a float16 / bfloat16 base layer (PEFT's
    ``autocast_adapter_dtype=True``; ``ilora_linear`` computes in the base's dtype), the base's dtype otherwise or
    with ``autocast_adapter_dtype=False``. Freshly built, the layer equals its base layer (every B_k = 0).
    ``scaling = alpha / r``; ``dropout`` applies to the adapter input in training mode only; ``top_k`` (None =
    dense) keeps the top_k router logits per token; ``backend`` is passed to ``ilora_linear``.
    ``disable_adapter = True`` makes the layer exactly its base layer.
    """

    base_layer: nn.Linear
    router_weight: nn.Parameter
    lora_a: nn.Parameter
    lora_b: nn.Parameter

    def __init__(self, base_linear: nn.Linear, r: int = 128, num_heads: int = 3, alpha: float = 256.0,
                 dropout: float = 0.1, top_k: Optional[int] = None, backend: str = "auto",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        if not isinstance(base_linear, nn.Linear):
            raise TypeError(f"ILoRALinear wraps an nn.Linear, got {type(base_linear).__name__}")
        validate_hyperparameters(r=r, num_heads=num_heads, alpha=alpha, dropout=dropout, top_k=top_k, backend=backend)
        self.base_layer = base_linear
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_linear.in_features, base_linear.out_features
        self.r, self.num_heads, self.alpha, self.dropout = r, num_heads, float(alpha), float(dropout)
        self.top_k, self.backend = top_k, backend
        self.scaling = self.alpha / r
        self.disable_adapter = False
        if not isinstance(autocast_adapter_dtype, bool):
            raise TypeError(f"autocast_adapter_dtype must be a bool, got {autocast_adapter_dtype!r}")
        self.autocast_adapter_dtype = autocast_adapter_dtype
        factory = {"device": base_linear.weight.device,
                   "dtype": adapter_dtype(base_linear.weight.dtype, autocast_adapter_dtype)}
        self.router_weight, self.lora_a, self.lora_b = new_packed_parameters(
            num_heads, r, self.in_features, self.out_features, **factory)
        self.reset_parameters()
        self.packed_heads = True
        self._engine_checked = False
        self.register_load_state_dict_post_hook(_repack_after_load)

    def set_packed_heads(self, packed: bool) -> None:
        """Keeps lora_b in the packed layout (True, the default: B_cat is a view) or contiguous (False: every call
        then copies B_cat, as for any unpacked tensor). Take False before handing a model to FSDP: FSDP2
        (``fully_shard``) refuses non-contiguous parameters, and FSDP1 (``FullyShardedDataParallel``) keeps them but
        restored their optimizer state wrongly on resume in our tests. DeepSpeed and DDP need nothing (DeepSpeed
        moves every parameter into its own contiguous buffer). ``ilora_kernels.patching.set_packed_heads(model,
        False)`` does it for every layer; the Crab+ trainer does it under FSDP."""
        self.packed_heads = bool(packed)
        repack_(self.router_weight, self.lora_a, self.lora_b, heads=self.packed_heads)

    def _apply(self, fn, recurse=True):
        # Module.to() / .half() / .cuda() give every parameter its own new allocation: put them back in the
        # packed layout
        module = super()._apply(fn, recurse)
        repack_(self.router_weight, self.lora_a, self.lora_b, heads=self.packed_heads)
        return module

    def __setstate__(self, state):
        # copy.deepcopy and unpickling clone every parameter on its own
        super().__setstate__(state)
        if "_parameters" in state:
            repack_(self.router_weight, self.lora_a, self.lora_b, heads=getattr(self, "packed_heads", True))

    def reset_parameters(self) -> None:
        """Crab+ initialisation: A and W_r kaiming_uniform(a=sqrt(5)), every B_k zero."""
        nn.init.kaiming_uniform_(self.router_weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor,
                return_router_weights: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """x (..., d_in) -> y (..., d_out); with return_router_weights also g (..., K) float32 (float64 for
        float64 inputs)."""
        if self.training and not self._engine_checked and not torch.compiler.is_compiling():
            self._engine_checked = True
            _warn_if_strided_in_foreign_buffer(self.lora_b)
        if self.disable_adapter:
            y = self.base_layer(x)
            if return_router_weights:
                return y, x.new_zeros(*x.shape[:-1], self.num_heads, dtype=router_dtype(x.dtype))
            return y
        return ilora_linear(x, self.base_layer.weight, self.base_layer.bias, self.router_weight, self.lora_a,
                            self.lora_b, self.scaling, dropout_p=self.dropout, training=self.training,
                            top_k=self.top_k, backend=self.backend, return_router_weights=return_router_weights)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"num_heads={self.num_heads}, alpha={self.alpha:g}, dropout={self.dropout:g}, top_k={self.top_k}, "
                f"backend={self.backend!r}, adapter_dtype={str(self.lora_a.dtype).split('.')[-1]}")


def _repack_after_load(module: "ILoRALinear", incompatible_keys) -> None:
    """``load_state_dict(assign=True)`` replaces the parameters by the loaded tensors: repack them."""
    repack_(module.router_weight, module.lora_a, module.lora_b, heads=module.packed_heads)


def _warn_if_strided_in_foreign_buffer(lora_b: torch.Tensor) -> None:
    """A packed (strided) lora_b that no longer owns its storage lives in an engine's flat buffer with its strides
    kept (FSDP1, which hands the layer views of its flat parameter in the forward); with ``use_orig_params=True``
    we found its resume of such a parameter's optimizer state wrong."""
    if (not lora_b.is_contiguous() and heads_packed(lora_b)
            and lora_b.untyped_storage().nbytes() > lora_b.numel() * lora_b.element_size()):
        warnings.warn("ILoRALinear: lora_b is a non-contiguous tensor inside another module's flat buffer "
                      "(FSDP1?). FSDP1 with use_orig_params=True restores the optimizer state of non-contiguous "
                      "parameters wrongly when resuming from a checkpoint: call "
                      "ilora_kernels.patching.set_packed_heads(model, False) before wrapping the model",
                      RuntimeWarning, stacklevel=3)
