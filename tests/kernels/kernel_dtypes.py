"""The floating-point dtypes the kernel tests run in, shared by the test files of this folder."""

import torch

# bf16 only on a GPU: the Triton interpreter cannot run bf16 on the CPU.
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# bf16 keeps 8 significand bits (2^-9 ~ 2e-3 relative rounding per element, 8x fp16's 2^-12): a file's bf16
# tolerance is its fp16 one times this (the same error argument with coarser rounding).
BF16_OVER_FP16 = 8.0
