"""The FlashAttention algorithm of flash.py as one Triton kernel for CUDA (runs on CPU tensors under
TRITON_INTERPRET=1, which is how the tests check it without a GPU).

A program owns BLOCK_M query rows of one sequence and one query head, and walks that sequence's keys
in tiles of BLOCK_N, loading each key's K/V through the block table. For decode of long contexts the
keys are also split across programs (flash-decoding): each split writes its normalised output and
log-sum-exp, and `combine_splits` merges them."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention import store_kv
from models.context import ForwardContext

# query rows per program: 16 for decode and tree steps (tl.dot's least), 64 for prefill chunks, whose programs
# then read each K/V tile for 4x the rows (H200, 8 x 4096-token prefills: 2.0 ms at 16 rows)
DECODE_BLOCK_M, PREFILL_BLOCK_M = 16, 64
BLOCK_N = 64
MIN_KEYS_PER_SPLIT = 256


@triton.jit
def _paged_attention_kernel(
        Q, K, V, Out, Lse, BlockTables, QueryStart, ContextLens, TreeMask,
        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
        stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
        scale, num_splits, keys_per_split, tree_size,
        GROUP: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_TREE: tl.constexpr, DOT_FP32: tl.constexpr):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    query_start = tl.load(QueryStart + seq)
    query_len = tl.load(QueryStart + seq + 1) - query_start
    if tile * BLOCK_M < query_len:
        context_len = tl.load(ContextLens + seq)
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = offs_m < query_len
        query_index = context_len - query_len + offs_m  # cache index of each row
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM
        q = tl.load(Q + (query_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        kv_head = head // GROUP

        # this split's keys, cut short after the tile's last row (causality)
        last_row_index = context_len - query_len + tl.minimum((tile + 1) * BLOCK_M, query_len) - 1
        key_begin = split * keys_per_split
        key_end = tl.minimum(tl.minimum(key_begin + keys_per_split, context_len), last_row_index + 1)
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for key_start in range(key_begin, key_end, BLOCK_N):
            offs_n = key_start + tl.arange(0, BLOCK_N)
            key_valid = offs_n < key_end
            block = tl.load(BlockTables + seq * stride_bt + offs_n // KV_BLOCK_SIZE, mask=key_valid, other=0)
            slot_offset = block * stride_kb + (offs_n % KV_BLOCK_SIZE) * stride_ks + kv_head * stride_kh
            kv_mask = key_valid[None, :] & d_valid[:, None]
            k = tl.load(K + slot_offset[None, :] + offs_d[:, None], mask=kv_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
            if DOT_FP32:
                scores = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, k) * scale  # [BLOCK_M, BLOCK_N]

            visible = offs_n[None, :] <= query_index[:, None]
            if HAS_TREE:
                tree_start = context_len - tree_size
                in_tree = (query_index[:, None] >= tree_start) & (offs_n[None, :] >= tree_start) & key_valid[None, :]
                tree_rows = TreeMask + (seq * tree_size + query_index[:, None] - tree_start) * tree_size  # its mask's
                tree_bit = tl.load(tree_rows + (offs_n[None, :] - tree_start), mask=in_tree & row_valid[:, None],
                                   other=0)
                visible = tl.where(in_tree, tree_bit != 0, visible)
            scores = tl.where(visible & key_valid[None, :], scores, float("-inf"))

            new_max = tl.maximum(running_max, tl.max(scores, 1))
            # a row that has seen no visible key yet keeps max -inf; subtract 0 instead to avoid inf - inf
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            probs = tl.exp(scores - safe_max[:, None])
            rescale = tl.exp(running_max - safe_max)
            # v: [BLOCK_N, BLOCK_D]
            v = tl.load(V + slot_offset[:, None] + offs_d[None, :], mask=tl.trans(kv_mask), other=0.0)
            running_sum = running_sum * rescale + tl.sum(probs, 1)
            if DOT_FP32:
                acc = acc * rescale[:, None] + tl.dot(probs, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v)
            running_max = new_max

        seen = running_sum > 0.0
        out = acc / tl.where(seen, running_sum, 1.0)[:, None]
        lse = tl.where(seen, running_max + tl.log(tl.where(seen, running_sum, 1.0)), float("-inf"))
        rows = query_start + offs_m
        tl.store(Out + split * stride_os + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
        tl.store(Lse + split * stride_ls + rows * stride_lt + head, lse, mask=row_valid)


def combine_splits(partial: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """partial [num_splits, num_tokens, num_heads, head_dim], each split's softmax-normalised output;
    lse [num_splits, num_tokens, num_heads] its log-sum-exp. Returns the output over all keys."""
    weights = torch.exp(lse - lse.amax(dim=0))  # [num_splits, num_tokens, num_heads]; empty splits weigh 0
    return (weights[..., None] * partial).sum(dim=0) / weights.sum(dim=0)[..., None]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: ForwardContext,
                    scale: float, num_splits: int | None = None) -> torch.Tensor:
    """Attention of q [num_tokens, num_heads, head_dim] over the paged cache (K/V already stored).
    num_splits None: split the keys only when there are too few programs to fill the device."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    block_m = DECODE_BLOCK_M if ctx.max_query_len <= DECODE_BLOCK_M else PREFILL_BLOCK_M
    num_tiles = triton.cdiv(ctx.max_query_len, block_m)
    if num_splits is None:
        num_programs = ctx.num_seqs * num_tiles * num_heads
        target = torch.cuda.get_device_properties(q.device).multi_processor_count * 2 if q.is_cuda else 1
        num_splits = max(1, min(triton.cdiv(target, num_programs), ctx.max_context_len // MIN_KEYS_PER_SPLIT))
    keys_per_split = triton.cdiv(triton.cdiv(ctx.max_context_len, num_splits), BLOCK_N) * BLOCK_N
    if num_splits == 1:
        out = torch.empty_like(q)
        partial = out[None]  # [1, num_tokens, num_heads, head_dim]
    else:
        partial = torch.empty(num_splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
    tree_mask = None if ctx.tree_mask is None else ctx.tree_mask.contiguous()
    _paged_attention_kernel[(ctx.num_seqs, num_tiles, num_heads * num_splits)](
        q, k_cache, v_cache, partial, lse, ctx.block_tables, ctx.query_start_loc, ctx.context_lens,
        tree_mask if tree_mask is not None else lse,  # any pointer will do when HAS_TREE is off
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), ctx.block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        scale, num_splits, keys_per_split, 0 if tree_mask is None else tree_mask.shape[-1],
        GROUP=num_heads // num_kv_heads, KV_BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        # fp32 queries get exact fp32 products (over a 16-bit cache too); so do bf16/fp16 ones in the interpreter,
        # whose tl.dot mishandles them (numpy has no bf16)
        HAS_TREE=tree_mask is not None, DOT_FP32=q.dtype == torch.float32 or triton.knobs.runtime.interpret,
    )
    if num_splits == 1:
        return out
    return combine_splits(partial, lse).to(q.dtype)


class TritonAttention:
    """The Triton kernel as an attention backend; same contract as the reference backend."""

    name = "triton"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, ctx: ForwardContext, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        return paged_attention(q, k_cache, v_cache, ctx, scale)
