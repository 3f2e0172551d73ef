"""ForwardContext: everything a forward pass needs to know about the step besides the token ids,
including the step's LoRA rows (LoRABatch).

The runner builds one per step and installs it with `forward_context(ctx)`; attention layers read it
with `get_forward_context()`. Outside such a scope the model runs as a plain causal LM over a
[batch, seq] tensor with no KV cache (training, oracles)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass
class LoRABatch:
    """The step's LoRA work as a grid: row i holds the token rows of slots[i], padded to max_len by
    repeating one of them. Invariant: grid position valid[j] holds token row rows[j]; each LoRA token
    appears in exactly one valid position. The common cases skip work: grid_rows None means the grid
    is every token row in order (one slot), valid None means there is no padding (rows = grid_rows)."""

    slots: tuple[int, ...]
    max_len: int
    slot_index: torch.Tensor  # [num_slots] the slots, to gather their weights
    grid_rows: torch.Tensor | None  # [num_slots * max_len] the token row at each grid position
    valid: torch.Tensor | None  # [num_lora_tokens] grid positions of real tokens
    rows: torch.Tensor  # [num_lora_tokens] their token rows
    token_slots: torch.Tensor  # [num_tokens] each token row's slot, -1 for the base model (what CPU kernels take)

    def to(self, device: torch.device) -> LoRABatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return LoRABatch(self.slots, self.max_len, move(self.slot_index), move(self.grid_rows), move(self.valid),
                         move(self.rows), move(self.token_slots))


def lora_batch(seq_slots: list[int], query_lens: list[int]) -> LoRABatch | None:
    """Group the step's token rows by LoRA slot (seq_slots[i]: sequence i's slot, -1 for none; a sequence's
    rows are consecutive); None without LoRA."""
    slot_rows: dict[int, list[int]] = {}
    token_slots: list[int] = []
    start = 0
    for slot, n in zip(seq_slots, query_lens):
        if slot >= 0:
            slot_rows.setdefault(slot, []).extend(range(start, start + n))
        token_slots += [slot] * n
        start += n
    if not slot_rows:
        return None
    max_len = max(map(len, slot_rows.values()))
    grid_rows, valid, rows = [], [], []
    for i, slot_tokens in enumerate(slot_rows.values()):
        grid_rows += slot_tokens + slot_tokens[:1] * (max_len - len(slot_tokens))
        valid += range(i * max_len, i * max_len + len(slot_tokens))
        rows += slot_tokens
    slots = tuple(slot_rows)
    every_row = len(slots) == 1 and len(rows) == start
    return LoRABatch(slots, max_len, torch.tensor(slots), None if every_row else torch.tensor(grid_rows),
                     None if len(valid) == len(grid_rows) else torch.tensor(valid), torch.tensor(rows),
                     torch.tensor(token_slots))


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
    # Medusa verification: [num_seqs, T, T] bool over each sequence's last T cache entries (entry i may see entry j
    # iff tree_mask[s, i, j]); they see every entry before them. A sequence that verifies no tree has the causal
    # (lower-triangular) mask there, so one forward runs trees beside prefill and plain decode. None: all causal.
    tree_mask: torch.Tensor | None = None
    # LoRA: the step's token rows grouped by adapter slot; None when no sequence uses a LoRA
    lora: LoRABatch | None = None
    # [num_seqs] int64 cache entries of each sequence's prompt, virtual tokens included (what dynamic NTK RoPE
    # scales prompt tokens to); None outside the engine
    prompt_lens: torch.Tensor | None = None

    def to(self, device: torch.device) -> ForwardContext:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return ForwardContext(move(self.positions), move(self.slot_mapping), move(self.query_start_loc),
                              move(self.context_lens), move(self.block_tables), self.query_lens_cpu,
                              self.context_lens_cpu, move(self.tree_mask),
                              None if self.lora is None else self.lora.to(device), move(self.prompt_lens))

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
