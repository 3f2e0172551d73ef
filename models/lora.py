"""LoRA, unmerged, as the model computes it: each projection linear is wrapped once, and the wrapper adds
x·Aᵀ·Bᵀ·scale per token from stacked per-slot A/B, so one batch mixes several adapters and the base model.
Reading PEFT files and choosing slots is the engine's (engine.adapters)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.context import LoRABatch, get_forward_context
from models.parallel import Split
from models.quant import MixedQuantizedLinear, QuantizedLinear

# the HF projections a LoRA may target; q/k/v and gate/up live in packed linears (models.layers.PackedLinear)
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRATarget:
    """A model linear that LoRA can wrap; `shards` maps each HF projection to its (first row, rows) of the output.
    The sizes are the whole layer's (an adapter's); `split` says which part of it a tensor-parallel rank holds."""

    in_features: int
    out_features: int
    shards: dict[str, tuple[int, int]]
    split: Split | None = None


def lora_targets(model: nn.Module) -> dict[str, LoRATarget]:
    """Module path -> target, for the unwrapped model."""
    leaves = {model.packed_modules.get(p, p) for p in LORA_PROJECTIONS}
    targets = {}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in leaves and isinstance(module, (nn.Linear, QuantizedLinear, MixedQuantizedLinear)):
            split = getattr(module, "split", None)
            whole = module if split is None else split
            shards = getattr(whole, "shards", None) or {leaf: (0, whole.out_features)}
            targets[name] = LoRATarget(whole.in_features, whole.out_features, dict(shards), split)
    return targets


class LoRALinear(nn.Module):
    """base(x) plus, for the rows of each LoRA slot s, x·A[s]ᵀ·B[s]ᵀ·scale.

    Invariant: a slot's rows of A and Bᵀ are rank-major (row i * num_shards + k is rank i of shard k,
    and only shard k's output columns of that Bᵀ row are non-zero), so an adapter of rank r uses the
    first slot_rows[s] = r * num_shards rows (0 where it leaves this module alone); the rest are zero,
    and the scale is folded into Bᵀ. On a tensor-parallel rank (target.split), A and Bᵀ are the rank's part:
    a column-parallel base keeps its columns of Bᵀ, a row-parallel one its columns of A, so the LoRA output
    is split (or summed by the all-reduce) exactly as the base's."""

    def __init__(self, base: nn.Linear, target: LoRATarget, num_slots: int, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.split = target.split
        self.num_shards = len(target.shards)
        # (first output column, columns) of each shard in this module's output
        self.shard_columns = list(target.shards.values())
        if self.split is not None and self.split.kind == "column":  # this rank's part of each shard
            sizes = [self.split.tp.share(size)[1] for _, size in self.shard_columns]
            self.shard_columns = [(sum(sizes[:k]), size) for k, size in enumerate(sizes)]
        # a quantized base (models.quant.QuantizedLinear) keeps uint8 blocks, and a half one may run under fp32
        # activations (models.layers.Linear.dtype): LoRA computes in the activations' dtype
        activations = getattr(base, "dtype", None)
        like = dict(dtype=base.weight.dtype if activations is None else activations, device=base.weight.device)
        rows = max_rank * self.num_shards
        self.register_buffer("lora_a", torch.zeros(num_slots, rows, base.in_features, **like), persistent=False)
        self.register_buffer("lora_bt", torch.zeros(num_slots, rows, base.out_features, **like), persistent=False)
        self.slot_rows = [0] * num_slots
        # the active slots' stacked weights, kept while the same slots stay active (decode steps)
        self._stacked: tuple[tuple[int, ...], tuple[torch.Tensor, torch.Tensor] | None] | None = None
        self._active: tuple[tuple[int, ...], tuple[torch.Tensor, torch.Tensor] | None] | None = None  # active_weights'

    # the base layer's parameters, for kernels that skip the wrapper when no LoRA row is in the step
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def kernel_weight(self) -> torch.Tensor:
        return self.base.kernel_weight

    @property
    def qtype(self) -> int:
        return self.base.qtype

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ctx = get_forward_context()
        if ctx is None or ctx.lora is None:
            return out
        lora = ctx.lora
        weights = self._stack(lora)
        if weights is None:  # no active adapter touches this module
            return out
        a_t, bt = weights  # [num_slots, in, k], [num_slots, k, out]
        grid = x if lora.grid_rows is None else x[lora.grid_rows]
        grid = grid.view(len(lora.slots), lora.max_len, -1)  # [num_slots, max_len, in]
        delta = torch.bmm(torch.bmm(grid, a_t), bt).flatten(0, 1)  # [num_slots * max_len, out]
        if lora.grid_rows is None:
            return out.add_(delta)
        if lora.valid is not None:
            delta = delta[lora.valid]  # [num_lora_tokens, out]
        return out.index_add_(0, lora.rows, delta)

    def active_weights(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A and Bᵀ of every slot [num_slots, k, in/out], cut to the k rows that `slots` use (None: no such
        slot adapts this module): what the CPU decode kernels take."""
        if self._active is None or self._active[0] != slots:
            k = max(self.slot_rows[s] for s in slots)
            self._active = (slots, (self.lora_a[:, :k], self.lora_bt[:, :k]) if k else None)
        return self._active[1]

    def _stack(self, lora: LoRABatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._stacked is None or self._stacked[0] != lora.slots:
            weights = self.active_weights(lora.slots)
            if weights is not None:
                a, bt = weights
                weights = (a[lora.slot_index].transpose(1, 2).contiguous(), bt[lora.slot_index].contiguous())
            self._stacked = (lora.slots, weights)
        return self._stacked[1]

    def write_slot(self, slot: int, shards: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Set a slot from (shard, A [r, in], Bᵀ·scale [r, shard columns]) per adapted shard, of the whole layer."""
        self.lora_a[slot].zero_()
        self.lora_bt[slot].zero_()
        a_rows = self.lora_a[slot].view(-1, self.num_shards, self.lora_a.shape[-1])  # [max_rank, num_shards, in]
        bt_rows = self.lora_bt[slot].view(-1, self.num_shards, self.lora_bt.shape[-1])  # [max_rank, num_shards, out]
        for shard, a, bt in shards:
            if self.split is not None:  # this rank's part
                if self.split.kind == "column":
                    bt = bt[:, self.split.tp.part(bt.shape[1])]
                else:
                    a = a[:, self.split.tp.part(a.shape[1])]
            first, size = self.shard_columns[shard]
            a_rows[:a.shape[0], shard] = a
            bt_rows[:a.shape[0], shard, first:first + size] = bt
        self.slot_rows[slot] = max((a.shape[0] for _, a, _ in shards), default=0) * self.num_shards
        self._stacked = self._active = None


def install_lora(model: nn.Module, targets: dict[str, LoRATarget], num_slots: int,
                 max_rank: int) -> dict[str, LoRALinear]:
    """Wrap every target linear in place; returns the wrappers by module path. All or nothing: the wrappers (and
    their slots' memory) are made before the first one replaces its linear."""
    wrappers = {path: LoRALinear(model.get_submodule(path), target, num_slots, max_rank)
                for path, target in targets.items()}
    for path, wrapper in wrappers.items():
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, wrapper)
    return wrappers
