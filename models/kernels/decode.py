"""CPU kernels for decode-sized forwards (decode.cpp), compiled on first use and cached.

Decode multiplies a few token rows by every weight matrix. torch's CPU GEMM reaches about half the
machine's read bandwidth there, and for small models the ~20 operators Python dispatches per layer
cost more than the arithmetic. So `Linear` sends such inputs to `small_batch_linear`, and a decoder
layer runs as two fused calls around attention (`attention_input`, `attention_output`).

Whether a model uses them is decided once, when the engine loads it (`load_decode_kernels` and
`set_decode_kernels`): a layer holds a `DecodeKernels` or None, and None (the default, so training and
CUDA) means torch's operators."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import torch
from torch import nn

from models.kernels import build

logger = logging.getLogger("gorgon")
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


def load_decode_kernels(model: nn.Module, batch_invariant: bool | None = None) -> DecodeKernels | None:
    """The kernels for this inference model: None where they cannot be built, or where the model is not on
    the CPU or has weights of another dtype. They take inputs of any size when batch_invariant (None: where
    that was measured to cost at most 5%, `invariance_is_cheap`), else where they beat torch's GEMM at
    every size with the same accuracy: fp32 and fp16 weights on AVX-512 VNNI CPUs (a 512-token prefill of
    SmolLM2 in 0.41x the time, of a 1.1B shape in 0.68x; of the default model in fp16 in 0.19x)."""
    weights = {p.dtype for p in model.parameters()}
    if not (weights <= set(WEIGHT_DTYPES) and next(model.parameters()).is_cpu):
        return None
    ops = compiled()
    if ops is None:
        return None
    quantized = any(b.dtype == torch.uint8 for b in model.buffers())
    if batch_invariant is None:
        matmul_types = {int(m.qtype) for m in model.modules() if hasattr(m, "qtype") and hasattr(m, "kernels")}
        batch_invariant = invariance_is_cheap(ops, weights, matmul_types)
    exact_widening = weights <= {torch.float32, torch.float16} and not quantized
    any_size = batch_invariant or (ops.isa() == "avx512" and exact_widening)
    return DecodeKernels(ops, None if any_size else MAX_ROWS)


def invariance_is_cheap(ops: ModuleType, weights: set[torch.dtype], matmul_types: set[int]) -> bool:
    """Does batch invariance (the kernels at every size) cost at most 5% here, as measured (`gorgon bench
    invariance`, README)? weights: the model's float dtypes; matmul_types: the ggml types of its linears (a
    float one's: 0). On AVX-512 VNNI CPUs, with AVX512-BF16 for bf16 weights: yes, at every precision (invariant /
    plain time at most 1.03 at 1 and 2 threads). On CPUs with AMX, whose tiles make torch's large GEMMs faster:
    for bf16 models, whose kernels then run on tiles too (2 threads, prefill 512 / decode batch 1 / batch 8:
    SmolLM2 BF16 0.99 / 0.98 / 0.85, Qwen2.5-Coder-1.5B BF16 0.96 / 1.02 / 0.99), and for fp32 models quantized
    throughout in formats with packed kernels, whose AMX-INT8 tiles lose to torch only on long prompts (a chat
    request of 200 prompt tokens and 128 new: SmolLM2 Q4_1 0.88, Q8_0 0.90, Qwen2.5-Coder-1.5B Q4_K_M (48 new)
    0.83; prefill 512 alone 1.05-1.10, 1000 tokens and 16 new 1.12). On AVX2-only CPUs only where every linear has
    packed quantized kernels, which beat dequantizing to fp32 for torch's GEMM (a Zen 3, 1 thread, SmolLM2
    prefill of 512 tokens: Q4_1 in 0.64x the time, Q8_0 0.76x; decode batch 1 1.02x / 0.97x, batch 8 0.83x /
    0.88x), and fp32 weights do not (prefill 1.36x)."""
    packed = bool(matmul_types) and all(ops.packable(t) for t in matmul_types)
    if ops.isa() == "avx2":
        return packed
    if ops.isa() != "avx512":
        return False
    if torch.cpu._is_amx_tile_supported():
        bf16_tiles = weights == {torch.bfloat16} and matmul_types <= {0}
        return (bf16_tiles or (packed and weights == {torch.float32})) and ops.amx()
    return torch.bfloat16 not in weights or torch.cpu._is_avx512_bf16_supported()


@cache
def bf16_gemm() -> bool:
    """Does this CPU multiply bf16 matrices natively (AVX512-BF16 or AMX)?"""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def set_decode_kernels(model: nn.Module, kernels: DecodeKernels | None, spare_bytes: int | None = None) -> None:
    """Hand `kernels` to every layer of `model` that can use them (None: torch's operators everywhere). Each linear
    also lays its weights out for them (`pack`: a second copy, which decode streams 1.1-1.5x faster than the
    checkpoint's layout) while the copies fit in `spare_bytes` (None: no limit); those beyond read their weights as
    they are, and a warning says how many: a model of half the host's memory still loads. Where the kernels take
    every forward (`max_rows` None), a quantized linear then frees its file layout (`release_blocks`), but for the LM
    head, whose rows Medusa's drafts read in the file's blocks (MedusaHeads.draft_weights)."""
    unpacked = []
    head = getattr(model, "lm_head", None)
    for module in model.modules():
        if not hasattr(module, "kernels"):
            continue
        module.kernels = kernels
        if kernels is None or not hasattr(module, "pack"):
            continue
        size = module.weight.numel() * module.weight.element_size()
        if spare_bytes is not None and size > spare_bytes:
            unpacked.append(size)
            continue
        module.pack()
        # (a copy: as many bytes as the weights, counted even where the blocks are freed below: a matrix stored
        # alone is a view of the file's map, whose pages stay cached, and the packed copy is new memory)
        if spare_bytes is not None and module.packed is not None:
            spare_bytes -= size
        if kernels.max_rows is None and module is not head and hasattr(module, "release_blocks"):
            module.release_blocks()
    if unpacked:
        logger.warning("not enough free memory to lay out the weights of %d linears (%.2f GiB) for the decode kernels: "
                       "they read them in the checkpoint's layout, at up to 1.5x the time", len(unpacked),
                       sum(unpacked) / 2**30)
