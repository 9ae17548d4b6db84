"""Kernel, layer and training-step benchmarks of ilora_kernels (``python -m benchmarks.run --suite cpu|gpu``)."""
