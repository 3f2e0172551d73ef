"""FlashAttention in plain torch: tiled attention with an online softmax, over the paged KV cache.

For each sequence, the query rows are cut into tiles of QUERY_TILE rows, and its keys into tiles of
whole cache blocks (about KEY_TILE keys), read through the block table one tile at a time. A query
tile walks the key tiles in order, keeping per row
    m: the largest score seen so far,
    l: the sum of exp(score - m) over the keys seen so far,
    acc: the sum of exp(score - m) * value over the keys seen so far.
When a key tile raises m to m', the old l and acc are rescaled by exp(m - m') before the tile's own
terms are added, so after the last tile acc / l is the exact softmax-weighted sum. Only a
[QUERY_TILE, KEY_TILE] block of scores ever exists; the full score matrix and the gathered cache
never do. Key tiles that lie entirely after a query tile's last row are skipped (causality).

The same loop serves prefill (many rows), decode (one row) and Medusa tree verification (the tree
mask replaces causality among each sequence's last T cache entries)."""
from __future__ import annotations

import torch

from engine.attention import store_kv
from models.context import ForwardContext

QUERY_TILE = 64
KEY_TILE = 256


def visible(query_index: torch.Tensor, key_index: torch.Tensor, context_len: int,
            tree_mask: torch.Tensor | None) -> torch.Tensor:
    """[num_queries, num_keys] bool: may the query at cache index q see the key at cache index k?
    Causal, except among the last T cache entries, where the sequence's tree mask [T, T] decides."""
    mask = key_index[None, :] <= query_index[:, None]
    if tree_mask is not None:
        tree_size = tree_mask.shape[0]
        tree_start = context_len - tree_size
        in_tree = (query_index[:, None] >= tree_start) & (key_index[None, :] >= tree_start)
        # indices outside the tree are clamped only to keep the lookup in bounds; `in_tree` drops them
        tree_rows = (query_index - tree_start).clamp(0, tree_size - 1)
        tree_cols = (key_index - tree_start).clamp(0, tree_size - 1)
        mask = torch.where(in_tree, tree_mask[tree_rows][:, tree_cols], mask)
    return mask


class FlashAttention:
    """Tiled online-softmax attention; same contract as the reference backend (its oracle)."""

    name = "flash"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, ctx: ForwardContext, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        out = torch.empty_like(q)
        start = 0
        for i, (query_len, context_len) in enumerate(zip(ctx.query_lens_cpu, ctx.context_lens_cpu)):
            for tile_start in range(0, query_len, QUERY_TILE):
                rows = slice(start + tile_start, start + min(tile_start + QUERY_TILE, query_len))
                # cache index of each row: a sequence's query rows are its last query_len cache entries
                first_index = context_len - query_len + tile_start
                tree_mask = None if ctx.tree_mask is None else ctx.tree_mask[i]
                out[rows] = self._attend_tile(q[rows], first_index, k_cache, v_cache, ctx.block_tables[i],
                                              context_len, tree_mask, scale)
            start += query_len
        return out

    @staticmethod
    def _attend_tile(q: torch.Tensor, first_index: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, context_len: int, tree_mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
        """One query tile q [rows, num_heads, head_dim], whose first row sits at cache index first_index,
        against its sequence's cache, key tile by key tile."""
        rows, num_heads, head_dim = q.shape
        query_index = torch.arange(first_index, first_index + rows, device=q.device)
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        # [num_kv_heads, group * rows, head_dim]: the query heads sharing a kv head form one matrix
        queries = (q.float() * scale).view(rows, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        queries = queries.reshape(num_kv_heads, group * rows, head_dim)
        running_max = torch.full((num_kv_heads, group * rows), float("-inf"), device=q.device)
        running_sum = torch.zeros(num_kv_heads, group * rows, device=q.device)
        acc = torch.zeros(num_kv_heads, group * rows, head_dim, device=q.device)

        tile_keys = max(1, KEY_TILE // block_size) * block_size  # whole blocks
        num_keys = first_index + rows  # keys after the tile's last row are never visible
        for key_start in range(0, num_keys, tile_keys):
            key_end = min(key_start + tile_keys, num_keys)
            blocks = block_table[key_start // block_size:-(-key_end // block_size)]
            key_index = torch.arange(key_start, key_start + len(blocks) * block_size, device=q.device)
            # [num_kv_heads, tile_keys, head_dim], read straight from this tile's cache blocks
            keys = k_cache[blocks].flatten(0, 1).permute(1, 0, 2).float()
            values = v_cache[blocks].flatten(0, 1).permute(1, 0, 2).float()

            scores = queries @ keys.transpose(1, 2)  # [num_kv_heads, group * rows, tile_keys]
            mask = visible(query_index, key_index, context_len, tree_mask) & (key_index < num_keys)
            scores.masked_fill_(~mask.repeat(group, 1), float("-inf"))

            new_max = torch.maximum(running_max, scores.amax(dim=-1))
            # a row that has seen no visible key yet keeps max -inf; subtract 0 instead to avoid inf - inf
            safe_max = torch.where(new_max == float("-inf"), 0.0, new_max)
            probs = torch.exp(scores - safe_max[..., None])
            rescale = torch.exp(running_max - safe_max)
            running_sum = running_sum * rescale + probs.sum(dim=-1)
            acc = acc * rescale[..., None] + probs @ values
            running_max = new_max

        out = acc / running_sum[..., None]  # [num_kv_heads, group * rows, head_dim]
        return (out.view(num_kv_heads, group, rows, head_dim).permute(2, 0, 1, 3)
                .reshape(rows, num_heads, head_dim).to(q.dtype))
