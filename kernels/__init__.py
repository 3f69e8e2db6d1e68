"""Triton kernels beside their PyTorch references; import as `megasynth.kernels`."""
