"""ModelRunner: a scheduled batch -> step tensors + ForwardContext -> model -> logits of the sampling rows."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from engine.adapters.lora import lora_batch
from engine.adapters.prefix import write_virtual_tails
from engine.attention import get_backend
from engine.context import ForwardContext, forward_context
from engine.kv_cache import KVCache
from engine.scheduler import ScheduledBatch


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    ctx: ForwardContext
    sample_rows: torch.Tensor  # [num_sampling_seqs] row of each sampling sequence's last token
    sampling_seqs: list[int]  # batch indices of the sequences that sample this step


class ModelRunner:
    """Owns the model, its KV cache and the attention backend; runs one forward per step."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, attention_backend: str, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size
        self.backend = get_backend(attention_backend, device)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.k_cache = kv_cache.k(i)
            layer.self_attn.v_cache = kv_cache.v(i)
            layer.self_attn.backend = self.backend

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Build every tensor of the step at once; Python work is per sequence, tensor work per token."""
        # cache index (= position) of each sequence's first new token; a prefix adapter's virtual tokens come first
        starts = [seq.num_virtual_tokens + seq.num_computed_tokens for seq in batch.seqs]
        query_lens = batch.num_new_tokens
        context_lens = [s + n for s, n in zip(starts, query_lens)]
        input_ids: list[int] = []
        for seq, n in zip(batch.seqs, query_lens):
            input_ids.extend(seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n])
        write_virtual_tails(batch.seqs, self.kv_cache)
        max_blocks = max(len(seq.block_table) for seq in batch.seqs)
        block_tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in batch.seqs]

        to_device = dict(device=self.device, non_blocking=True)
        query_lens_t = torch.tensor(query_lens, dtype=torch.int32)
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        torch.cumsum(query_lens_t, 0, out=query_start_loc[1:])
        num_tokens = len(input_ids)
        # position of each token: its row index minus its sequence's first row, plus the sequence's start
        row_offset = torch.tensor(starts, dtype=torch.int64) - query_start_loc[:-1]
        positions = torch.arange(num_tokens) + row_offset.repeat_interleave(query_lens_t, output_size=num_tokens)
        seq_index = torch.arange(len(query_lens)).repeat_interleave(query_lens_t, output_size=num_tokens)
        block_tables_t = torch.tensor(block_tables, dtype=torch.int32)
        slot_mapping = block_tables_t[seq_index, positions // self.block_size] * self.block_size + positions % self.block_size
        lora = lora_batch(batch.seqs, query_lens)  # None when no sequence uses a LoRA

        sampling_seqs = [i for i in range(len(batch)) if batch.samples(i)]
        row_ends = list(accumulate(query_lens))
        sample_rows = torch.tensor([row_ends[i] - 1 for i in sampling_seqs])
        ctx = ForwardContext(
            positions=positions.to(**to_device),
            slot_mapping=slot_mapping.to(**to_device),
            query_start_loc=query_start_loc.to(**to_device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32).to(**to_device),
            block_tables=block_tables_t.to(**to_device),
            query_lens_cpu=list(query_lens),
            context_lens_cpu=context_lens,
            adapter_index=None if lora is None else lora.seq_slots[seq_index].to(**to_device),
            lora=None if lora is None else lora.to(self.device),
        )
        return StepInputs(torch.tensor(input_ids).to(**to_device), ctx, sample_rows.to(**to_device), sampling_seqs)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Final hidden states of all rows, [num_tokens, hidden]."""
        with forward_context(inputs.ctx):
            return self.model(inputs.input_ids, inputs.ctx.positions)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden[rows])
