"""Quantized weights: the C++ kernels (every ggml type, every instruction-set path) vs dequantize-then-matmul."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES

from models.kernels import decode as cpu_decode
from models.quant import (
    QUANTIZED_TYPES,
    QType,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedWeight,
    quantize,
    row_bytes,
)

ops = cpu_decode.compiled()
pytestmark = pytest.mark.skipif(ops is None, reason="the CPU kernels could not be built here (no compiler?)")

# byte offsets of each block's fp16 scales (the rest of a block is any bytes)
HALF_FIELDS = {QType.Q8_0: (0,), QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q5_0: (0,), QType.Q5_1: (0, 2),
               QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,), QType.Q3_K: (108,), QType.Q2_K: (80, 82),
               QType.IQ4_NL: (0,), QType.IQ4_XS: (0,), QType.IQ1_S: (0,), QType.IQ2_XXS: (0,), QType.IQ2_XS: (0,),
               QType.IQ2_S: (0,), QType.IQ3_XXS: (0,), QType.IQ3_S: (0,), QType.TQ1_0: (52,), QType.TQ2_0: (64,),
               QType.IQ1_M: ()}
ISAS = ["scalar", "avx2", "avx512"]


def random_weight(qtype: QType, out_features: int, in_features: int, seed: int = 0,
                  scales: tuple[float, float] = (0.001, 0.02)) -> QuantizedWeight:
    """Random blocks: random quants and packed scales, fp16 scales of a sane size (written, not quantized)."""
    rng = np.random.default_rng(seed)
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (out_features, in_features // block, type_size), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        d = rng.uniform(*scales, (out_features, in_features // block)).astype(np.float16)
        blocks[..., offset:offset + 2] = d.view(np.uint8).reshape(out_features, -1, 2)
    if qtype == QType.IQ1_M:  # its fp16 scale is the top nibbles of its four uint16 sub-block scales (bytes 48-55)
        d = rng.uniform(*scales, (out_features, in_features // block)).astype(np.float16).view(np.uint16)
        for i in range(4):
            nibble = ((d >> (4 * i)) & 0xF).astype(np.uint8)
            blocks[..., 49 + 2 * i] = (blocks[..., 49 + 2 * i] & 0x0F) | (nibble << 4)
    data = torch.from_numpy(blocks.reshape(out_features, -1))
    return QuantizedWeight(qtype, (out_features, in_features), data)


def in_features_for(qtype: QType) -> list[int]:
    block = GGML_QUANT_SIZES[qtype][0]
    return [512, 768] if block == 256 else [96, 608]  # K % 64 == 32 exercises the odd-block tail


def activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernels' stated bound: sum over blocks of 32 of max|x_block| / 254 * sum |w_block|."""
    xmax = x.view(x.shape[0], -1, 32).abs().amax(-1)  # [M, blocks]
    wsum = w.view(w.shape[0], -1, 32).abs().sum(-1)  # [N, blocks]
    return xmax @ wsum.T / 254


def use_isa(isa: str) -> None:
    """Run the kernels' `isa` path; skips (visibly) where this CPU lacks that instruction set."""
    if ops.set_isa(isa) != isa:
        pytest.skip(f"this CPU has no {isa}")


@pytest.fixture(autouse=True)
def restore_isa():
    amx = ops.amx()
    yield
    ops.set_isa("auto")
    ops.set_amx(amx)


@pytest.mark.parametrize("qtype", QUANTIZED_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qtype):
    for k in in_features_for(qtype):
        w = random_weight(qtype, 5, k)
        assert torch.equal(ops.dequantize(w.data, int(qtype), k), w.dequantize())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", QUANTIZED_TYPES, ids=lambda t: t.name)
def test_kernel_matches_dequantized_matmul(qtype, isa):
    use_isa(isa)
    for k in in_features_for(qtype):
        w = random_weight(qtype, 37, k, seed=k)
        dense = w.dequantize()
        for m in (1, 3, 8, 32):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            ref = x @ dense.T
            out = ops.quantized_linear(x, w.data, int(qtype), None)
            fp32_slack = 1e-5 * (x.abs() @ dense.abs().T) + 1e-6
            assert ((out - ref).abs() <= activation_bound(x, dense) * 1.001 + fp32_slack).all(), (k, m)


