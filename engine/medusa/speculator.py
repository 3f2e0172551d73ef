"""The Medusa decode step: propose candidates with the heads (models.medusa), verify a whole tree per
sequence in one forward, accept (greedy: the argmax's path; sampled: speculative rejection sampling, which
keeps plain sampling's distribution exactly, or typical acceptance), compact the KV cache.

Indexing: the base model's logits at hidden state h_i predict token i+1; head k (from 0) at h_i predicts
token i+2+k. A sequence in decode has its last token pending (not yet in the cache); that token is the
tree's root, and the heads' top-k at the hidden state of the token before it fill the tree's nodes: Medusa
heads all at once (a depth-d node takes head d-1's candidate of its rank), Hydra heads level by level (a
depth-d node takes its rank among the candidates head d-1 gives its parent, reading the parent's path)."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, chain, pairwise

import torch
from torch import nn

from engine.config import EngineConfig, SamplingParams
from engine.kv_cache import KVCache
from engine.medusa.tree import DEFAULT_TREE, MedusaTree, TreeChoice, build_tree, load_tree
from engine.runner import ModelRunner
from engine.sampler import TokenCounts, adjust_logits, argmax_ids, filtered_probs, has_penalties
from engine.sequence import Sequence
from models.kernels.decode import DecodeKernels, set_decode_kernels
from models.medusa import MedusaHeads, load_medusa_heads

# Drafting reads every head's weights each step, from memory (the model's forward evicts them), so they are
# kept in bf16; their precision only moves which drafts are offered, never the output (the base model verifies
# each). Default model: 4 heads for one sequence 328 -> 293 us; 3.79 -> 3.78 tokens per step.
DRAFT_DTYPE = torch.bfloat16


def walk_tree(tokens: list[int], children: list[list[int]], next_token: Callable[[int], int]) -> tuple[list[int], int]:
    """Verification of one sequence's tree: from the root, the base model's next token at the current node
    (next_token(node)) is either the token of one of its children, and the walk moves there, or the bonus
    token, and the walk ends. tokens: [T] each node's token. Returns (accepted nodes, root first; bonus token)."""
    path = [0]
    while True:
        token = next_token(path[-1])
        child = next((c for c in children[path[-1]] if tokens[c] == token), None)
        if child is None:
            return path, token
        path.append(child)


def draw(probs: torch.Tensor, generator: torch.Generator, node: int) -> int:
    """A token from probs[node] (probs: [T, V], each node's distribution)."""
    return torch.multinomial(probs[node], 1, generator=generator).item()


