"""ForwardContext: everything a forward pass needs to know about the step besides the token ids.

The runner builds one per step and installs it with `forward_context(ctx)`; attention layers read it
with `get_forward_context()`. Outside such a scope the model runs as a plain causal LM over a
[batch, seq] tensor with no KV cache (training, oracles)."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from engine.adapters.lora import LoRABatch


@dataclass
class ForwardContext:
    """Step metadata. Invariant: sequence i owns query rows query_start_loc[i]:query_start_loc[i+1], and
    after this step its cache holds context_lens[i] tokens, the last of which are those query rows."""

    positions: torch.Tensor  # [num_tokens] absolute RoPE positions
    slot_mapping: torch.Tensor  # [num_tokens] int64 cache slot (block_id * block_size + offset) per token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32 prefix sums of query lengths
    context_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    query_lens_cpu: list[int]  # host copies, so kernels can plan without a device sync
    context_lens_cpu: list[int]
    # Medusa verification: [T, T] bool over the last T query rows of every sequence (row i may see
    # tree node j iff tree_mask[i, j]); those rows also see the whole cached past. None: plain causal.
    tree_mask: torch.Tensor | None = None
    # LoRA: the step's token rows grouped by adapter slot; None when no sequence uses a LoRA
    lora: LoRABatch | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens_cpu)


_current: ContextVar[ForwardContext | None] = ContextVar("gorgon_forward_context", default=None)


def get_forward_context() -> ForwardContext | None:
    return _current.get()


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
