"""Naive paged attention: the oracle every other backend is tested against.

Per sequence: gather its K/V from the cache through the block table, build the full score matrix,
mask it (causal by cache index, but for the sequence's tree mask over its last T cache entries), softmax, weight V."""
from __future__ import annotations

import torch

from engine.attention import store_kv
from models.context import ForwardContext


class ReferenceAttention:
    name = "reference"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, ctx: ForwardContext, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        block_size = k_cache.shape[1]
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        out = torch.empty_like(q)
        start = 0
        for i, (query_len, context_len) in enumerate(zip(ctx.query_lens_cpu, ctx.context_lens_cpu)):
            num_blocks = -(-context_len // block_size)
            blocks = ctx.block_tables[i, :num_blocks]
            keys = k_cache[blocks].flatten(0, 1)[:context_len]  # [context_len, num_kv_heads, head_dim]
            values = v_cache[blocks].flatten(0, 1)[:context_len]
            keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=1)
            values = values.repeat_interleave(num_heads // num_kv_heads, dim=1)
            query = q[start:start + query_len]  # [query_len, num_heads, head_dim]
            scores = torch.einsum("qhd,khd->hqk", query.float(), keys.float()) * scale
            tree_mask = None if ctx.tree_mask is None else ctx.tree_mask[i]
            scores.masked_fill_(~self._mask(query_len, context_len, tree_mask, q.device), float("-inf"))
            probs = scores.softmax(dim=-1)
            out[start:start + query_len] = torch.einsum("hqk,khd->qhd", probs, values.float()).to(q.dtype)
            start += query_len
        return out

    @staticmethod
    def _mask(query_len: int, context_len: int, tree_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """[query_len, context_len] bool: may query row r see cache index c? Causal, but among the last T
        cache entries, where tree_mask [T, T] (this sequence's) decides."""
        query_idx = torch.arange(context_len - query_len, context_len, device=device)
        mask = torch.arange(context_len, device=device)[None, :] <= query_idx[:, None]
        if tree_mask is not None:
            tree_start = context_len - tree_mask.shape[0]  # (below 0 where the cache holds fewer than T entries)
            in_tree = query_idx >= tree_start
            mask[in_tree, max(tree_start, 0):] = tree_mask[query_idx[in_tree] - tree_start, max(-tree_start, 0):]
        return mask
