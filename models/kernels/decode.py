"""CPU kernels for decode-sized forwards (decode.cpp), compiled on first use and cached.

Decode multiplies a few token rows by every weight matrix. torch's CPU GEMM reaches about half the
machine's read bandwidth there, and for small models the ~20 operators Python dispatches per layer
cost more than the arithmetic. So `Linear` sends such inputs to `small_batch_linear`, and a decoder
layer runs as two fused calls around attention (`attention_input`, `attention_output`)."""
from __future__ import annotations

import os
import warnings
from functools import cache
from types import ModuleType

import torch

from models.kernels import build

# Up to this many token rows the weight-streaming kernel beats torch's GEMM on the CPU
MAX_ROWS = 32


@cache
def kernel() -> ModuleType | None:
    """The compiled module, or None (with one warning) when it cannot be built here."""
    if os.environ.get("GORGON_DISABLE_CPU_KERNELS"):
        return None
    try:
        return build("gorgon_cpu_decode", "decode.cpp", python_module=True)
    except Exception as e:  # no compiler, no headers, ...: fall back to torch's operators
        warnings.warn(f"gorgon: CPU decode kernels unavailable, using torch's operators ({e})")
        return None


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """May the kernels compute with input x (its rows are tokens) and weights of this dtype?"""
    return (x.is_cpu and not torch.is_grad_enabled() and weight.dtype in (torch.float32, torch.bfloat16)
            and x.numel() <= MAX_ROWS * x.shape[-1] and kernel() is not None)
