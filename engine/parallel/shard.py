"""RankShard: what one rank of a tensor-parallel engine holds, and the calls it answers."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.attention import get_backend
from engine.config import EngineConfig
from engine.kv_cache import KVCache
from models.context import ForwardContext, forward_context
from models.kernels.decode import load_decode_kernels, set_decode_kernels
from models.loader import load_model
from models.lora import LoRALinear, install_lora, lora_targets
from models.parallel import TensorParallel, gather_embedding, gather_lm_head, shard_model


class RankShard:
    """One rank's share of a tensor-parallel engine: its model shard (models.parallel), its KV heads of every
    cache block, and its LoRA wrappers. Rank 0 runs it behind the Driver, the other ranks in worker.serve.
    Invariant: every rank receives the same calls, in the same order, with the same arguments (which always
    describe the whole model: all KV heads, whole LoRA matrices), so the collectives inside them pair up."""

    def __init__(self, config: EngineConfig, path: Path, tp: TensorParallel, device: torch.device) -> None:
        self.config, self.tp, self.device = config, tp, device
        # the whole checkpoint is read, and only this rank's parts are kept
        model = load_model(path, config.torch_dtype, device, config.quantization, config.dequantize)
        self.model = shard_model(model, tp)
        self.kernels = load_decode_kernels(self.model, config.batch_invariant) if config.cpu_kernels else None
        set_decode_kernels(self.model, self.kernels, config.packing_budget if self.kernels else None)
        self.kv_cache: KVCache | None = None
        self.lora: dict[str, LoRALinear] = {}  # installed with the first LoRA slot

    # ---- the calls (engine.parallel.driver.Driver.call) ------------------------------------------------
    def allocate(self, num_blocks: int) -> None:
        """This rank's KV cache: its KV heads of num_blocks blocks."""
        c = self.model.config
        self.kv_cache = KVCache(c.num_layers, num_blocks, self.config.block_size, c.num_kv_heads // self.tp.size,
                                c.head_dim, self.config.kv_cache_torch_dtype, self.device)
        self.kv_cache.bind(self.model, get_backend(self.config.attention_backend, self.device))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Final hidden states of all rows (the same on every rank)."""
        ctx = ctx.to(self.device)
        with forward_context(ctx):
            return self.model(input_ids.to(self.device), ctx.positions)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits of these hidden rows on rank 0, None on the others."""
        return self.model.compute_logits(hidden.to(self.device))

    def write_kv(self, slot_ids: list[int], kv: torch.Tensor) -> None:
        """KVCache.write of kv [num_layers, 2, len(slot_ids), num_kv_heads, head_dim]: this rank keeps its heads."""
        self.kv_cache.write(slot_ids, kv[:, :, :, self.tp.part(kv.shape[3])].to(self.device))

    def copy_kv(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.kv_cache.copy(src.to(self.device), dst.to(self.device))

    def write_lora(self, slot: int, weights: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]) -> None:
        """LoRALinear.write_slot of every wrapped linear, from the whole adapter's (shard, A, Bᵀ·scale)."""
        if not self.lora:
            self.lora = install_lora(self.model, lora_targets(self.model), self.config.max_adapters,
                                     self.config.max_lora_rank)
        for path, module in self.lora.items():
            module.write_slot(slot, [(shard, a.to(self.device), bt.to(self.device))
                                     for shard, a, bt in weights.get(path, [])])

    def gather_lm_head(self) -> nn.Module | None:
        """The whole LM head on rank 0 (None on the others): what Medusa's drafting projects onto."""
        return gather_lm_head(self.model.lm_head, self.tp, self.model.config.vocab_size)

    def gather_embedding(self) -> nn.Module | None:
        """The whole token embedding on rank 0 (None on the others): what Hydra heads read of the drafted tokens."""
        return gather_embedding(self.model.model.embed_tokens, self.tp, self.model.config.vocab_size)
