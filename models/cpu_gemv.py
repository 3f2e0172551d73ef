"""The small-batch CPU linear kernel (models/csrc/gemv.cpp), compiled on first use and cached.

torch's CPU GEMM reaches about half the machine's read bandwidth when one to a few token rows
multiply a weight matrix; decode is bound by exactly that, so it gets a kernel of its own."""
from __future__ import annotations

import os
import warnings
from functools import cache
from pathlib import Path

import torch

MAX_ROWS = 8
_SOURCE = Path(__file__).parent / "csrc" / "gemv.cpp"


def build_dir() -> Path:
    root = Path(os.environ.get("GORGON_CACHE", Path.home() / ".cache" / "gorgon"))
    path = root / "torch_extensions" / f"gemv-torch{torch.__version__.replace('+', '_')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@cache
def kernel():
    """The compiled module, or None (with one warning) when it cannot be built here."""
    if os.environ.get("GORGON_DISABLE_CPU_KERNELS"):
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="gorgon_gemv", sources=[str(_SOURCE)], build_directory=str(build_dir()),
                    extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
    except Exception as e:  # no compiler, no headers, ...: fall back to torch's GEMM
        warnings.warn(f"gorgon: CPU decode kernel unavailable, using torch.nn.functional.linear ({e})")
        return None


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and weight.dtype in (torch.float32, torch.bfloat16)
            and x.numel() <= MAX_ROWS * x.shape[-1] and kernel() is not None)
