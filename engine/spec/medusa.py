"""Medusa heads (load/save in the published format), and the speculative decode step built on them:
propose candidates, verify a whole tree per sequence in one forward, accept, compact the KV cache.

Indexing: the base model's logits at hidden state h_i predict token i+1; head k (from 0) at h_i predicts
token i+2+k. A sequence in decode has its last token pending (not yet in the cache); that token is the
tree's root, and the heads' top-k at the hidden state of the token before it fill the tree's nodes."""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from engine.config import EngineConfig
from engine.kv_cache import KVCache
from engine.runner import ModelRunner
from engine.sampler import Sampler
from engine.sequence import Sequence
from engine.spec.tree import DEFAULT_TREE, MedusaTree, load_tree
from models.kernels import decode as cpu_decode
from models.layers import Linear

WEIGHTS_FILE = "medusa_lm_head.safetensors"
# Our addition to the published format: the token ids the heads propose from (see MedusaHeads.draft_vocab)
DRAFT_VOCAB_FILE = "draft_vocab.safetensors"
# Drafting reads every head's weights each step, from memory (the model's forward evicts them), so they are
# kept in bf16; their precision only moves which drafts are offered, never the output (the base model verifies
# each). Default model: 4 heads for one sequence 328 -> 293 us; 3.79 -> 3.78 tokens per step.
DRAFT_DTYPE = torch.bfloat16
_KEY = re.compile(r"(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)")


@dataclass
class MedusaConfig:
    """Shape of a set of heads; hidden_size and vocab_size are always the base model's."""

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    own_lm_head: bool  # "v1": each head has its own vocab projection; "v2": the heads share the base lm_head


