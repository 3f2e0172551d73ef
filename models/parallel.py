"""Tensor parallelism at the model layer, in Megatron's layout (as vLLM's): `shard_model` cuts a loaded model down
to one rank's share, and the layers call the collectives of `TensorParallel`.

- q/k/v and gate/up are column-parallel: a rank holds the output rows of its attention heads, its KV heads and
  its share of the intermediate features, so attention and the MLP's activation run on its share alone;
- o_proj and down are row-parallel: a rank holds the matching input columns, and one all-reduce adds the ranks'
  partial outputs (a bias is added once: rank 0 keeps it);
- the embedding and lm_head are split over the vocabulary: a rank looks up the ids it holds (zeros for the
  others) before an all-reduce, and the ranks' parts of the logits are gathered on rank 0, where sampling is.

Quantized weights (models.quant) are cut on whole rows, and on whole blocks within a row. Starting the
processes and feeding them steps is the engine's (engine.parallel)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from torch import nn

from models.config import ModelConfig
from models.layers import Embedding, Linear, PackedLinear, packed_offsets
from models.quant import MixedQuantizedLinear, QuantizedEmbedding, QuantizedLinear, QuantizedWeight


def share(n: int, rank: int, size: int) -> tuple[int, int]:
    """(first, count) of rank's share of n things split over size ranks, as evenly as they allow."""
    first = rank * n // size
    return first, (rank + 1) * n // size - first


@dataclass(frozen=True)
class TensorParallel:
    """One rank's place in a tensor-parallel group over torch.distributed's default process group.
    Invariant: every rank of the group calls the same collectives, in the same order, on tensors of one shape."""

    rank: int
    size: int

    def share(self, n: int) -> tuple[int, int]:
        return share(n, self.rank, self.size)

    def part(self, n: int) -> slice:
        """This rank's share of n things, as a slice."""
        first, count = self.share(n)
        return slice(first, first + count)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def gather(self, x: torch.Tensor, total: int, dim: int = -1) -> torch.Tensor | None:
        """Rank 0: the ranks' parts of dimension `dim` (share(total) each), concatenated; other ranks: None."""
        dim %= x.dim()
        width = -(-total // self.size)  # parts are padded to one width, as gather needs
        padded = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, width - x.shape[dim]]).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(padded, parts, dst=0)
        if self.rank != 0:
            return None
        return torch.cat([part.narrow(dim, 0, share(total, r, self.size)[1]) for r, part in enumerate(parts)], dim=dim)


@dataclass(frozen=True)
class Split:
    """How shard_model cut a linear: "column" (this rank holds share() of each output shard's rows) or "row"
    (share() of the input columns). The sizes are the whole layer's, as a checkpoint or an adapter has them."""

    kind: str
    tp: TensorParallel
    in_features: int
    out_features: int
    shards: dict[str, tuple[int, int]] | None  # a packed layer's output shards -> (first row, rows) in the whole layer


class VocabParallelEmbedding(nn.Module):
    """An embedding of which this rank holds rows [first, first + rows): ids outside them look up zeros, and an
    all-reduce over the ranks completes every row."""

    def __init__(self, embedding: nn.Module, first: int, tp: TensorParallel) -> None:
        super().__init__()
        self.embedding, self.first, self.tp = embedding, first, tp
        self.rows = embedding.weight.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        outside = (local < 0) | (local >= self.rows)
        out = self.embedding(local.masked_fill(outside, 0))
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


def check_shardable(config: ModelConfig, size: int) -> None:
    """A clear error unless the model's heads, KV heads and MLP split evenly over size ranks."""
    counts = {"attention heads": config.num_heads, "KV heads": config.num_kv_heads,
              "intermediate features": config.intermediate_size}
    uneven = {name: n for name, n in counts.items() if n % size}
    if uneven:
        raise ValueError(f"tensor_parallel_size={size} must divide the model's "
                         + ", ".join(f"{name} ({n})" for name, n in uneven.items()))


def shard_model(model: nn.Module, tp: TensorParallel) -> nn.Module:
    """Cut a loaded Llama-family model (models.llama) down to rank tp.rank's share, in place; the full tensors
    are dropped (each kept part is a copy). Layers hold `tp`, and run their collectives in forward."""
    config = model.config
    check_shardable(config, tp.size)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = _column(attn.qkv_proj, tp)
        attn.o_proj = _row(attn.o_proj, tp)
        attn.num_heads, attn.num_kv_heads = config.num_heads // tp.size, config.num_kv_heads // tp.size
        attn.q_size, attn.kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        mlp.gate_up_proj = _column(mlp.gate_up_proj, tp)
        mlp.down_proj = _row(mlp.down_proj, tp)
        mlp.intermediate_size = config.intermediate_size // tp.size
        attn.tp = mlp.tp = tp
    tied = config.tie_word_embeddings
    embedding = model.model.embed_tokens
    first, rows = tp.share(config.vocab_size)
    model.lm_head = _column(model.lm_head, tp)
    if tied and isinstance(embedding, nn.Embedding):
        local = Embedding(rows, config.hidden_size, _weight=model.lm_head.weight, _freeze=True)
    elif tied:  # a quantized tied embedding reads the LM head's blocks
        local = _quantized_embedding(embedding, model.lm_head.weight)
    elif isinstance(embedding, nn.Embedding):
        local = Embedding(rows, config.hidden_size, _weight=embedding.weight[first:first + rows].clone(),
                          _freeze=True)
    else:
        local = _quantized_embedding(embedding, embedding.weight[first:first + rows].clone())
    local.dtype = embedding.dtype  # (the activations')
    model.model.embed_tokens = VocabParallelEmbedding(local, first, tp)
    model.tp = tp
    return model


