"""ModelRunner: a scheduled batch -> step tensors + ForwardContext -> model -> logits of the sampling rows."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from engine.adapters.prefix import write_virtual_tails
from engine.attention import get_backend
from engine.cuda_graphs import DecodeGraphs
from engine.kv_cache import KVCache, slots
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from models.context import ForwardContext, forward_context, lora_batch

if TYPE_CHECKING:
    from engine.medusa.acceptance import TreeRows
    from engine.parallel import Driver, ShardedKVCache

logger = logging.getLogger("gorgon.engine")

@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    ctx: ForwardContext
    # rows whose logits the step reads: each sampling sequence's last token's, then every tree row (tree_rows)
    sample_rows: torch.Tensor
    sampling_seqs: list[int]  # batch indices of the sequences that sample this step
    # prompt logprobs: batch index -> the rows whose logits score that sequence's next unscored prompt tokens
    # (row r scores the token after row r's)
    prompt_logprob_rows: dict[int, list[int]] = field(default_factory=dict)
    tree_rows: slice | None = None  # the rows of the sequences that verify Medusa trees, after every other's


class ModelRunner:
    """Owns the model, its KV cache and the attention backend; runs one forward per step. Under tensor
    parallelism (`driver`), the forward and the logits are the driver's calls, which every rank makes. With
    `graphs` (CUDA), the decode steps they take replay captured graphs instead of running the model eagerly."""

    graphs: DecodeGraphs | None = None

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache | ShardedKVCache, attention_backend: str,
                 device: torch.device, driver: Driver | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.driver = driver
        self.block_size = kv_cache.block_size
        self.backend = get_backend(attention_backend, device)
        if driver is None:  # each rank's shard (engine.parallel.shard) binds its own
            kv_cache.bind(model, self.backend)

    def capture_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture decode steps as CUDA graphs (engine.cuda_graphs): on CUDA, with the Triton attention kernel (it
        plans its grid without reading the step's lengths), in this process (no tensor parallelism)."""
        if self.device.type == "cuda" and self.backend.name == "triton" and self.driver is None:
            self.graphs = DecodeGraphs(self.model, self.device, max_num_seqs, max_model_len, self.block_size)
        elif self.device.type == "cuda" and self.driver is not None:
            logger.warning("decode steps run eagerly under tensor parallelism: CUDA graphs are captured in one "
                           "process only")

    def prepare(self, batch: ScheduledBatch, trees: TreeRows | None = None) -> StepInputs:
        """The step's inputs: each sequence's next num_new_tokens tokens, at consecutive positions; then the rows of
        the Medusa trees that batch.tree_seqs verify (`trees`), each under its own mask."""
        input_ids: list[int] = []
        positions: list[int] = []
        spans: list[tuple[int, int]] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            # cache index (= position) of the first new token; a prefix adapter's virtual tokens come first
            start = seq.num_virtual_tokens + seq.num_computed_tokens
            input_ids += seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n]
            positions += range(start, start + n)
            spans.append((start, start + n))
        write_virtual_tails(batch.seqs, self.kv_cache)
        sampling_seqs = [i for i in range(len(batch)) if batch.samples(i)]
        row_ends = list(accumulate(batch.num_new_tokens))
        seqs, tree_mask, num_rows = batch.seqs, None, len(input_ids)
        sample_rows = [row_ends[i] - 1 for i in sampling_seqs]
        if trees is not None:
            seqs = batch.seqs + batch.tree_seqs
            input_ids, positions, spans = input_ids + trees.input_ids, positions + trees.positions, spans + trees.spans
            tree_mask = trees.mask(len(batch.seqs))
            sample_rows += range(num_rows, len(input_ids))
        inputs = self.step_inputs(seqs, input_ids, positions, spans, sample_rows, sampling_seqs, tree_mask)
        if trees is not None:
            inputs.tree_rows = slice(num_rows, len(input_ids))
        for i, (seq, n, row_end) in enumerate(zip(batch.seqs, batch.num_new_tokens, row_ends)):
            if seq.params.prompt_logprobs is None:
                continue
            # token j is scored by row j - 1; tokens scored before a preemption are not scored again
            first_row = row_end - n - seq.num_computed_tokens  # the row of token 0, were it in this step
            tokens = range(max(len(seq.prompt_logprobs), seq.num_computed_tokens + 1),
                           min(seq.num_computed_tokens + n, seq.num_prompt_tokens - 1) + 1)
            if tokens:
                inputs.prompt_logprob_rows[i] = [first_row + j - 1 for j in tokens]
        return inputs

    def step_inputs(self, seqs: list[Sequence], input_ids: list[int], positions: list[int],
                    spans: list[tuple[int, int]], sample_rows: list[int], sampling_seqs: list[int],
                    tree_mask: torch.Tensor | None = None) -> StepInputs:
        """Every tensor of a step, built at once: seqs[i] writes cache entries [start, end) = spans[i] from
        its rows of input_ids/positions (the rows are consecutive, in sequence order). Python work is per
        sequence and per KV block; per-token lists come from range() and become tensors in one go."""
        slot_mapping: list[int] = []
        for seq, (start, end) in zip(seqs, spans):
            slot_mapping += slots(seq.block_table, start, end, self.block_size)
        max_blocks = max(len(seq.block_table) for seq in seqs)
        block_tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in seqs]
        query_lens = [end - start for start, end in spans]
        context_lens = [end for _, end in spans]
        lora = lora_batch([-1 if seq.adapter is None else seq.adapter.slot for seq in seqs], query_lens)

        def tensor(values: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            t = torch.tensor(values, dtype=dtype)
            return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)

        ctx = ForwardContext(
            positions=tensor(positions),
            slot_mapping=tensor(slot_mapping),
            query_start_loc=tensor([0, *accumulate(query_lens)], torch.int32),
            context_lens=tensor(context_lens, torch.int32),
            block_tables=tensor(block_tables, torch.int32),
            query_lens_cpu=query_lens,
            context_lens_cpu=context_lens,
            tree_mask=tree_mask,
            lora=None if lora is None else lora.to(self.device),
            prompt_lens=tensor([seq.num_virtual_tokens + seq.num_prompt_tokens for seq in seqs]),
        )
        return StepInputs(tensor(input_ids), ctx, tensor(sample_rows), sampling_seqs)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Final hidden states of all rows, [num_tokens, hidden]."""
        if self.driver is not None:
            return self.driver.call("forward", inputs.input_ids, inputs.ctx)
        if self.graphs is not None and self.graphs.takes(inputs.input_ids, inputs.ctx):
            return self.graphs.replay(inputs.input_ids, inputs.ctx)
        with forward_context(inputs.ctx):
            return self.model(inputs.input_ids, inputs.ctx.positions)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        if self.driver is not None:
            return self.driver.call("logits", hidden[rows])
        return self.model.compute_logits(hidden[rows])
