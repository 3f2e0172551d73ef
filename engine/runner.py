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
        """Build every tensor of the step at once. Python work is per sequence and per KV block; per-token
        lists are made by range() in C and turned into tensors in one go."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        context_lens: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            # cache index (= position) of the first new token; a prefix adapter's virtual tokens come first
            start = seq.num_virtual_tokens + seq.num_computed_tokens
            end = start + n
            input_ids += seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n]
            positions += range(start, end)
            for block in range(start // bs, (end - 1) // bs + 1):
                offset = seq.block_table[block] * bs - block * bs  # cache index -> slot within this block
                slot_mapping += range(offset + max(start, block * bs), offset + min(end, (block + 1) * bs))
            context_lens.append(end)
        write_virtual_tails(batch.seqs, self.kv_cache)
        max_blocks = max(len(seq.block_table) for seq in batch.seqs)
        block_tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in batch.seqs]
        query_lens = batch.num_new_tokens
        query_start_loc = [0, *accumulate(query_lens)]
        sampling_seqs = [i for i in range(len(batch)) if batch.samples(i)]
        lora = lora_batch(batch.seqs, query_lens)  # None when no sequence uses a LoRA

        def tensor(values: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        ctx = ForwardContext(
            positions=tensor(positions),
            slot_mapping=tensor(slot_mapping),
            query_start_loc=tensor(query_start_loc, torch.int32),
            context_lens=tensor(context_lens, torch.int32),
            block_tables=tensor(block_tables, torch.int32),
            query_lens_cpu=list(query_lens),
            context_lens_cpu=context_lens,
            lora=None if lora is None else lora.to(self.device),
        )
        sample_rows = tensor([query_start_loc[i + 1] - 1 for i in sampling_seqs])
        return StepInputs(tensor(input_ids), ctx, sample_rows, sampling_seqs)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Final hidden states of all rows, [num_tokens, hidden]."""
        with forward_context(inputs.ctx):
            return self.model(inputs.input_ids, inputs.ctx.positions)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden[rows])
