"""The paged KV cache: one tensor pool for all layers, and the BlockManager that hands out its blocks."""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from engine.attention import AttentionBackend
from engine.sequence import Sequence


def slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The cache slots of a sequence's cache indices [start, end): index i lives at offset i % block_size of
    block block_table[i // block_size], i.e. slot block_id * block_size + offset (the only address a kernel
    sees). Python work is per block: each block's run of slots is one range()."""
    out: list[int] = []
    for block in range(start // block_size, (end - 1) // block_size + 1):
        shift = block_table[block] * block_size - block * block_size  # cache index -> slot within this block
        out += range(shift + max(start, block * block_size), shift + min(end, (block + 1) * block_size))
    return out


class KVCache:
    """One allocation, [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]. Attention layers
    write their new tokens into the views k(i) and v(i), where slot s is row s of [num_blocks * block_size,
    ...]; everything else writes through write() and copy()."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.pool = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                                device=device)
        # [num_layers, 2, num_slots, num_kv_heads, head_dim]: a slot is an index on dim 2
        self._by_slot = self.pool.view(num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim)

    @property
    def device(self) -> torch.device:
        return self.pool.device

    def k(self, layer: int) -> torch.Tensor:
        return self.pool[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.pool[layer, 1]

    def bind(self, model: torch.nn.Module, backend: AttentionBackend) -> None:
        """Hand each attention layer of `model` its views k(i), v(i) and the backend that reads them."""
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.k_cache = self.k(i)
            layer.self_attn.v_cache = self.v(i)
            layer.self_attn.backend = backend

    def write(self, slot_ids: list[int], kv: torch.Tensor) -> None:
        """Store kv [num_layers, 2, len(slot_ids), num_kv_heads, head_dim] (every layer's K and V) at slot_ids."""
        self._by_slot[:, :, torch.tensor(slot_ids, device=self.device)] = kv.to(self.pool.dtype)

    def read(self, slot_ids: list[int]) -> torch.Tensor:
        """Every layer's K and V at slot_ids: [num_layers, 2, len(slot_ids), num_kv_heads, head_dim]."""
        return self._by_slot[:, :, torch.tensor(slot_ids, device=self.device)]

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """K/V of every layer from slots src to slots dst (equal-length index tensors, on the pool's device)."""
        self._by_slot[:, :, dst] = self._by_slot[:, :, src]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize


class BlockManager:
    """Refcounted blocks with a hash-chained prefix cache.

    A full block's hash covers its tokens and every token before it (and the sequence's cache key,
    e.g. its adapter), so equal hashes mean equal K/V: SHA-256, for a client who could make its prompt's
    block collide with another's under a weaker hash would read or poison that K/V (vLLM's CVE-2025-25183).
    Freed blocks keep their contents and stay findable by hash until they are reused (lazy eviction, least
    recently freed first).

    Block i of a sequence holds its cache indices [i*block_size, (i+1)*block_size). A prefix adapter's
    virtual tokens come first: its full blocks are pinned (shared, never hashed) and its partial last
    block is copied into each sequence's own block (engine.adapters.prefix)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-(seq.num_virtual_tokens + num_tokens) // self.block_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens. All or nothing."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return True

    def match_prefix(self, seq: Sequence, cache_key: bytes) -> int:
        """Attach the pinned blocks of seq's virtual tokens, then reuse cached blocks for the longest hashed
        prefix of its tokens; returns the tokens reused. The last token is always left to compute, so the
        step has a row to sample from."""
        for block in self._pinned_blocks(seq):
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        if self.enable_prefix_caching:
            for i in range(len(seq.block_table), (seq.num_virtual_tokens + len(seq) - 1) // self.block_size):
                block = self.cached.get(self._hash_of_block(seq, i, cache_key))
                if block is None:
                    break
                if self.ref_counts[block] == 0:
                    del self.free[block]
                self.ref_counts[block] += 1
                seq.block_table.append(block)
        return max(0, len(seq.block_table) * self.block_size - seq.num_virtual_tokens)

    def pending_block_hash(self, seq: Sequence, cache_key: bytes) -> bytes | None:
        """The hash of the first block of seq's prompt that it has not computed, where match_prefix could find it
        once computed (None: none left, or no prefix caching)."""
        i = (seq.num_virtual_tokens + seq.num_computed_tokens) // self.block_size
        if not self.enable_prefix_caching or i >= (seq.num_virtual_tokens + len(seq) - 1) // self.block_size:
            return None
        return self._hash_of_block(seq, i, cache_key)

    def register_full_blocks(self, seq: Sequence, cache_key: bytes, num_computed_before: int) -> None:
        """Make the blocks that this step filled findable by hash (the first block with a hash wins)."""
        if not self.enable_prefix_caching:
            return
        offset = seq.num_virtual_tokens
        for i in range((offset + num_computed_before) // self.block_size,
                       (offset + seq.num_computed_tokens) // self.block_size):
            block = seq.block_table[i]
            if self.block_hash[block] is not None:
                continue
            h = self._hash_of_block(seq, i, cache_key)
            if h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Release the blocks beyond those that hold num_tokens tokens."""
        keep = -(-(seq.num_virtual_tokens + num_tokens) // self.block_size)
        for block in reversed(seq.block_table[keep:]):
            self._decref(block)
        del seq.block_table[keep:]

    def free_sequence(self, seq: Sequence) -> None:
        # reversed: a sequence's tail blocks are the least likely to be shared, so evict them first
        for block in reversed(seq.block_table):
            self._decref(block)
        seq.block_table.clear()

    def _hash_of_block(self, seq: Sequence, i: int, cache_key: bytes) -> bytes:
        """Chain hash of seq's block i: its tokens, all tokens before it, and the cache key (which also
        stands for any virtual tokens). Memoised on the sequence, since a sequence's tokens never change."""
        offset = seq.num_virtual_tokens
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else hashlib.sha256(b"gorgon-kv " + cache_key).digest()
            first, end = (max(0, b * self.block_size - offset) for b in (j, j + 1))
            tokens = array("q", seq.token_ids[first:end]).tobytes()
            seq.block_hashes.append(hashlib.sha256(parent + tokens).digest())
        return seq.block_hashes[i]

    def pin_blocks(self, num_blocks: int) -> list[int] | None:
        """Take blocks outside any sequence (a prefix adapter's virtual K/V); None if too few are free."""
        if num_blocks > len(self.free):
            return None
        return [self._take_free_block() for _ in range(num_blocks)]

    def unpin_blocks(self, blocks: list[int]) -> None:
        for block in blocks:
            self._decref(block)

    def _pinned_blocks(self, seq: Sequence) -> list[int]:
        return seq.adapter.kv_blocks if seq.num_virtual_tokens else []

    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict its cache entry: the contents are about to change
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _decref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed twice"
        if self.ref_counts[block] == 0:
            self.free[block] = None