def _quantized_embedding(embedding: QuantizedEmbedding, data: torch.Tensor) -> QuantizedEmbedding:
    local = QuantizedEmbedding(data.shape[0], embedding.embedding_dim, embedding.qtype, embedding.dtype)
    local.weight = data
    return local


def _column(linear: nn.Module, tp: TensorParallel) -> nn.Module:
    """linear with only this rank's share of each output shard's rows (q, k, v: whole heads)."""
    packed = getattr(linear, "shards", None)
    shards = dict(packed or {"": (0, linear.out_features)})
    rows = torch.cat([torch.arange(offset, offset + size)[tp.part(size)]
                      for offset, size in shards.values()])
    local_sizes = {name: tp.share(size)[1] for name, (_, size) in shards.items()}
    bias = None if linear.bias is None else linear.bias.detach()[rows]
    if isinstance(linear, QuantizedLinear):
        out = _quantized_rows(linear, rows, bias)
        if packed:
            out.shards = packed_offsets(local_sizes)
    elif isinstance(linear, MixedQuantizedLinear):  # each part keeps its own rows (parts hold whole shards)
        parts, first = [], 0
        for part in linear.parts:
            mine = rows[(rows >= first) & (rows < first + part.out_features)]
            parts.append(_quantized_rows(part, mine - first, None))
            first += part.out_features
        out = MixedQuantizedLinear(parts, bias)
        out.shards = packed_offsets(local_sizes)
    else:
        with torch.device("meta"):  # the parameters are set below
            out = (PackedLinear(linear.in_features, local_sizes, bias=bias is not None) if packed
                   else Linear(linear.in_features, len(rows), bias=bias is not None))
        _set_parameters(out, linear.weight.detach()[rows], bias)
        out.dtype = linear.dtype
    out.split = Split("column", tp, linear.in_features, linear.out_features, packed and dict(packed))
    return out


def _quantized_rows(linear: QuantizedLinear, rows: torch.Tensor, bias: torch.Tensor | None) -> QuantizedLinear:
    weight = QuantizedWeight(linear.qtype, (linear.out_features, linear.in_features), linear.weight)
    return QuantizedLinear.from_weight(weight.rows(rows), bias, linear.dtype)


def _row(linear: nn.Module, tp: TensorParallel) -> nn.Module:
    """linear with only this rank's share of the input columns; rank 0 alone keeps the bias (added once)."""
    first, count = tp.share(linear.in_features)
    bias = linear.bias.detach().clone() if linear.bias is not None and tp.rank == 0 else None
    if isinstance(linear, QuantizedLinear):
        block, type_size = GGML_QUANT_SIZES[linear.qtype]
        if first % block or count % block:
            raise ValueError(f"tensor parallelism splits this layer's {linear.in_features} input features into "
                             f"parts of {count}, which cut its {linear.qtype.name} blocks of {block} weights: choose "
                             f"a tensor_parallel_size that splits {linear.in_features} into multiples of {block}")
        data = linear.weight[:, first // block * type_size:(first + count) // block * type_size].contiguous()
        out = QuantizedLinear.from_weight(QuantizedWeight(linear.qtype, (linear.out_features, count), data), bias,
                                          linear.dtype)
    else:
        with torch.device("meta"):
            out = Linear(count, linear.out_features, bias=bias is not None)
        _set_parameters(out, linear.weight.detach()[:, first:first + count].contiguous(), bias)
        out.dtype = linear.dtype
    packed = getattr(linear, "shards", None)
    out.split = Split("row", tp, linear.in_features, linear.out_features, packed and dict(packed))
    return out


def _set_parameters(linear: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)


def gather_lm_head(lm_head: nn.Module, tp: TensorParallel, vocab_size: int) -> nn.Module | None:
    """Rank 0: the whole LM head, its rows gathered from every rank (what Medusa's drafting projects onto);
    other ranks: None."""
    full = tp.gather(lm_head.weight.detach(), vocab_size, dim=0)
    if full is None:
        return None
    if isinstance(lm_head, QuantizedLinear):
        return QuantizedLinear.from_weight(QuantizedWeight(lm_head.qtype, (vocab_size, lm_head.in_features), full),
                                           None, lm_head.dtype)
    with torch.device("meta"):
        head = Linear(lm_head.in_features, vocab_size, bias=False)
    _set_parameters(head, full, None)
    head.dtype = lm_head.dtype
    return head


def gather_embedding(embedding: VocabParallelEmbedding, tp: TensorParallel, vocab_size: int) -> nn.Module | None:
    """Rank 0: the whole token embedding, its rows gathered from every rank (what Hydra heads read of the tokens
    they draft from); other ranks: None."""
    full = tp.gather(embedding.weight.detach(), vocab_size, dim=0)
    if full is None:
        return None
    if isinstance(embedding.embedding, QuantizedEmbedding):
        return _quantized_embedding(embedding.embedding, full)
    whole = Embedding(vocab_size, full.shape[1], _weight=full, _freeze=True)
    whole.dtype = embedding.embedding.dtype
    return whole
