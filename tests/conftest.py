"""Test-wide setup.

Triton kernels run under the interpreter on machines without a GPU; the variable must be set before any
`@triton.jit` decorator executes, so it is set here, before the tests import megasynth.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Deterministic, quiet CPU runs.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