class ResBlock(nn.Module):
    """x + SiLU(W x + b): the published Medusa block (and its state-dict key, `linear`)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # a fresh block is the identity, so a fresh v2 head starts as the lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


@dataclass
class DraftWeights:
    """What drafting reads every step, gathered once (MedusaHeads.draft_weights): each head's blocks' weights
    and biases (fp32, as the CPU kernel takes them), and the vocabulary projections (one shared, or one per head)."""

    weights: list[list[torch.Tensor]]  # [head][block]
    biases: list[list[torch.Tensor]]  # [head][block]
    projections: list[torch.Tensor]


class MedusaHeads(nn.Module):
    """K heads over the base model's final-normed hidden state; head h is blocks heads[h][0..N-1], then
    (v1) its own projection heads[h][N]. Invariant: `heads.state_dict()` keys are the published format's,
    `{h}.{j}.linear.weight|bias` and `{h}.{N}.weight`.

    `draft_vocab` (optional, from training): the ids of the tokens the heads propose, the commonest of
    their training text. Projecting onto those alone cuts the cost of drafting, which reads the whole
    vocabulary projection every step, for few lost acceptances: a rare token is seldom a right draft."""

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        self.config = config
        h, v = config.hidden_size, config.vocab_size
        self.heads = nn.ModuleList(
            nn.ModuleList([*(ResBlock(h) for _ in range(config.num_layers)),
                           *([Linear(h, v, bias=False)] if config.own_lm_head else [])])
            for _ in range(config.num_heads))
        self.register_buffer("draft_vocab", None, persistent=False)  # int64 [n] token ids, or None: all

    @property
    def num_draft_tokens(self) -> int:
        return self.config.vocab_size if self.draft_vocab is None else len(self.draft_vocab)

    def _states(self, hidden: torch.Tensor, heads: list[nn.ModuleList]) -> list[torch.Tensor]:
        states = []
        for head in heads:
            x = hidden
            for block in islice(head, self.config.num_layers):
                x = block(x)
            states.append(x)
        return states

    def forward(self, hidden: torch.Tensor, base_lm_head: Callable[[torch.Tensor], torch.Tensor],
                num_heads: int | None = None) -> torch.Tensor:
        """hidden: [..., hidden_size] -> logits of the first num_heads heads over the whole vocabulary,
        [num_heads, ..., vocab]."""
        heads = list(islice(self.heads, num_heads))  # (slicing a ModuleList builds a new one: slow)
        states = self._states(hidden, heads)
        if self.config.own_lm_head:
            return torch.stack([head[-1](x) for head, x in zip(heads, states)])
        return base_lm_head(torch.stack(states))  # one projection for all heads

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def draft_weights(self, base_lm_head: nn.Linear) -> DraftWeights:
        """What top_k reads, gathered once: the vocabulary projections are each head's own (v1) or the one
        shared base lm_head (v2), restricted to the draft vocabulary's rows, in the heads' dtype."""
        blocks = [[block.linear for block in islice(head, self.config.num_layers)] for head in self.heads]
        projections = [head[-1].weight for head in self.heads] if self.config.own_lm_head else [base_lm_head.weight]
        if self.draft_vocab is not None:
            projections = [w[self.draft_vocab] for w in projections]
        return DraftWeights([[b.weight for b in head] for head in blocks], [[b.bias.float() for b in head] for head in blocks],
                            [w.to(self.dtype).contiguous() for w in projections])

    def top_k(self, hidden: torch.Tensor, draft: DraftWeights, num_heads: int, k: int) -> torch.Tensor:
        """The k likeliest draft-vocabulary tokens of each of the first num_heads heads at hidden
        [B, hidden_size] -> token ids [num_heads, B, k]; draft: from draft_weights. On a CPU at decode sizes
        one kernel call does it all (models.cpu_decode)."""
        projections = draft.projections[:num_heads]
        if cpu_decode.usable(hidden, projections[0]) and num_heads * len(hidden) <= cpu_decode.MAX_ROWS:
            top = cpu_decode.kernel().medusa_top_k(hidden, [*chain.from_iterable(draft.weights[:num_heads])],
                                                   [*chain.from_iterable(draft.biases[:num_heads])],
                                                   num_heads, projections, k)
        else:
            heads = list(islice(self.heads, num_heads))
            states = torch.stack(self._states(hidden.to(self.dtype), heads))  # [num_heads, B, hidden]
            if len(projections) == 1:
                logits = F.linear(states, projections[0])
            else:
                logits = torch.stack([F.linear(x, w) for x, w in zip(states, projections)])
            top = logits.topk(k, dim=-1).indices
        return top if self.draft_vocab is None else self.draft_vocab[top]


def load_medusa_heads(folder: str | Path, hidden_size: int, vocab_size: int,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> MedusaHeads:
    """Read a published Medusa folder (config.json + medusa_lm_head.safetensors) for a base model with
    this hidden size and vocabulary. Every tensor must be expected and present, with the expected shape."""
    folder = Path(folder)
    config_file, weights_file = folder / "config.json", folder / WEIGHTS_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{folder} is not a Medusa heads folder: {f.name} is missing")
    config = json.loads(config_file.read_text())
    if "medusa_num_layers" not in config:
        raise ValueError(f"{config_file} has no medusa_num_layers")
    tensors = load_file(weights_file)
    parsed = {key: _KEY.fullmatch(key) for key in tensors}
    unknown = sorted(key for key, m in parsed.items() if m is None)
    if not tensors:
        raise ValueError(f"{weights_file} holds no tensors")
    if unknown:
        raise ValueError(f"{weights_file}: unexpected tensors {unknown} (expected "
                         "'{head}.{block}.linear.weight|bias' and '{head}.{num_layers}.weight')")
    num_heads = 1 + max(int(m[1]) for m in parsed.values())
    if num_heads != config.get("medusa_num_heads", num_heads):
        warnings.warn(f"{config_file} says medusa_num_heads={config['medusa_num_heads']}, but the weights hold "
                      f"{num_heads} heads; using {num_heads}")
    own_lm_head = any(m[3] == "weight" for m in parsed.values())
    heads = MedusaHeads(MedusaConfig(num_heads, int(config["medusa_num_layers"]), hidden_size, vocab_size, own_lm_head))
    expected = heads.heads.state_dict()
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not match {num_heads} heads of {heads.config.num_layers} blocks "
                         f"({'v1' if own_lm_head else 'v2'}): missing {missing}, unexpected {unexpected}")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{weights_file}: {key} has shape {list(tensor.shape)}, but a base model with hidden "
                             f"size {hidden_size} and vocabulary {vocab_size} needs {list(expected[key].shape)}")
    heads.heads.load_state_dict(tensors)
    if (folder / DRAFT_VOCAB_FILE).is_file():
        heads.draft_vocab = _read_draft_vocab(folder / DRAFT_VOCAB_FILE, vocab_size)
    return heads.to(device=device, dtype=dtype).eval()


def _read_draft_vocab(path: Path, vocab_size: int) -> torch.Tensor:
    tensors = load_file(path)
    ids = tensors.get("token_ids")
    if set(tensors) != {"token_ids"} or ids.dim() != 1 or ids.dtype != torch.int64 or len(ids) == 0:
        raise ValueError(f"{path} must hold one tensor, token_ids: a non-empty int64 vector of token ids")
    if ids.min() < 0 or ids.max() >= vocab_size or len(ids.unique()) != len(ids):
        raise ValueError(f"{path}: token_ids must be distinct ids of the base model's {vocab_size}-token vocabulary")
    return ids


def save_medusa_heads(heads: MedusaHeads, folder: str | Path, base_model: str | None = None) -> None:
    """Write `heads` in the published format (readable by load_medusa_heads and the reference code)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = heads.config
    config = {"medusa_num_heads": c.num_heads, "medusa_num_layers": c.num_layers, "hidden_size": c.hidden_size,
              "vocab_size": c.vocab_size, "base_model_name_or_path": base_model}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in heads.heads.state_dict().items()}, folder / WEIGHTS_FILE)
    if heads.draft_vocab is not None:
        save_file({"token_ids": heads.draft_vocab.cpu().contiguous()}, folder / DRAFT_VOCAB_FILE)
    else:  # an older draft vocabulary in the folder belongs to other heads
        (folder / DRAFT_VOCAB_FILE).unlink(missing_ok=True)


