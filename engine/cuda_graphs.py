"""Decode steps on CUDA replayed from captured CUDA graphs.

A decode step of a small model is hundreds of small kernels, and launching them from Python costs more than
the GPU's work: on an H200, a 1.1B model decoded eagerly at 5% of its memory bandwidth. A graph launches
them all at once (there: 5.8x the eager steps at batch 1, 4.4-5x at batch 8 and 32). One graph is captured
per padded batch size; a step of n sequences, each adding one token, replays the graph of the smallest
captured size >= n.

What varies between steps lives in device buffers that the graphs read (token ids, positions, slots, block
tables, context lengths), and the Triton attention kernel plans its grid for the longest context the engine
allows: keys past a sequence's length are never read, so a shorter context only leaves programs idle."""
from __future__ import annotations

import torch

from models.context import ForwardContext, forward_context

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    """Captured decode forwards of `model`. Invariant: every graph reads the static buffers below and writes its
    own output; rows n..size of a padded step are copies of row 0 (token, position, slot, block table, context),
    so they compute row 0's K/V and store it in row 0's slot, which changes nothing."""

    def __init__(self, model: torch.nn.Module, device: torch.device, max_num_seqs: int, max_model_len: int,
                 block_size: int) -> None:
        self.model, self.max_model_len = model, max_model_len
        self.sizes = [s for s in BATCH_SIZES if s < max_num_seqs] + [max_num_seqs]
        n, max_blocks = self.sizes[-1], -(-max_model_len // block_size)

        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids, self.positions, self.slot_mapping, self.prompt_lens = zeros(n), zeros(n), zeros(n), zeros(n)
        self.context_lens = zeros(n, dtype=torch.int32) + 1
        self.block_tables = zeros(n, max_blocks, dtype=torch.int32)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        self._capture()

    def _context(self, size: int) -> ForwardContext:
        # the attention kernel plans for the longest context allowed (context_lens_cpu); the buffers hold the step's
        return ForwardContext(positions=self.positions[:size], slot_mapping=self.slot_mapping[:size],
                              query_start_loc=self.query_start_loc[:size + 1], context_lens=self.context_lens[:size],
                              block_tables=self.block_tables[:size], query_lens_cpu=[1] * size,
                              context_lens_cpu=[self.max_model_len] * size, prompt_lens=self.prompt_lens[:size])

    @torch.inference_mode()
    def _capture(self) -> None:
        """Largest first, so that the smaller graphs reuse its memory. The capture's own run writes slot 0 of the
        cache; no sequence holds a block yet."""
        pool = None
        for size in reversed(self.sizes):
            ctx = self._context(size)
            with forward_context(ctx):
                self.model(self.input_ids[:size], ctx.positions)  # warm-up: Triton compiles outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self.model(self.input_ids[:size], ctx.positions)
            self.graphs[size] = graph
            pool = graph.pool()

    def takes(self, input_ids: torch.Tensor, ctx: ForwardContext) -> bool:
        """A step of one new token per sequence, without LoRA or a tree, that fits the captured sizes."""
        return (ctx.tree_mask is None and ctx.lora is None and ctx.prompt_lens is not None
                and len(input_ids) == ctx.num_seqs <= self.sizes[-1] and ctx.max_context_len <= self.max_model_len
                and ctx.block_tables.shape[1] <= self.block_tables.shape[1])

    def replay(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The step's final hidden states [n, hidden]: a view of the graph's output, valid until the next replay."""
        n = ctx.num_seqs
        size = next(s for s in self.sizes if s >= n)
        for buffer, values in ((self.input_ids, input_ids), (self.positions, ctx.positions),
                               (self.slot_mapping, ctx.slot_mapping), (self.context_lens, ctx.context_lens),
                               (self.prompt_lens, ctx.prompt_lens)):
            buffer[:n] = values
            if size > n:
                buffer[n:size] = values[0]
        self.block_tables[:n, :ctx.block_tables.shape[1]] = ctx.block_tables
        if size > n:
            self.block_tables[n:size] = self.block_tables[0]
        self.graphs[size].replay()
        self.num_replays += 1
        return self.outputs[size][:n]
