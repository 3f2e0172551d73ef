"""Quantized weights: ggml's block formats (what GGUF files hold) kept as raw bytes, and the layers that
compute with them without ever holding a full-precision copy of the matrix.

Types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS (F32 / F16 / BF16 tensors
simply become torch tensors). The 1- to 3-bit IQ and ternary types have no kernels here: their blocks are read, and
dequantized as the model loads (models.loader: into fp16 under fp32 activations), as transformers loads GGUF files.

Load-time quantization of HF checkpoints reuses two of these layouts, so one set of kernels serves both: `int8`
is Q8_0 (a scale per 32 weights of a row: finer than the per-row scale it stands for, for 6% more bytes) and
`int4` is Q4_1 (groups of 32 with a scale and a minimum).

A few token rows (decode) go to the C++ kernels (models/kernels/quant.h: fused dequantize-and-dot); so do
more (prefill) when the engine is batch invariant (its default where that is cheap), else they dequantize a
tile of weight rows at a time and run torch's GEMM."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from torch import nn

from models.kernels import decode as cpu_decode
from models.layers import tiled_matmul

QType = GGMLQuantizationType
QUANTIZED_TYPES = (QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q2_K, QType.Q3_K, QType.Q4_K,
                   QType.Q5_K, QType.Q6_K, QType.IQ4_NL, QType.IQ4_XS)
# types the gguf package dequantizes and gorgon's kernels do not run: llama-quantize's 1- to 3-bit IQ types (IQ2_M and
# IQ3_M files mix them with the types above) and the ternary ones of BitNet-style models
DEQUANTIZED_TYPES = (QType.IQ1_S, QType.IQ1_M, QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ3_XXS, QType.IQ3_S,
                     QType.TQ1_0, QType.TQ2_0)
FLOAT_TYPES = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}
LOAD_TIME_QUANTIZATIONS = {"int8": QType.Q8_0, "int4": QType.Q4_1}
# weight rows dequantized at a time by the prefill path: 4 MiB of fp32 per tile at most
TILE_ELEMENTS = 1 << 20


class UnsupportedTensorType(ValueError):
    pass


def row_bytes(qtype: QType, in_features: int) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    if in_features % block:
        raise ValueError(f"{qtype.name} rows hold multiples of {block} weights, not {in_features}")
    return in_features // block * type_size


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight matrix [out_features, in_features] in ggml blocks. Invariant: data is uint8
    [out_features, row_bytes(qtype, in_features)], each row the blocks of one output feature; qtype is one of
    QUANTIZED_TYPES (has_kernels) or DEQUANTIZED_TYPES."""

    qtype: QType
    shape: tuple[int, int]
    data: torch.Tensor

    def __post_init__(self) -> None:
        if self.qtype not in (*QUANTIZED_TYPES, *DEQUANTIZED_TYPES):
            raise UnsupportedTensorType(f"unsupported quantized tensor type {self.qtype.name}; gorgon reads "
                                        f"{', '.join(t.name for t in (*QUANTIZED_TYPES, *DEQUANTIZED_TYPES))}")
        expected = (self.shape[0], row_bytes(self.qtype, self.shape[1]))
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != expected:
            raise ValueError(f"{self.qtype.name} weight of shape {self.shape} needs uint8 data {expected}, "
                             f"got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def has_kernels(self) -> bool:
        """Do gorgon's kernels run this type? (Else the model loads it dequantized.)"""
        return self.qtype in QUANTIZED_TYPES

    def rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The rows `index` (a row permutation or a lookup): whole rows of blocks, so nothing is dequantized."""
        return QuantizedWeight(self.qtype, (len(index), self.shape[1]), self.data[index])

    def dequantize(self) -> torch.Tensor:
        """fp32 [out, in] by the gguf package's numpy code: the oracle the kernels are tested against."""
        return torch.from_numpy(gguf_dequantize(self.data.numpy(), self.qtype).copy())


def quantize(weight: torch.Tensor, qtype: QType) -> QuantizedWeight:
    """A float matrix in ggml blocks (by the gguf package: Q8_0, Q4_0 and Q4_1)."""
    data = gguf_quantize(weight.detach().float().numpy(), qtype)
    return QuantizedWeight(qtype, tuple(weight.shape), torch.from_numpy(np.ascontiguousarray(data)))


def kernel_type(qtype: QType | int) -> QType:
    """qtype, checked to be one gorgon's kernels run (the layers' invariant)."""
    qtype = QType(qtype)
    if qtype not in QUANTIZED_TYPES:
        raise UnsupportedTensorType(f"gorgon has no kernels for {qtype.name}: dequantize its weights instead")
    return qtype


def concat(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Row-wise concatenation (packed q/k/v or gate/up) of weights of one type; a single weight as it is (a GGUF
    file's stays a view of its memory map, whose pages the OS can drop and read again)."""
    if len(weights) == 1:
        return weights[0]
    qtypes = {w.qtype for w in weights}
    if len(qtypes) != 1:
        raise UnsupportedTensorType(f"cannot pack weights of different types ({', '.join(t.name for t in qtypes)})")
    data = torch.cat([w.data for w in weights])
    return QuantizedWeight(weights[0].qtype, (data.shape[0], weights[0].shape[1]), data)


def dequantize_rows(weight: torch.Tensor, qtype: QType, in_features: int) -> torch.Tensor:
    """fp32 rows of a uint8 block matrix: the C++ kernel, or the gguf package where it cannot be built."""
    ops = cpu_decode.compiled()
    if ops is not None:
        return ops.dequantize(weight, int(qtype), in_features)
    return torch.from_numpy(gguf_dequantize(weight.numpy(), qtype).copy())


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, qtype: QType) -> torch.Tensor:
    """x Wᵀ for W in ggml blocks (uint8 [out, row bytes]), dequantizing at most TILE_ELEMENTS weights at a time
    into x's dtype."""
    in_features = x.shape[-1]
    return tiled_matmul(x, weight.shape[0],
                        lambda begin, end: dequantize_rows(weight[begin:end], qtype, in_features).to(x.dtype),
                        TILE_ELEMENTS)


class QuantizedLinear(nn.Module):
    """y = x Wᵀ + b with W in ggml blocks. Invariant: `weight` is uint8 [out_features, row bytes] in type
    `qtype` (a buffer, never trained), or empty once its packed copy replaces it (`release_blocks`); `dtype` is
    the model's activation dtype (the bias's, and LoRA's); `kernels` (models.kernels.decode.DecodeKernels or
    None) is the load-time choice: with it, decode-sized inputs run the fused dequantize-and-dot kernel (int8
    activations), and larger ones multiply tiles of dequantized rows in bf16 where the CPU has bf16 GEMM
    (AVX512-BF16 / AMX; its error is of the same order); without it, fp32 tiles compute exactly what the
    dequantized matrix would (differentiable in x)."""

    def __init__(self, in_features: int, out_features: int, qtype: QType, bias: bool,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.qtype = kernel_type(qtype)
        self.register_buffer("weight", torch.zeros(out_features, row_bytes(self.qtype, in_features), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.kernels = None

    @property
    def kernels(self) -> cpu_decode.DecodeKernels | None:
        return self._kernels

    @kernels.setter
    def kernels(self, kernels: cpu_decode.DecodeKernels | None) -> None:
        self._kernels, self.packed = kernels, None

    def pack(self) -> None:
        """Lay the weights out for the kernels (16 rows interleaved, types with such kernels: models/kernels/quant.h
        `packable`), where the CPU runs that layout's kernels: a second copy of those weights, which decode streams
        instead of the file's (set_decode_kernels)."""
        self.packed = self.kernels.ops.repack(self.weight, int(self.qtype), self.in_features)

    def release_blocks(self) -> None:
        """Free the file's blocks once packed, for a layer whose every forward the kernels take (batch invariance):
        nothing reads them again, and the packed copy then replaces the weights in memory rather than doubling them.
        `weight` keeps its dtype and device, empty."""
        if self.packed is not None:
            self.weight = self.weight.new_empty(0)

    @property
    def kernel_weight(self) -> torch.Tensor:
        """The weights as the decode kernels read them: packed where that applies, else the file's blocks."""
        return self.weight if self.packed is None else self.packed

    @classmethod
    def from_weight(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> QuantizedLinear:
        layer = cls(weight.shape[1], weight.shape[0], weight.qtype, bias is not None, dtype)
        layer.weight = weight.data
        if bias is not None:
            layer.bias.data = bias.to(dtype)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernels is not None and self.kernels.takes(rows):
            out = self.kernels.ops.quantized_linear(rows, self.kernel_weight, int(self.qtype), self.bias)
        elif self.kernels is not None and rows.dtype == torch.float32 and cpu_decode.bf16_gemm():
            out = self.tiled(rows.bfloat16()).float()
        else:
            out = self.tiled(rows)
        return out.view(*x.shape[:-1], self.out_features)

    def tiled(self, rows: torch.Tensor) -> torch.Tensor:
        out = tiled_linear(rows, self.weight, self.qtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"


class MixedQuantizedLinear(nn.Module):
    """Packed projections (q/k/v) whose shards the file stores in different types, as Q4_K_M files keep some
    attn_v in Q6_K beside Q4_K q/k: one QuantizedLinear per run of shards of one type (`parts`, without bias),
    outputs side by side, plus `bias`. Invariant: the parts' rows, in order, are the shards' rows in order.
    The fused decoder-layer kernels take the parts as they are (models.llama.kernel_parts)."""

    def __init__(self, parts: list[QuantizedLinear], bias: torch.Tensor | None) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        self.dtype = parts[0].dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # (what LoRA reads of a base layer: the device, and that it is not float)
        return self.parts[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([part(x) for part in self.parts], dim=-1)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class QuantizedEmbedding(nn.Module):
    """Token embeddings in ggml blocks: a lookup dequantizes only the rows it reads. Invariant: `weight` is
    uint8 [num_embeddings, row bytes] in type `qtype`; `dtype` is the model's activation dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: QType, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.qtype, self.dtype = kernel_type(qtype), dtype
        self.register_buffer("weight", torch.zeros(num_embeddings, row_bytes(self.qtype, embedding_dim),
                                                   dtype=torch.uint8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_rows(self.weight[ids.reshape(-1)], self.qtype, self.embedding_dim)
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)
