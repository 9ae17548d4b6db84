"""Environment report: ``python -m ilora_kernels.env`` prints versions, which backends work (and why not), what
``backend="auto"`` picks, and the ``ILORA_*`` settings in force."""

from __future__ import annotations

import platform


def report() -> str:
    import torch

    from . import __version__, _extension, settings
    from .ops.registry import available_backends, resolve_backend

    lines = [f"ilora_kernels {__version__}", f"python {platform.python_version()} ({platform.machine()})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        lines.append("device: no CUDA device visible")
    if _extension.load():
        from . import _C
        lines.append(f"extension ilora_kernels._C: built for torch {_C.torch_version()}, "
                     f"CUDA kernels {'compiled in' if _C.with_cuda() else 'not compiled'}")
    lines.append("backends:")
    for name, reason in available_backends().items():
        lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    lines.append('backend="auto" picks:')
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        picks = []
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            probe = torch.empty(0, dtype=dtype, device=device)
            picks.append(f"{str(dtype).split('.')[1]} -> {resolve_backend('auto', probe)}")
        lines.append(f"  {device:<10} {', '.join(picks)}")
    lines.append("settings:")
    lines.extend(f"  {line}" for line in settings.describe())
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