def typical_acceptance(candidates: torch.Tensor, probs: torch.Tensor, parents: list[int], posterior_threshold: float,
                       posterior_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tree node: does the base model, at the node's parent, give the node's token a probability
    p > min(eps, delta * exp(-H)) (H: the entropy there; eps = posterior_threshold, delta = posterior_alpha)?
    candidates: [B, T]; probs: [B, T, V] the distribution at each node. Returns (accepted [B, T], log p [B, T])."""
    probs = probs[:, parents]  # [B, T, V] at each node's parent
    entropy = torch.special.entr(probs).sum(dim=-1)  # [B, T]
    p = probs.gather(-1, candidates[..., None]).squeeze(-1)
    threshold = torch.clamp(posterior_alpha * torch.exp(-entropy), max=posterior_threshold)
    return p > threshold, p.log()


@dataclass(frozen=True)
class Level:
    """Hydra drafting of one tree level: the depth-d nodes that have children run head d; each depth-(d+1)
    node takes the candidate of its rank among its parent's."""

    parents: torch.Tensor  # [n] the depth-d nodes with children, as indices among the depth-d nodes
    child_parent: torch.Tensor  # [m] each depth-(d+1) node's parent, as an index into `parents`
    child_rank: torch.Tensor  # [m] each depth-(d+1) node's rank among its parent's candidates
    top_k: int


def hydra_levels(tree: MedusaTree) -> list[Level]:
    """The levels of a tree for Hydra drafting, root first."""
    at_depth = [[i for i in range(tree.size) if tree.depths[i] == d] for d in range(tree.depth + 1)]
    levels = []
    for d in range(tree.depth):
        children = at_depth[d + 1]
        parents = sorted({tree.parents[c] for c in children})
        ranks = [tree.paths[c - 1][-1] for c in children]
        levels.append(Level(torch.tensor([at_depth[d].index(p) for p in parents]),
                            torch.tensor([parents.index(tree.parents[c]) for c in children]),
                            torch.tensor(ranks), max(ranks) + 1))
    return levels


class Medusa:
    """Medusa speculation for one engine. Invariant: a sequence whose draft_token_ids are set has its
    last token pending and room for tree.size more cache entries; its next decode step verifies the tree."""

    def __init__(self, heads: MedusaHeads, tree: MedusaTree, model: nn.Module, kv_cache: KVCache,
                 max_model_len: int, acceptance: str, posterior_threshold: float, posterior_alpha: float,
                 max_batch_size: int | None = None) -> None:
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
        self.max_batch_size = max_batch_size
        self.acceptance = acceptance
        self.posterior_threshold, self.posterior_alpha = posterior_threshold, posterior_alpha
        self.children = [[c for c in range(1, tree.size) if tree.parents[c] == node] for node in range(tree.size)]
        # (node, node of its path below the root) pairs: a node's history is its sequence's tokens (ending with
        # the root's) and the tokens of its path below the root
        self.path_pairs = torch.tensor([(i, j) for i, j in tree.mask.nonzero().tolist() if j != 0]).T
        # node i's token: entry candidate_index[i] of [root, *chain(draft_token_ids)]: Medusa drafts are each
        # head's top-k, Hydra drafts each level's nodes' own tokens
        self.sequential = heads.config.sequential
        self.levels = hydra_levels(tree) if self.sequential else None
        self.candidate_index = list(range(tree.size)) if self.sequential else tree.candidate_index

    @classmethod
    def from_config(cls, config: EngineConfig, model: nn.Module, kv_cache: KVCache, max_model_len: int,
                    kernels: DecodeKernels | None) -> Medusa | None:
        """The engine's Medusa: heads from config.medusa, tree from config.medusa_tree, else the one measured
        for the heads (TreeChoice), else the default; None when the measurement found that no tree pays.
        Drafting uses the CPU kernels when the engine does."""
        choice = TreeChoice.load(config.medusa) if config.medusa_tree is None else None
        if choice is not None and choice.paths is None:
            warnings.warn(f"Medusa heads {config.medusa}: {choice.summary}; decoding plainly", stacklevel=2)
            return None
        heads = load_medusa_heads(config.medusa, model.config.hidden_size, model.config.vocab_size,
                                  DRAFT_DTYPE, kv_cache.device)
        set_decode_kernels(heads, kernels)
        if choice is not None:
            timed_threads = choice.measurements.get("threads")
            if timed_threads not in (None, torch.get_num_threads()):
                warnings.warn(f"Medusa heads {config.medusa}: their tree was timed with {timed_threads} threads and "
                              f"this engine runs {torch.get_num_threads()}, where it and its batch limit may not pay "
                              "(time the trees here: gorgon train-medusa --retime --out HEADS --model MODEL "
                              "--threads N; or name a tree and --medusa-max-batch-size)",
                              stacklevel=2)
            tree = build_tree(choice.paths, "measured")
        else:
            tree = load_tree(config.medusa_tree or DEFAULT_TREE)
            if config.medusa_tree is None:  # the default tree, as deep as the heads allow
                tree = tree.cut(min(tree.depth, heads.config.num_heads))
        max_batch_size = config.medusa_max_batch_size or (choice.max_batch_size if choice is not None else None)
        return cls(heads, tree, model, kv_cache, max_model_len, config.medusa_acceptance,
                   config.medusa_posterior_threshold, config.medusa_posterior_alpha, max_batch_size)

    def can_speculate(self, seq: Sequence) -> bool:
        # requests that want logprobs decode plainly; adapters speculate with the base model's heads
        # (verification runs through the adapter, so output is unchanged; only acceptance may drop)
        return (seq.params.use_medusa and seq.params.logprobs is None and not seq.is_finished
                and seq.num_virtual_tokens + len(seq) - 1 + self.tree.size <= self.max_model_len)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], hidden: torch.Tensor, num_running: int) -> None:
        """Set each sequence's drafts from the hidden state [len(seqs), hidden] of the token before its
        pending one (None where it cannot speculate, and for all of them while more than max_batch_size of the
        engine's num_running sequences decode: there plain steps are faster)."""
        crowded = self.max_batch_size is not None and num_running > self.max_batch_size
        speculating = [] if crowded else [i for i, seq in enumerate(seqs) if self.can_speculate(seq)]
        for seq in seqs:
            seq.draft_token_ids = None
        if not speculating:
            return
        if self.sequential:
            roots = torch.tensor([seqs[i].token_ids[-1] for i in speculating], device=hidden.device)
            drafts = self._draft_levels(hidden[speculating], roots)
        else:
            tree = self.tree
            top = self.heads.top_k(hidden[speculating], self.draft_weights, tree.depth, tree.top_k)  # [depth, B, k]
            drafts = top.transpose(0, 1).tolist()
        for i, seq_drafts in zip(speculating, drafts):
            seqs[i].draft_token_ids = seq_drafts

    def _draft_levels(self, hidden: torch.Tensor, roots: torch.Tensor) -> list[list[list[int]]]:
        """Hydra: the tree's node tokens, level by level, for B sequences from their hidden states [B, hidden]
        and roots [B] -> per sequence, per depth, its nodes' tokens. At depth d, states[:, j] is what node j
        (of that depth) starts from: its parent's head input (the hidden state at the root)."""
        num_seqs, width = hidden.shape
        states, tokens, levels = hidden[:, None], roots[:, None], []  # [B, nodes, hidden], [B, nodes]
        embed = self.model.model.embed_tokens
        for head, level in enumerate(self.levels):
            parent_states = states[:, level.parents].flatten(0, 1)
            parent_tokens = tokens[:, level.parents].flatten()
            x, top = self.heads.draft_level(parent_states, embed(parent_tokens), head, self.draft_weights, level.top_k)
            top = top.view(num_seqs, len(level.parents), -1)
            tokens = top[:, level.child_parent, level.child_rank]  # [B, m]
            states = x.view(num_seqs, len(level.parents), width)[:, level.child_parent]
            levels.append(tokens)
        bounds = [0, *accumulate(t.shape[1] for t in levels)]
        return [[row[a:b] for a, b in pairwise(bounds)] for row in torch.cat(levels, dim=1).tolist()]

    @torch.inference_mode()
    def verify(self, seqs: list[Sequence], runner: ModelRunner,
               rng: torch.Generator) -> tuple[list[list[int]], torch.Tensor]:
        """One forward over every sequence's tree; returns, per sequence, the accepted tokens plus the
        bonus token sampled by the base model after them, and the accepted last node's hidden states
        [len(seqs), hidden] (what propose() needs next). The accepted K/V ends up in consecutive cache
        entries after the sequence's past; the caller releases the blocks beyond them."""
        tree, num_seqs, size = self.tree, len(seqs), self.tree.size
        token_lists = [[seq.token_ids[-1], *chain.from_iterable(seq.draft_token_ids)] for seq in seqs]
        input_ids = [tokens[i] for tokens in token_lists for i in self.candidate_index]
        positions, spans = [], []
        for seq in seqs:
            root = seq.num_virtual_tokens + seq.num_computed_tokens  # the root's cache index and position
            positions += [root + d for d in tree.depths]  # node i sits at cache index root + i
            spans.append((root, root + size))
        inputs = runner.step_inputs(seqs, input_ids, positions, spans, list(range(num_seqs * size)),
                                    list(range(num_seqs)), tree_mask=tree.mask)
        hidden = runner.forward(inputs)  # [B * T, hidden]
        logits = runner.logits(hidden, inputs.sample_rows)  # [B * T, V]
        paths, bonus = self._accept(seqs, input_ids, logits, rng)
        self._compact(inputs.ctx.slot_mapping, paths)
        out = [[input_ids[b * size + node] for node in path[1:]] + [bonus[b]] for b, path in enumerate(paths)]
        return out, hidden[[b * size + path[-1] for b, path in enumerate(paths)]]

    # Sampled verification ("rejection"): SpecInfer's multi-candidate speculative sampling with deterministic
    # drafts. At a node whose distribution is p (the base model's there, under the request's own parameters),
    # the children x1..xm are tried in order. A top-k draft is a point mass q = delta(x), so x is accepted with
    # probability min(1, p(x) / q(x)) = p(x); on rejection p becomes norm(max(0, p - q)), i.e. p without x,
    # renormalised; when every child is rejected the bonus token is drawn from what is left. The factors
    # telescope: child xi is taken with probability p(xi), and any other token y ends the walk as the bonus
    # token with probability p(y). That is one draw y ~ p and a move to the child whose token is y, if any,
    # which is what we do: one draw per emitted token, as plain sampling makes, so the output follows plain
    # sampling's distribution exactly (and a seeded request draws the same random numbers as without Medusa).
    def _accept(self, seqs: list[Sequence], candidates: list[int], logits: torch.Tensor,
                rng: torch.Generator) -> tuple[list[list[int]], list[int]]:
        """Per sequence: the accepted nodes (root first) and the bonus token after them. Greedy requests
        follow the argmax; sampled ones the rule above, or typical acceptance when configured so."""
        size = self.tree.size
        row_params = [s.params for s in seqs for _ in range(size)]
        logits = self._adjusted_logits(seqs, candidates, logits.float(), row_params)
        greedy_tokens = argmax_ids(logits, self.heads.kernels)
        sampled = {b: j for j, b in enumerate(b for b, s in enumerate(seqs) if not s.params.greedy)}
        probs = typical = log_p = None
        if sampled:
            rows = [b * size + i for b in sampled for i in range(size)]
            probs = filtered_probs(logits[rows], [row_params[r] for r in rows]).view(len(sampled), size, -1)
            if self.acceptance == "typical":
                candidates_t = torch.tensor(candidates, device=logits.device).view(len(seqs), size)[list(sampled)]
                typical_t, log_p_t = typical_acceptance(candidates_t, probs, self.tree.parents,
                                                        self.posterior_threshold, self.posterior_alpha)
                typical, log_p = typical_t.tolist(), log_p_t.tolist()
        paths, bonus = [], []
        for b, seq in enumerate(seqs):
            tokens = candidates[b * size:(b + 1) * size]
            if seq.params.greedy:
                path, token = walk_tree(tokens, self.children, greedy_tokens[b * size:(b + 1) * size].__getitem__)
            else:
                j, generator = sampled[b], seq.generator or rng
                if typical is None:
                    path, token = walk_tree(tokens, self.children, partial(draw, probs[j], generator))
                else:
                    path = self._typical_path(typical[j], log_p[j])
                    token = draw(probs[j], generator, path[-1])
            paths.append(path)
            bonus.append(token)
        return paths, bonus

    def _adjusted_logits(self, seqs: list[Sequence], candidates: list[int], logits: torch.Tensor,
                         row_params: list[SamplingParams]) -> torch.Tensor:
        """logit_bias and penalties at every node; the penalties read each node's own history."""
        penalized = [b for b, s in enumerate(seqs) if has_penalties(s.params)]
        if not penalized:
            return adjust_logits(logits, row_params, penalized_rows=[])
        size = self.tree.size
        counts = TokenCounts.of([seqs[b].token_ids for b in penalized], [seqs[b].num_prompt_tokens for b in penalized],
                                logits.shape[-1], logits.device).repeat_interleave(size)
        tokens = torch.tensor(candidates).view(len(seqs), size)[penalized]  # [P, T]
        node, path_node = self.path_pairs
        counts.add((torch.arange(len(penalized))[:, None] * size + node).flatten(), tokens[:, path_node].flatten())
        return adjust_logits(logits, row_params, counts, [b * size + i for b in penalized for i in range(size)])

    def _typical_path(self, accepted: list[bool], log_p: list[float]) -> list[int]:
        """The longest accepted prefix of a root-to-leaf path; ties go to the likeliest, then to the first."""
        best, best_key = [0], (1, 0.0)
        for leaf_path in self.tree.leaf_paths:
            n = 1
            while n < len(leaf_path) and accepted[leaf_path[n]]:
                n += 1
            key = (n, sum(log_p[i] for i in leaf_path[1:n]))
            if key > best_key:
                best, best_key = leaf_path[:n], key
        return best

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
