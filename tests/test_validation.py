"""Bad input raises a clear exception that names the offending tensor and its shape."""

import pytest
import torch

import ilora_kernels as ik
from ilora_float64 import make_inputs


def _args(**override):
    x, w, b, wr, a, bb = make_inputs(4, 6, 5, 2, 3)
    args = dict(x=x, weight=w, bias=b, router_weight=wr, lora_a=a, lora_b=bb, scaling=2.0)
    args.update(override)
    return args


@pytest.mark.parametrize("override,error,pattern", [
    (dict(x=torch.randn(4, 7)), ValueError, r"x has shape \(4, 7\).*weight has shape \(5, 6\)"),
    (dict(weight=torch.randn(5, 6, 1)), ValueError, r"weight must be 2-D.*\(5, 6, 1\)"),
    (dict(router_weight=torch.randn(2, 7)), ValueError, r"router_weight has shape \(2, 7\).*\(K, 6\)"),
    (dict(lora_a=torch.randn(3, 5)), ValueError, r"lora_a has shape \(3, 5\).*\(r, 6\)"),
    (dict(lora_b=torch.randn(2, 5, 4)), ValueError, r"lora_b has shape \(2, 5, 4\).*\(2, 5, 3\)"),
    (dict(lora_b=torch.randn(3, 5, 3)), ValueError, r"lora_b has shape \(3, 5, 3\)"),
    (dict(lora_b=torch.randn(2, 5)), ValueError, r"lora_b must be 3-D"),
    (dict(bias=torch.randn(4)), ValueError, r"bias has shape \(4,\).*\(5,\)"),
    (dict(x=torch.randn(4, 6, dtype=torch.float64)), TypeError, r"weight has dtype torch.float32 but x has dtype "
                                                                r"torch.float64"),
    (dict(lora_a=torch.randn(3, 6, dtype=torch.float16)), TypeError, r"lora_a has dtype torch.float16"),
    (dict(x=torch.randint(0, 3, (4, 6))), TypeError, r"x has dtype torch.int64"),
    (dict(lora_b=torch.randn(2, 5, 3, device="meta")), ValueError, r"lora_b is on meta but x is on cpu"),
    (dict(x=[1.0, 2.0]), TypeError, r"x must be a torch.Tensor"),
    (dict(scaling=float("nan")), ValueError, r"scaling must be a finite number"),
])
def test_bad_input_is_named(override, error, pattern):
    with pytest.raises(error, match=pattern):
        ik.ilora_linear(**_args(**override), backend="reference")


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=-0.1), r"dropout_p must be in \[0, 1\)"),
    (dict(top_k=3), r"top_k must be None or an int in \[1, K = 2\]"),
    (dict(top_k=0), r"top_k must be None"),
    (dict(backend="fast"), r"backend must be one of"),
])
def test_bad_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ik.ilora_linear(**_args(), **kwargs)


def test_unavailable_backend_says_why():
    report = ik.available_backends()
    assert report["reference"] is None
    for name, reason in report.items():
        if reason is not None:
            assert isinstance(reason, str) and reason
            with pytest.raises((RuntimeError, ValueError)):
                ik.ilora_linear(**_args(), backend=name)


def test_config_rejects_bad_hyperparameters():
    for kwargs in (dict(r=0), dict(r=-3), dict(num_heads=0), dict(dropout=1.0), dict(dropout=-0.5),
                   dict(target_modules=()), dict(top_k=4), dict(alpha=float("inf"))):
        with pytest.raises(ValueError):
            ik.ILoRAConfig(**kwargs)
    cfg = ik.ILoRAConfig()
    assert (cfg.r, cfg.num_heads, cfg.alpha, cfg.dropout, cfg.scaling) == (128, 3, 256.0, 0.1, 2.0)
    assert cfg.target_modules == ik.CRAB_PLUS_TARGETS
