"""Attention backends: one interface, chosen by name.

A backend is called once per layer with the new tokens' q/k/v and that layer's cache. It stores k/v
into `ctx.slot_mapping`, then attends every query row over its sequence's cached past (causal, plus
`ctx.tree_mask` when set), reading K/V only through `ctx.block_tables`."""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Protocol

import torch

from models.context import ForwardContext


class AttentionBackend(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, ctx: ForwardContext, scale: float) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
        caches: [num_blocks, block_size, num_kv_heads, head_dim]. Returns [num_tokens, num_heads, head_dim]."""
        ...


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write the new tokens' K/V into their cache slots, in the cache's dtype (one row per token; no host sync)."""
    # [num_blocks * block_size, num_kv_heads, head_dim] views, so a slot is a row index
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


# name -> (module, class); modules are imported on demand, so optional dependencies stay optional
_BACKENDS = {
    "reference": ("engine.attention.reference", "ReferenceAttention"),
    "flash": ("engine.attention.flash", "FlashAttention"),
    "cpu": ("engine.attention.cpu", "CpuAttention"),
    "triton": ("engine.attention.triton", "TritonAttention"),
}


def available_backends(device: torch.device | str) -> list[str]:
    """Backend names usable on `device`, fastest first. On CPU this builds the fused kernel (once)."""
    if torch.device(device).type == "cuda":
        fast = ["triton"] if importlib.util.find_spec("triton") is not None else []
    else:
        from engine.attention.cpu import load_extension
        fast = ["cpu"] if load_extension() else []
    return [*fast, "flash", "reference"]


def triton_runs(device: torch.device | str) -> bool:
    """Whether the Triton kernels run on `device`: on CUDA, or on the CPU through Triton's interpreter."""
    cuda_or_interpreted = torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return cuda_or_interpreted and importlib.util.find_spec("triton") is not None


def get_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """The backend called `name` ("auto": the fastest on `device`, warning once when the fused CPU kernel
    cannot be built). A backend asked for by name that cannot run here is an error, never a substitute."""
    if name == "auto":
        name = available_backends(device)[0]
    elif name == "cpu" and "cpu" not in available_backends(device):
        raise ValueError(f"the 'cpu' attention backend cannot run on {device} here (it needs a CPU device and its "
                         f"C++ kernel, which could not be built); available: {available_backends(device)}")
    elif name == "triton" and not triton_runs(device):
        raise ValueError(f"the 'triton' attention backend cannot run on {device} here (it needs CUDA and the triton "
                         "package; on the CPU, Triton's interpreter runs it under TRITON_INTERPRET=1, for tests); "
                         f"available: {available_backends(device)}")
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available on {device}: {available_backends(device)}")
    module, cls = _BACKENDS[name]
    backend = getattr(importlib.import_module(module), cls)
    return backend()