PACKABLE = QUANTIZED_TYPES


def packed(w: QuantizedWeight) -> torch.Tensor:
    """w in the kernels' 16-row interleaved layout; skips where this CPU has no kernels that read it."""
    if ops.set_isa("auto") == "scalar":
        pytest.skip("the packed layout is only made for CPUs with AVX2 or AVX-512 VNNI")
    p = ops.repack(w.data, int(w.qtype), w.shape[1])
    block, type_size = GGML_QUANT_SIZES[w.qtype]
    # bytes a group block has beyond the file's 16 rows: their packed scales and minimums, widened to bytes
    extra = {QType.Q4_K: 64, QType.Q5_K: 64, QType.Q3_K: 64, QType.Q2_K: 256, QType.IQ4_XS: 32}.get(w.qtype, 0)
    assert p is not None and p.shape == (w.shape[0] // 16, w.shape[1] // block, 16 * type_size + extra)
    return p


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda t: t.name)
def test_packed_layout_holds_the_same_weights(qtype):
    for k in in_features_for(qtype):
        w = random_weight(qtype, 48, k, seed=k)
        assert torch.equal(ops.dequantize(packed(w), int(qtype), k), w.dequantize())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda t: t.name)
def test_packed_kernel_matches_dequantized_matmul(qtype, isa):
    """The packed kernels (AVX-512 VNNI, AVX2), and portable code over the packed layout."""
    for k in in_features_for(qtype):
        w = random_weight(qtype, 48, k, seed=k)
        p, dense = packed(w), w.dequantize()
        use_isa(isa)
        for m in (1, 3, 8, 13, 32):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            out = ops.quantized_linear(x, p, int(qtype), None)
            fp32_slack = 1e-5 * (x.abs() @ dense.abs().T) + 1e-6
            assert ((out - x @ dense.T).abs() <= activation_bound(x, dense) * 1.001 + fp32_slack).all(), (k, m)


@pytest.mark.parametrize("layout", ["file", "packed"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_1, QType.Q4_K, QType.Q6_K], ids=lambda t: t.name)
def test_a_non_finite_activation_makes_its_row_nan_as_the_float_matmul_does(qtype, isa, layout):
    """A NaN anywhere in a block (not only where the SIMD max carries it), or an infinity: the row is not finite."""
    k = in_features_for(qtype)[0]
    w = random_weight(qtype, 48, k)
    weights = packed(w) if layout == "packed" else w.data
    use_isa(isa)
    x = torch.randn(4, k)
    x[1, 5], x[2, 31], x[3, 40] = float("nan"), float("nan"), float("-inf")
    out = ops.quantized_linear(x, weights, int(qtype), None)
    assert out[1:].isnan().all()
    assert torch.equal(out[0], ops.quantized_linear(x[:1], weights, int(qtype), None)[0])
    assert out[0].isfinite().all()


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda t: t.name)
def test_packed_kernel_rows_do_not_depend_on_the_batch(qtype, isa):
    k = in_features_for(qtype)[-1]
    w = random_weight(qtype, 32, k)
    p = packed(w)
    use_isa(isa)
    x = torch.randn(13, k)
    together = ops.quantized_linear(x, p, int(qtype), None)
    for i in range(13):
        assert torch.equal(ops.quantized_linear(x[i:i + 1], p, int(qtype), None)[0], together[i])


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda t: t.name)
def test_amx_tiles_give_the_vnni_paths_bits(qtype):
    """From 9 token rows, the AVX-512 path takes its integer dot products from AMX tiles (where the CPU and
    the OS allow them): every row's result must be bitwise that of vpdpbusd's, as Medusa's verification of
    a tree reproduces plain decoding of one row"""
    if not ops.set_amx(True):
        pytest.skip("this CPU (or its OS) gives no AMX-INT8 tiles")
    for k in in_features_for(qtype):  # the last batch of 8 blocks partial, and a 64-weight tail
        w = random_weight(qtype, 48, k, seed=k)
        p = packed(w)
        for m in (9, 16, 17, 25, 32):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            tiles = ops.quantized_linear(x, p, int(qtype), None)
            ops.set_amx(False)
            assert torch.equal(ops.quantized_linear(x, p, int(qtype), None), tiles), (k, m)
            ops.set_amx(True)


