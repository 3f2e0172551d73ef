"""What both Medusa trainings use: the heads' loss weights and their loss on whole windows (joint training in
default_model.py; train-medusa trains on cached hidden states instead)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.medusa import MedusaHeads


def head_weights(num_heads: int) -> torch.Tensor:
    """Head k's loss counts 0.8^k: later heads are right less often, and only pay when the earlier ones are."""
    return 0.8 ** torch.arange(num_heads, dtype=torch.float32)


def head_losses(heads: MedusaHeads, model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each head on windows ids [B, S] with base hidden states [B, S, hidden] -> [K]."""
    logits = heads(hidden, model.compute_logits)  # [K, B, S, V]
    losses = []
    for k in range(heads.config.num_heads):
        shift = k + 2  # head k at token i predicts token i + 2 + k
        losses.append(F.cross_entropy(logits[k, :, :-shift].flatten(0, 1), ids[:, shift:].flatten()))
    return torch.stack(losses)
