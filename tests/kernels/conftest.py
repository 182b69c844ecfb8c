"""Kernel tests: on machines without CUDA, Triton kernels run in the interpreter.

TRITON_INTERPRET is read when a `@triton.jit` kernel is defined, so it must be set before any
`tokensel.kernels.*` Triton module is imported; pytest imports this file before the test modules beside it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
