"""CPU kernels for decode-sized forwards (decode.cpp), compiled on first use and cached.

Decode multiplies a few token rows by every weight matrix. torch's CPU GEMM reaches about half the
machine's read bandwidth there, and for small models the ~20 operators Python dispatches per layer
cost more than the arithmetic. So `Linear` sends such inputs to `small_batch_linear`, and a decoder
layer runs as two fused calls around attention (`attention_input`, `attention_output`).

Whether a model uses them is decided once, when the engine loads it (`load_decode_kernels` and
`set_decode_kernels`): a layer holds a `DecodeKernels` or None, and None (the default, so training and
CUDA) means torch's operators."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import torch
from torch import nn

from models.kernels import build

# Up to this many token rows the weight-streaming kernel beats torch's GEMM on any CPU, for any weights
MAX_ROWS = 32
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@cache
def compiled() -> ModuleType | None:
    """The compiled module, or None (with one warning) when it cannot be built here."""
    try:
        return build("gorgon_cpu_decode", "decode.cpp", python_module=True)
    except Exception as e:  # no compiler, no headers, ...: torch's operators do the work
        warnings.warn(f"gorgon: CPU decode kernels unavailable, using torch's operators ({e})", stacklevel=2)
        return None


@dataclass(frozen=True)
class DecodeKernels:
    """The compiled kernels, for inference inputs of at most max_rows token rows (None: any number, so that
    every row is computed by the same code in the same order whatever the batch: batch invariance).
    Invariant: only handed to the layers of a CPU model in inference (their forward has no autograd)."""

    ops: ModuleType
    max_rows: int | None = MAX_ROWS

    def takes(self, x: torch.Tensor) -> bool:
        return self.max_rows is None or x.numel() <= self.max_rows * x.shape[-1]


def load_decode_kernels(model: nn.Module, batch_invariant: bool = False) -> DecodeKernels | None:
    """The kernels for this inference model: None where they cannot be built, or where the model is not on
    the CPU or has weights of another dtype. They take inputs of any size with batch_invariant, and where
    they beat torch's GEMM at every size with the same accuracy: fp32 weights on AVX-512 VNNI CPUs (a
    512-token prefill of SmolLM2 in 0.41x the time, of a 1.1B shape in 0.68x). Not bf16 weights, where
    torch's AVX512-BF16 GEMM is faster at large shapes (the kernels took 1.44x the time), nor quantized
    ones, faster too (0.74x to 0.87x the time) but with int8 activations where torch's tiles keep bf16."""
    weights = {p.dtype for p in model.parameters()}
    if not (weights <= set(WEIGHT_DTYPES) and next(model.parameters()).is_cpu):
        return None
    ops = compiled()
    if ops is None:
        return None
    quantized = any(b.dtype == torch.uint8 for b in model.buffers())
    any_size = batch_invariant or (ops.isa() == "avx512" and weights == {torch.float32} and not quantized)
    return DecodeKernels(ops, None if any_size else MAX_ROWS)


def set_decode_kernels(model: nn.Module, kernels: DecodeKernels | None) -> None:
    """Hand `kernels` to every layer of `model` that can use them (None: torch's operators everywhere)."""
    for module in model.modules():
        if hasattr(module, "kernels"):
            module.kernels = kernels
