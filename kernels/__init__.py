"""vpd_kernels: fused distillation losses (log-softmax + divergence + trust region) for PyTorch."""
