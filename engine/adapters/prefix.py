"""Prefix tuning: PEFT's `prompt_embeddings` -> per-layer virtual K/V that sit in the cache before a
sequence's first token, as PEFT's past_key_values do (stored as they are: PEFT applies no RoPE to them).

The full blocks of virtual tokens are written once into pinned blocks that every sequence using the
adapter shares; a partial last block is copied into each sequence's own block before its first step,
and the sequence's tokens fill the rest of it. Token j then sits at cache index and position
num_virtual_tokens + j, exactly PEFT's positions, so attention backends need no change."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from engine.kv_cache import KVCache, slots
from models.config import ModelConfig


class PrefixFormatError(ValueError):
    pass


def read_prefix(weights_file: Path, config: dict, model_config: ModelConfig) -> torch.Tensor:
    """PEFT PREFIX_TUNING weights -> virtual K/V, [num_layers, 2, num_virtual_tokens, num_kv_heads, head_dim] fp32."""
    num_layers, num_kv_heads, head_dim = model_config.num_layers, model_config.num_kv_heads, model_config.head_dim
    expected = {"num_layers": num_layers, "num_attention_heads": num_kv_heads, "token_dim": num_kv_heads * head_dim,
                "num_transformer_submodules": 1}
    wrong = {k: config.get(k) for k, v in expected.items() if config.get(k) != v}
    if wrong:
        raise PrefixFormatError(f"adapter_config.json has {wrong}; this model needs {expected}")
    num_virtual = config.get("num_virtual_tokens")
    if not isinstance(num_virtual, int) or num_virtual < 1:
        raise PrefixFormatError(f"num_virtual_tokens must be a positive integer, got {num_virtual!r}")
    with safe_open(weights_file, framework="pt", device="cpu") as f:
        keys = list(f.keys())
        if keys != ["prompt_embeddings"]:
            raise PrefixFormatError(f"a prefix-tuning adapter holds one tensor, 'prompt_embeddings'; found {keys}")
        embeddings = f.get_tensor("prompt_embeddings").float()
    shape = (num_virtual, 2 * num_layers * num_kv_heads * head_dim)
    if tuple(embeddings.shape) != shape:
        raise PrefixFormatError(f"prompt_embeddings has shape {tuple(embeddings.shape)}, expected {shape} "
                                "([num_virtual_tokens, 2 * layers * kv_heads * head_dim])")
    # PEFT's layout: [virtual, layers * 2 (k, v interleaved), kv_heads, head_dim]
    kv = embeddings.view(num_virtual, num_layers, 2, num_kv_heads, head_dim)
    return kv.permute(1, 2, 0, 3, 4).contiguous()  # [num_layers, 2, num_virtual, num_kv_heads, head_dim]


def write_pinned_blocks(kv: torch.Tensor, kv_cache: KVCache, blocks: list[int]) -> None:
    """Write the full blocks of virtual K/V (len(blocks) of them) into `blocks`."""
    if blocks:
        num_full = len(blocks) * kv_cache.block_size
        kv_cache.write(slots(blocks, 0, num_full, kv_cache.block_size), kv[:, :, :num_full])


def write_virtual_tails(seqs: list, kv_cache: KVCache) -> None:
    """Copy the partial last block of virtual K/V into the own block of every sequence about to compute
    its first token (fresh, or recomputing after preemption: either way that block is newly allocated)."""
    block_size = kv_cache.block_size
    for seq in seqs:
        num_virtual = seq.num_virtual_tokens
        tail = num_virtual % block_size
        if tail and seq.num_computed_tokens == 0:
            kv_cache.write(slots(seq.block_table, num_virtual - tail, num_virtual, block_size),
                           seq.adapter.prefix_kv[:, :, num_virtual - tail:])
