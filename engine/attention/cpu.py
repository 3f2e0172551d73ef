"""The fused CPU backend: models/kernels/attention.cpp (C++/OpenMP), built on first use and cached."""
from __future__ import annotations

import functools
import warnings

import torch

from models.context import ForwardContext
from models.kernels import build


@functools.cache
def load_extension() -> bool:
    """Build (or load the cached build of) the kernel once per process. False, with one warning, if
    it cannot be built here (no compiler, build error)."""
    try:
        build("gorgon_attention", "attention.cpp", python_module=False)
    except Exception as error:  # any build failure means: use the torch backend instead
        warnings.warn(f"gorgon: the fused CPU attention kernel could not be built ({error}); "
                      f"using the 'flash' backend instead", RuntimeWarning, stacklevel=2)
        return False
    return True


class CpuAttention:
    """Fused paged attention for CPU tensors (fp32, bf16 or fp16 caches; fp32 arithmetic). Same contract
    as the reference backend: causal by cache index, plus the tree mask over each sequence's last rows. A
    row's result is bitwise the same whatever else is in the batch, and wherever its position is computed."""

    name = "cpu"

    def __init__(self) -> None:
        if not load_extension():
            raise RuntimeError("the fused CPU attention kernel is not available on this machine")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, ctx: ForwardContext, scale: float) -> torch.Tensor:
        return torch.ops.gorgon_attention.paged_attention(q, k, v, k_cache, v_cache, ctx.slot_mapping,
                                                          ctx.block_tables, ctx.query_start_loc, ctx.context_lens,
                                                          ctx.tree_mask, scale)
