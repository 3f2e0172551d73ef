"""What the trainings share: the learning-rate curve, random windows of a token stream, and the Medusa heads'
loss weights and their loss on whole windows (joint training in default_model.py; train-medusa trains on
cached hidden states instead)."""
from __future__ import annotations

import argparse
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.kernels.decode import bf16_gemm
from models.medusa import MedusaHeads

HEAD_OFFSET = 2  # Medusa head k at token i predicts token i + HEAD_OFFSET + k (the base model predicts i + 1)


def positive_int(text: str) -> int:
    """argparse's type for a count that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def matmuls_in_bf16() -> contextlib.AbstractContextManager:
    """bf16 autocast for the matmuls over fp32 master weights where this CPU multiplies bf16 natively (AVX512-BF16
    or AMX); elsewhere fp32: there torch's bf16 GEMM runs at a few percent of its fp32 one (a training step 10-40x
    slower on an AVX2-only Zen 3)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16_gemm() else contextlib.nullcontext()


def cosine(progress: float) -> float:
    """From 1 at progress 0 down to 0 at progress 1 (and after), along half a cosine."""
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def random_windows(tokens: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """batch_size windows [batch_size, length] of the token stream, at random places."""
    starts = torch.randint(0, len(tokens) - length, (batch_size,), generator=generator)
    return torch.stack([tokens[s:s + length] for s in starts.tolist()]).long()


def head_weights(num_heads: int) -> torch.Tensor:
    """Head k's loss counts 0.8^k: later heads are right less often, and only pay when the earlier ones are."""
    return 0.8 ** torch.arange(num_heads, dtype=torch.float32)


def head_losses(heads: MedusaHeads, model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each head on windows ids [B, S] with base hidden states [B, S, hidden] -> [K]."""
    logits = heads(hidden, model.compute_logits)  # [K, B, S, V]
    losses = []
    for k in range(heads.config.num_heads):
        shift = HEAD_OFFSET + k
        losses.append(F.cross_entropy(logits[k, :, :-shift].flatten(0, 1), ids[:, shift:].flatten()))
    return torch.stack(losses)
