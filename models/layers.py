"""Building blocks of a Llama-family decoder: RMSNorm, rotary embeddings, packed linears."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.config import RopeConfig
from models.kernels.decode import DecodeKernels, bf16_gemm


class RMSNorm(nn.Module):
    kernels: DecodeKernels | None = None  # set at load time (models.kernels.decode.set_decode_kernels)

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and self.kernels.takes(x):  # F.rms_norm costs ~20 us on a CPU whatever the size
            return self.kernels.ops.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op; fp32 maths inside


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (HF layout) with the default, linear, dynamic-NTK, YaRN and Llama-3 frequency rules, or
    per-frequency factors given as such (a GGUF file's rope_freqs: llama.cpp's form of Llama-3 scaling)."""

    def __init__(self, head_dim: int, rope: RopeConfig, max_position_embeddings: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope = rope
        self.max_position_embeddings = max_position_embeddings
        self.attention_scaling = 1.0
        # on the CPU even while models.loader builds a model on the meta device, where torch computes arithmetic in
        # Python behind a guard that imports its compiler (1.4 s of every start); the loader rebuilds it on the device
        with torch.device("cpu"):
            inv_freq = self._frequencies()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _frequencies(self) -> torch.Tensor:
        rope, head_dim = self.rope, self.head_dim
        inv_freq = self._base_inv_freq(rope.theta)
        if rope.rope_type == "linear":
            inv_freq = inv_freq / rope.factor
        elif rope.rope_type == "llama3":
            inv_freq = self._llama3(inv_freq)
        elif rope.rope_type == "yarn":
            inv_freq, self.attention_scaling = self._yarn()
        elif rope.rope_type == "freq_factors":
            factors = torch.tensor(rope.params["factors"], dtype=torch.float32)
            if factors.shape != inv_freq.shape:
                raise ValueError(f"{len(factors)} RoPE frequency factors for a head dimension of {head_dim} "
                                 f"(expected {len(inv_freq)})")
            inv_freq = inv_freq / factors
        return inv_freq

    def _base_inv_freq(self, theta: float | torch.Tensor) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        return 1.0 / (theta ** exponents)

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        p = self.rope.params
        factor, low, high = self.rope.factor, p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_medium, smoothed, scaled)

    def _yarn(self) -> tuple[torch.Tensor, float]:
        p, dim, base, factor = self.rope.params, self.head_dim, self.rope.theta, self.rope.factor
        original_len = p["original_max_position_embeddings"]

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = p.get("attention_factor")
        if attention_factor is None:
            if p.get("mscale") and p.get("mscale_all_dim"):
                attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
            else:
                attention_factor = mscale(factor)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation_weight = 1 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation_weight
        return inv_freq, float(attention_factor)

    def forward(self, positions: torch.Tensor,
                seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for each position, [*positions.shape, head_dim] in fp32. `seq_lens` (same shape as positions)
        matters only to dynamic NTK scaling, whose base grows with the sequence length beyond
        max_position_embeddings: HF scales a whole forward to its length, so its generate rotates every prompt
        token for the prompt's length and each later token for its position + 1. The engine passes those
        lengths (the prompt's, or position + 1 when larger), so a token's rotation never depends on how the
        prompt was chunked, and the prefix cache keys prompt blocks by the length (Sequence.cache_key).
        None: the length of the whole forward, as HF."""
        if self.rope.rope_type == "dynamic":
            if seq_lens is None:
                seq_lens = (positions.max() + 1).expand_as(positions)
            seq_lens = seq_lens.float().clamp(min=self.max_position_embeddings)
            factor, dim = self.rope.factor, self.head_dim
            base = (self.rope.theta
                    * ((factor * seq_lens / self.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2)))
            exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
            inv_freq = 1.0 / (base.unsqueeze(-1) ** exponents)  # [*, head_dim/2]
            freqs = positions.unsqueeze(-1).float() * inv_freq
        else:
            freqs = positions.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., num_tokens, num_heads, head_dim]; cos/sin: [..., num_tokens, head_dim], already in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


class Linear(nn.Linear):
    """nn.Linear that sends decode-sized inputs (a few rows) to gorgon's bandwidth-bound CPU kernel when it
    has been handed one at load time."""

    qtype: int = 0  # the weights' ggml type as the fused kernels take it: float (models.quant.QuantizedLinear: its own)
    # the activations' dtype where the weights keep another (a GGUF's F16 matrices under fp32 activations,
    # models.loader._half_linears); None: the weights'
    dtype: torch.dtype | None = None
    _kernels: DecodeKernels | None = None
    packed: torch.Tensor | None = None

    @property
    def kernels(self) -> DecodeKernels | None:
        return self._kernels

    @kernels.setter
    def kernels(self, kernels: DecodeKernels | None) -> None:
        self._kernels, self.packed = kernels, None

    def pack(self) -> None:
        """Lay the fp32/bf16 weights out for the kernels (16 rows interleaved, decode.cpp's repack_float), where
        that applies: a second copy of the weights, which the kernels stream instead (set_decode_kernels)."""
        self.packed = self.kernels.ops.repack_float(self.weight.detach())

    @property
    def kernel_weight(self) -> torch.Tensor:
        """The weights as the decode kernels read them: packed where that applies, else `weight`."""
        return self.weight if self.packed is None else self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and self.kernels.takes(x):
            rows = x.reshape(-1, x.shape[-1])  # [num_tokens, in_features]
            return self.kernels.ops.small_batch_linear(rows, self.kernel_weight, self.bias).view(*x.shape[:-1], -1)
        if self.dtype is not None or (self.weight.dtype == torch.bfloat16 and x.is_cpu and not bf16_gemm()):
            return widened_linear(x, self.weight, self.bias)  # (a GGUF's F16 / BF16 matrices under fp32 activations)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding whose rows come in the activations' dtype where its weights keep another (a GGUF's F16
    embedding, tied to the LM head, under fp32 activations: models.loader._half_linears)."""

    dtype: torch.dtype | None = None  # None: the weights'

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids)
        return rows if self.dtype is None else rows.to(self.dtype)


# bf16 weights widened to fp32 at a time by widened_linear: 16 MiB of fp32
WIDEN_TILE_ELEMENTS = 1 << 22


def tiled_matmul(x: torch.Tensor, num_rows: int, weight_rows: Callable[[int, int], torch.Tensor],
                 tile_elements: int) -> torch.Tensor:
    """x Wᵀ for a W [num_rows, x's features] that is never whole in x's dtype: weight_rows(begin, end) gives
    its rows [begin, end) in x's dtype, at most tile_elements weights at a time."""
    tile = max(1, tile_elements // x.shape[-1])
    return torch.cat([x @ weight_rows(n, n + tile).T for n in range(0, num_rows, tile)], dim=-1)


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in fp32 over tiles of weight rows widened from bf16 or fp16, returned in x's dtype: for weights
    kept in half precision under fp32 activations, and on CPUs without bf16 GEMM instructions, where torch's bf16
    GEMM runs at a few percent of its fp32 one (a 512-token prefill of SmolLM2 in bf16 on an AVX2-only Zen 3: 37
    tok/s, ~95% of it in aten::mm)."""
    out = tiled_matmul(x.float(), weight.shape[0], lambda begin, end: weight[begin:end].float(), WIDEN_TILE_ELEMENTS)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def packed_offsets(sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Each projection's (first row, rows) in a packed weight that stacks them in this order."""
    offsets, first = {}, 0
    for name, size in sizes.items():
        offsets[name] = (first, size)
        first += size
    return offsets


class PackedLinear(Linear):
    """One GEMM for several HF projections that share an input (q/k/v, gate/up). `shards` maps each
    HF projection name to its rows of the packed weight."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shards = packed_offsets(shard_sizes)

    def shard_param(self, param_name: str, shard: str) -> torch.Tensor:
        offset, size = self.shards[shard]
        return getattr(self, param_name).data.narrow(0, offset, size)