def test_repack_applies_only_where_it_has_kernels():
    use_isa("avx2")
    assert ops.repack(random_weight(QType.Q8_0, 32, 96).data, int(QType.Q8_0), 96) is not None
    assert ops.repack(random_weight(QType.Q8_0, 40, 96).data, int(QType.Q8_0), 96) is None  # 40 rows: not 16s
    ops.set_isa("scalar")
    assert ops.repack(random_weight(QType.Q8_0, 32, 96).data, int(QType.Q8_0), 96) is None


def test_paths_agree_closely():
    w = random_weight(QType.Q4_K, 64, 512)
    x = torch.randn(4, 512)
    outs = []
    for isa in ISAS:
        if ops.set_isa(isa) != isa:
            continue
        outs.append(ops.quantized_linear(x, w.data, int(QType.Q4_K), None))
    for out in outs[1:]:
        assert (out - outs[0]).abs().max() <= 1e-4 * outs[0].abs().max()


def test_forced_isa_names_and_errors():
    assert ops.set_isa("scalar") == "scalar"
    assert ops.set_isa("auto") in ISAS
    with pytest.raises(ValueError, match="GORGON_CPU_ISA"):
        ops.set_isa("sse9")


def test_wrong_row_bytes_is_a_clear_error():
    w = random_weight(QType.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="bytes per row"):
        ops.quantized_linear(torch.randn(1, 96), w.data, int(QType.Q8_0), None)


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 33, 300])
def test_quantized_linear_module(qtype, rows):
    """Both paths of the layer: the kernel up to 32 rows, dequantized tiles (several of them) past that, in bf16
    where the CPU multiplies bf16 natively; without kernels, exact fp32 tiles."""
    k = 1024
    w = random_weight(qtype, 1100, k)
    dense = w.dequantize()
    bias = torch.randn(1100)
    layer = QuantizedLinear.from_weight(w, bias)
    layer.kernels = cpu_decode.DecodeKernels(ops)
    x = torch.randn(rows, k)
    ref = x @ dense.T + bias
    magnitude = x.abs() @ dense.abs().T
    tol = activation_bound(x, dense) * 1.001 + 1e-4 if rows <= 32 else 2 ** -7 * magnitude + 1e-4  # bf16: 8 bits
    assert ((layer(x) - ref).abs() <= tol).all()
    layer.kernels = None  # fp32 throughout: only the order of the sums differs from ref (BLAS picks its own blocking)
    assert ((layer(x) - ref).abs() <= 2 * k * 2 ** -24 * magnitude + 1e-4).all()


def test_embedding_dequantizes_the_rows_it_reads():
    w = random_weight(QType.Q8_0, 50, 64)
    emb = QuantizedEmbedding(50, 64, QType.Q8_0, torch.float32)
    emb.weight = w.data
    ids = torch.tensor([[3, 7], [49, 0]])
    assert torch.equal(emb(ids), w.dequantize()[ids])


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q4_1], ids=lambda t: t.name)
def test_quantize_round_trip(qtype):
    dense = torch.randn(16, 128)
    w = quantize(dense, qtype)
    assert w.data.shape == (16, row_bytes(qtype, 128))
    step = dense.view(16, -1, 32).abs().amax(-1, keepdim=True) / (127 if qtype == QType.Q8_0 else 7)
    assert ((w.dequantize().view(16, -1, 32) - dense.view(16, -1, 32)).abs() <= step * 1.01).all()


def test_unsupported_type_names_it():
    with pytest.raises(ValueError, match="type MXFP4"):
        QuantizedWeight(QType.MXFP4, (4, 256), torch.zeros(4, 136, dtype=torch.uint8))
    weight = QuantizedWeight(QType.IQ2_XXS, (4, 256), torch.zeros(4, 66, dtype=torch.uint8))  # read, dequantized
    assert not weight.has_kernels and weight.dequantize().shape == (4, 256)
    with pytest.raises(ValueError, match="no kernels for IQ2_XXS"):
        QuantizedLinear.from_weight(weight)
    with pytest.raises(ValueError, match="no kernels for IQ2_XXS"):
        QuantizedEmbedding(4, 256, QType.IQ2_XXS, torch.float32)
