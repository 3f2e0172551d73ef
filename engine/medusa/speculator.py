"""The Medusa decode step: propose candidates with the heads (models.medusa), verify a whole tree per
sequence in one forward, accept, compact the KV cache.

Indexing: the base model's logits at hidden state h_i predict token i+1; head k (from 0) at h_i predicts
token i+2+k. A sequence in decode has its last token pending (not yet in the cache); that token is the
tree's root, and the heads' top-k at the hidden state of the token before it fill the tree's nodes."""
from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from engine.config import EngineConfig
from engine.kv_cache import KVCache
from engine.runner import ModelRunner
from engine.sampler import Sampler
from engine.sequence import Sequence
from engine.medusa.tree import DEFAULT_TREE, MedusaTree, load_tree
from models.kernels.decode import DecodeKernels, set_decode_kernels
from models.medusa import MedusaHeads, load_medusa_heads

# Drafting reads every head's weights each step, from memory (the model's forward evicts them), so they are
# kept in bf16; their precision only moves which drafts are offered, never the output (the base model verifies
# each). Default model: 4 heads for one sequence 328 -> 293 us; 3.79 -> 3.78 tokens per step.
DRAFT_DTYPE = torch.bfloat16


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
        self.tree = tree.to(kv_cache.device)
        self.max_model_len = max_model_len
        self.posterior_threshold, self.posterior_alpha = posterior_threshold, posterior_alpha
        self.sampler = Sampler()

    @classmethod
    def from_config(cls, config: EngineConfig, model: nn.Module, kv_cache: KVCache, max_model_len: int,
                    kernels: DecodeKernels | None) -> "Medusa":
        """The engine's Medusa: heads from config.medusa, tree from config.medusa_tree; drafting uses the
        CPU kernels when the engine does."""
        heads = load_medusa_heads(config.medusa, model.config.hidden_size, model.config.vocab_size,
                                  DRAFT_DTYPE, kv_cache.device)
        set_decode_kernels(heads, kernels)
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
        self.kv_cache.copy(slot_mapping[src], slot_mapping[dst])
