"""The fused CPU backend: csrc/attention.cpp (C++/OpenMP), built with torch.utils.cpp_extension on first
use and cached.

The build goes to $GORGON_EXTENSIONS_DIR (default ~/.cache/gorgon/torch_extensions), in a folder named
after this CPU's instruction-set flags: the kernel is compiled with -march=native, so a cache shared
between different machines must never hand one machine's binary to another."""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

from engine.attention import store_kv
from engine.context import ForwardContext

SOURCE = Path(__file__).parent / "csrc" / "attention.cpp"


def _cpu_fingerprint() -> str:
    """Short hash of the CPU's feature flags (Linux), else of the machine name."""
    flags = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags += next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


@functools.cache
def load_extension() -> bool:
    """Build (or load the cached build of) the kernel once per process. False, with one warning, if
    it cannot be built here (no compiler, build error)."""
    from torch.utils import cpp_extension

    root = Path(os.environ.get("GORGON_EXTENSIONS_DIR", Path.home() / ".cache" / "gorgon" / "torch_extensions"))
    build_dir = root / f"attention-{_cpu_fingerprint()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(name="gorgon_attention", sources=[str(SOURCE)], build_directory=str(build_dir),
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           is_python_module=False)
    except Exception as error:  # any build failure means: use the torch backend instead
        warnings.warn(f"gorgon: the fused CPU attention kernel could not be built ({error}); "
                      f"using the 'flash' backend instead", RuntimeWarning, stacklevel=2)
        return False
    return True


class CpuAttention:
    """Fused paged attention for CPU tensors (fp32, bf16 or fp16 caches; fp32 arithmetic). Same contract
    as the reference backend: causal by cache index, plus the tree mask over each sequence's last rows."""

    name = "cpu"

    def __init__(self) -> None:
        if not load_extension():
            raise RuntimeError("the fused CPU attention kernel is not available on this machine")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, ctx: ForwardContext, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        return torch.ops.gorgon_attention.paged_attention(q.contiguous(), k_cache, v_cache, ctx.block_tables,
                                                          ctx.query_start_loc, ctx.context_lens, ctx.tree_mask, scale)
