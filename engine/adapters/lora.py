"""LoRA, unmerged: each projection linear is wrapped once, and the wrapper adds x·Aᵀ·Bᵀ·scale per token
from stacked per-slot A/B, so one batch mixes several adapters and the base model."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.context import get_forward_context

# the HF projections a LoRA may target; q/k/v and gate/up live in packed linears (models.layers.PackedLinear)
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"base_model\.model\.(?P<parent>.+)\.(?P<proj>[a-z_]+)\.lora_(?P<ab>[AB])\.weight")


class LoRAFormatError(ValueError):
    pass


@dataclass
class LoRATarget:
    """A model linear that LoRA can wrap; `shards` maps each HF projection to its (first row, rows) of the output."""

    in_features: int
    out_features: int
    shards: dict[str, tuple[int, int]]


def lora_targets(model: nn.Module) -> dict[str, LoRATarget]:
    """Module path -> target, for the unwrapped model."""
    leaves = {model.packed_modules.get(p, p) for p in LORA_PROJECTIONS}
    targets = {}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in leaves and isinstance(module, nn.Linear):
            shards = getattr(module, "shards", None) or {leaf: (0, module.out_features)}
            targets[name] = LoRATarget(module.in_features, module.out_features, dict(shards))
    return targets


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

    def to(self, device: torch.device) -> "LoRABatch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return LoRABatch(self.slots, self.max_len, move(self.slot_index), move(self.grid_rows), move(self.valid),
                         move(self.rows), move(self.token_slots))


def lora_batch(seqs: list, query_lens: list[int]) -> LoRABatch | None:
    """Group the step's token rows by LoRA slot (a sequence's rows are consecutive); None without LoRA."""
    slot_rows: dict[int, list[int]] = {}
    token_slots: list[int] = []
    start = 0
    for seq, n in zip(seqs, query_lens):
        slot = -1 if seq.adapter is None else seq.adapter.slot
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


class LoRALinear(nn.Module):
    """base(x) plus, for the rows of each LoRA slot s, x·A[s]ᵀ·B[s]ᵀ·scale.

    Invariant: a slot's rows of A and Bᵀ are rank-major (row i * num_shards + k is rank i of shard k,
    and only shard k's output columns of that Bᵀ row are non-zero), so an adapter of rank r uses the
    first slot_rows[s] = r * num_shards rows (0 where it leaves this module alone); the rest are zero,
    and the scale is folded into Bᵀ."""

    def __init__(self, base: nn.Linear, target: LoRATarget, num_slots: int, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.num_shards = len(target.shards)
        self.shard_columns = list(target.shards.values())  # (first output column, columns) of each shard
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        rows = max_rank * self.num_shards
        self.register_buffer("lora_a", torch.zeros(num_slots, rows, target.in_features, **like), persistent=False)
        self.register_buffer("lora_bt", torch.zeros(num_slots, rows, target.out_features, **like), persistent=False)
        self.slot_rows = [0] * num_slots
        # the active slots' stacked weights, kept while the same slots stay active (decode steps)
        self._stacked: tuple[tuple[int, ...], tuple[torch.Tensor, torch.Tensor] | None] | None = None
        self._active: tuple[tuple[int, ...], tuple[torch.Tensor, torch.Tensor] | None] | None = None  # active_weights'

    # the base layer's parameters, for kernels that skip the wrapper when no LoRA row is in the step
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

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
        """Set a slot from (shard, A [r, in], Bᵀ·scale [r, shard columns]) per adapted shard."""
        self.lora_a[slot].zero_()
        self.lora_bt[slot].zero_()
        a_rows = self.lora_a[slot].view(-1, self.num_shards, self.lora_a.shape[-1])  # [max_rank, num_shards, in]
        bt_rows = self.lora_bt[slot].view(-1, self.num_shards, self.lora_bt.shape[-1])  # [max_rank, num_shards, out]
        for shard, a, bt in shards:
            first, size = self.shard_columns[shard]
            a_rows[:a.shape[0], shard] = a
            bt_rows[:a.shape[0], shard, first:first + size] = bt
        self.slot_rows[slot] = max((a.shape[0] for _, a, _ in shards), default=0) * self.num_shards
        self._stacked = self._active = None


def install_lora(model: nn.Module, targets: dict[str, LoRATarget], num_slots: int,
                 max_rank: int) -> dict[str, LoRALinear]:
    """Wrap every target linear in place; returns the wrappers by module path."""
    wrappers = {}
    for path, target in targets.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        wrappers[path] = LoRALinear(getattr(parent, leaf), target, num_slots, max_rank)
        setattr(parent, leaf, wrappers[path])
    return wrappers


def lora_scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_lora(weights_file: Path, config: dict, model: nn.Module,
              targets: dict[str, LoRATarget]) -> dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """PEFT LoRA tensors, checked -> module path -> [(shard, A, Bᵀ·scale)], as LoRALinear.write_slot takes them."""
    r, scale = config["r"], lora_scale(config)
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    with safe_open(weights_file, framework="pt", device="cpu") as f:
        for key in f.keys():
            m = _KEY.fullmatch(key)
            if m is None or m["proj"] not in LORA_PROJECTIONS:
                raise LoRAFormatError(f"unexpected tensor {key!r}: gorgon applies LoRA to the "
                                      f"{'/'.join(LORA_PROJECTIONS)} projections only")
            path = f"{m['parent']}.{model.packed_modules.get(m['proj'], m['proj'])}"
            if path not in targets:
                raise LoRAFormatError(f"tensor {key!r} names a module that this model does not have")
            pairs.setdefault((path, m["proj"]), {})[m["ab"]] = f.get_tensor(key)
    if not pairs:
        raise LoRAFormatError("the adapter has no LoRA tensors")
    staged: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for (path, proj), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoRAFormatError(f"{path} ({proj}) has lora_{next(iter(ab))} but not its partner")
        target = targets[path]
        size = target.shards[proj][1]
        a, b = ab["A"], ab["B"]
        if a.shape != (r, target.in_features) or b.shape != (size, r):
            raise LoRAFormatError(f"{proj} of {path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit; "
                                  f"expected ({r}, {target.in_features}) and ({size}, {r})")
        staged.setdefault(path, []).append((list(target.shards).index(proj), a, b.float().T * scale))
    return staged