def typical_acceptance(candidates: torch.Tensor, logits: torch.Tensor, parents: list[int],
                       temperature: torch.Tensor, posterior_threshold: float,
                       posterior_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tree node: does the base model, at the node's parent, give the node's token a probability
    p > min(eps, delta * exp(-H)) (H: the entropy there; eps = posterior_threshold, delta = posterior_alpha)?
    candidates: [B, T]; logits: [B, T, V]; temperature: [B]. Returns (accepted [B, T], log p [B, T])."""
    probs = (logits.float() / temperature[:, None, None]).softmax(dim=-1)[:, parents]  # [B, T, V] at each parent
    entropy = torch.special.entr(probs).sum(dim=-1)  # [B, T]
    p = probs.gather(-1, candidates[..., None]).squeeze(-1)
    threshold = torch.clamp(posterior_alpha * torch.exp(-entropy), max=posterior_threshold)
    return p > threshold, p.log()


class Medusa:
    """Medusa speculation for one engine. Invariant: a sequence whose draft_token_ids are set has its
    last token pending and room for tree.size more cache entries; its next decode step verifies the tree."""

    def __init__(self, heads: MedusaHeads, tree: MedusaTree, model: nn.Module, kv_cache: KVCache,
                 max_model_len: int, posterior_threshold: float, posterior_alpha: float) -> None:
        if tree.depth > heads.config.num_heads:
            raise ValueError(f"medusa tree {tree.name!r} is {tree.depth} deep, but there are only "
                             f"{heads.config.num_heads} heads (a depth-d node takes head d-1's candidates)")
        if heads.num_draft_tokens < tree.top_k:
            raise ValueError(f"medusa tree {tree.name!r} takes each head's top {tree.top_k}, but the heads' draft "
                             f"vocabulary has only {heads.num_draft_tokens} tokens")
        self.heads, self.model, self.kv_cache = heads, model, kv_cache
        self.draft_weights = heads.draft_weights(model.lm_head)
        self.tree = tree.to(kv_cache.pool.device)
        self.max_model_len = max_model_len
        self.posterior_threshold, self.posterior_alpha = posterior_threshold, posterior_alpha
        self.sampler = Sampler()

    @classmethod
    def from_config(cls, config: EngineConfig, model: nn.Module, kv_cache: KVCache, max_model_len: int) -> "Medusa":
        """The engine's Medusa: heads from config.medusa, tree from config.medusa_tree."""
        heads = load_medusa_heads(config.medusa, model.config.hidden_size, model.config.vocab_size,
                                  DRAFT_DTYPE, kv_cache.pool.device)
        tree = load_tree(config.medusa_tree or DEFAULT_TREE)
        if config.medusa_tree is None:  # the default tree, as deep as the heads allow
            tree = tree.cut(min(tree.depth, heads.config.num_heads))
        return cls(heads, tree, model, kv_cache, max_model_len,
                   config.medusa_posterior_threshold, config.medusa_posterior_alpha)

    def can_speculate(self, seq: Sequence) -> bool:
        # requests that want logprobs decode plainly; adapters speculate with the base model's heads
        # (verification runs through the adapter, so output is unchanged; only acceptance may drop)
        return (seq.params.use_medusa and seq.params.logprobs is None and not seq.is_finished
                and seq.num_virtual_tokens + len(seq) - 1 + self.tree.size <= self.max_model_len)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], hidden: torch.Tensor) -> None:
        """Set each sequence's drafts from the hidden state [len(seqs), hidden] of the token before its
        pending one (None where it cannot speculate)."""
        speculating = [i for i, seq in enumerate(seqs) if self.can_speculate(seq)]
        for seq in seqs:
            seq.draft_token_ids = None
        if not speculating:
            return
        tree = self.tree
        top = self.heads.top_k(hidden[speculating], self.draft_weights, tree.depth, tree.top_k)  # [depth, B, top_k]
        top = top.transpose(0, 1).tolist()
        for i, drafts in zip(speculating, top):
            seqs[i].draft_token_ids = drafts

    @torch.inference_mode()
    def verify(self, seqs: list[Sequence], runner: ModelRunner,
               rng: torch.Generator) -> tuple[list[list[int]], torch.Tensor]:
        """One forward over every sequence's tree; returns, per sequence, the accepted tokens plus the
        bonus token sampled by the base model after them, and the accepted last node's hidden states
        [len(seqs), hidden] (what propose() needs next). The accepted K/V ends up in consecutive cache
        entries after the sequence's past; the caller releases the blocks beyond them."""
        tree, num_seqs, size = self.tree, len(seqs), self.tree.size
        # node i's token: entry candidate_index[i] of [root, head 0's top-k, head 1's top-k, ...]
        token_lists = [[seq.token_ids[-1], *chain.from_iterable(seq.draft_token_ids)] for seq in seqs]
        input_ids = [tokens[i] for tokens in token_lists for i in tree.candidate_index]
        positions, spans = [], []
        for seq in seqs:
            root = seq.num_virtual_tokens + seq.num_computed_tokens  # the root's cache index and position
            positions += [root + d for d in tree.depths]  # node i sits at cache index root + i
            spans.append((root, root + size))
        inputs = runner.step_inputs(seqs, input_ids, positions, spans, list(range(num_seqs * size)),
                                    list(range(num_seqs)), tree_mask=tree.mask)
        hidden = runner.forward(inputs)  # [B * T, hidden]
        logits = runner.logits(hidden, inputs.sample_rows)  # [B * T, V]
        base_argmax = logits.argmax(dim=-1).tolist()
        paths = self._accepted_paths(seqs, input_ids, logits.view(num_seqs, size, -1), base_argmax)
        last_rows = [b * size + path[-1] for b, path in enumerate(paths)]
        if all(s.params.greedy for s in seqs):
            bonus = [base_argmax[row] for row in last_rows]
        else:
            bonus = self.sampler(logits[last_rows], [s.params for s in seqs], [s.generator or rng for s in seqs]).token_ids
        self._compact(inputs.ctx.slot_mapping, paths)
        out = [[input_ids[b * size + node] for node in path[1:]] + [bonus[b]] for b, path in enumerate(paths)]
        return out, hidden[last_rows]

    def _accepted_paths(self, seqs: list[Sequence], candidates: list[int], logits: torch.Tensor,
                        base_argmax: list[int]) -> list[list[int]]:
        """Per sequence: the nodes, root first, of the longest accepted prefix of a root-to-leaf path. A node
        is accepted when its token is the base argmax at its parent (greedy) or passes typical acceptance
        (sampling). Ties go to the likeliest path under typical acceptance, else to the first."""
        tree, size = self.tree, self.tree.size
        sampled = [not s.params.greedy for s in seqs]
        typical = log_p = None
        if any(sampled):
            temperature = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=logits.device)
            candidates_t = torch.tensor(candidates, device=logits.device).view(len(seqs), size)
            typical_t, log_p_t = typical_acceptance(candidates_t, logits, tree.parents, temperature,
                                                    self.posterior_threshold, self.posterior_alpha)
            typical, log_p = typical_t.tolist(), log_p_t.tolist()
        paths = []
        for b in range(len(seqs)):
            first = b * size
            if sampled[b]:
                accepted = typical[b]
            else:
                accepted = [candidates[first + i] == base_argmax[first + parent] for i, parent in enumerate(tree.parents)]
            best, best_key = [0], (1, 0.0)
            for leaf_path in tree.leaf_paths:
                n = 1
                while n < len(leaf_path) and accepted[leaf_path[n]]:
                    n += 1
                key = (n, sum(log_p[b][i] for i in leaf_path[1:n]) if sampled[b] else 0.0)
                if key > best_key:
                    best, best_key = leaf_path[:n], key
            paths.append(best)
        return paths

    def _compact(self, slot_mapping: torch.Tensor, paths: list[list[int]]) -> None:
        """Move each accepted path's K/V (all layers) so that its depth-d node sits in the slot of tree
        row d: sequence b's node i was written to slot_mapping[b * T + i], the slot of cache index root + i."""
        size = self.tree.size
        moves = [(b * size + node, b * size + depth) for b, path in enumerate(paths)
                 for depth, node in enumerate(path) if node != depth]
        if not moves:
            return
        src, dst = map(list, zip(*moves))
        pool = self.kv_cache.pool
        # [layers, 2, num_blocks * block_size, kv_heads, head_dim]: a slot is an index on dim 2
        flat = pool.view(*pool.shape[:2], -1, *pool.shape[-2:])
        flat[:, :, slot_mapping[dst]] = flat[:, :, slot_mapping[src]]
