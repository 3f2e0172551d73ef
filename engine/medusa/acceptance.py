"""Medusa verification's acceptance: which of a tree's nodes the base model accepts, from its logits at every node,
and the bonus token after them. Greedy requests follow the argmax; sampled ones speculative rejection sampling,
which keeps plain sampling's distribution exactly, or typical acceptance (Cai et al., 2024), which accepts more
and is not exact. A request's logit_bias, penalties, structured output and min_tokens act at every node as they act
on a plain step's row, each node reading its own path's history."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import accumulate

import torch

from engine.config import SamplingParams
from engine.medusa.tree import MedusaTree
from engine.sampler import (
    TokenCounts,
    adjust_logits,
    argmax_ids,
    ban_,
    draw_tokens,
    filtered_probs,
    has_penalties,
    token_logprobs,
)
from engine.sequence import Sequence
from engine.structured import mask_tree_
from models.kernels.decode import DecodeKernels


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


def draw_at(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, node: int) -> int:
    """A token drawn under params from the logits at one node (logits: [T, V], each node's), as plain sampling
    draws one."""
    return draw_tokens(filtered_probs(logits[node][None].float(), [params]), [generator])[0]


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


def typical_path(tree: MedusaTree, accepted: list[bool], log_p: list[float]) -> list[int]:
    """The longest accepted prefix of a root-to-leaf path; ties go to the likeliest, then to the first."""
    best, best_key = [0], (1, 0.0)
    for leaf_path in tree.leaf_paths:
        n = 1
        while n < len(leaf_path) and accepted[leaf_path[n]]:
            n += 1
        key = (n, sum(log_p[i] for i in leaf_path[1:n]))
        if key > best_key:
            best, best_key = leaf_path[:n], key
    return best


@dataclass(frozen=True, eq=False)  # one tree is one object: compared by identity
class VerifyTree:
    """A tree as verification reads it. Node i's token is entry candidate_index[i] of a sequence's
    [root, *chain(draft_token_ids)]: Medusa drafts are each head's top-k, the others each level's nodes' own
    tokens. path_pairs: (node, node of its path below the root) pairs, for penalties (a node's history is its
    sequence's tokens, ending with the root's, and the tokens of its path below the root)."""

    tree: MedusaTree
    children: list[list[int]]
    path_pairs: torch.Tensor  # [2, pairs]
    candidate_index: list[int]

    def node_paths(self, tokens: list[int]) -> list[list[int]]:
        """Each node's tokens below the root, down to its own (tokens: [T] each node's token)."""
        paths: list[list[int]] = [[] for _ in tokens]
        for node in sorted(range(1, len(tokens)), key=self.tree.depths.__getitem__):  # (parents first)
            paths[node] = paths[self.tree.parents[node]] + [tokens[node]]
        return paths

    @classmethod
    def of(cls, tree: MedusaTree, node_tokens: bool) -> VerifyTree:
        """node_tokens: the drafts list each node's own token (Hydra heads, prompt lookup), not top-k lists."""
        children = [[c for c in range(1, tree.size) if tree.parents[c] == node] for node in range(tree.size)]
        pairs = torch.tensor([(i, j) for i, j in tree.mask.nonzero().tolist() if j != 0], dtype=torch.int64)
        return cls(tree, children, pairs.view(-1, 2).T, list(range(tree.size)) if node_tokens else tree.candidate_index)


@dataclass
class Acceptance:
    """The engine's acceptance rule ("rejection" or "typical", with typical acceptance's thresholds) and the CPU
    kernels its argmax runs on (None: torch's)."""

    rule: str
    posterior_threshold: float
    posterior_alpha: float
    kernels: DecodeKernels | None = None

    # Sampled verification ("rejection"): SpecInfer's multi-candidate speculative sampling with deterministic
    # drafts. At a node whose distribution is p (the base model's there, under the request's own parameters),
    # the children x1..xm are tried in order. A top-k draft is a point mass q = delta(x), so x is accepted with
    # probability min(1, p(x) / q(x)) = p(x); on rejection p becomes norm(max(0, p - q)), i.e. p without x,
    # renormalised; when every child is rejected the bonus token is drawn from what is left. The factors
    # telescope: child xi is taken with probability p(xi), and any other token y ends the walk as the bonus
    # token with probability p(y). That is one draw y ~ p and a move to the child whose token is y, if any,
    # which is what we do: one draw per emitted token, as plain sampling makes, so the output follows plain
    # sampling's distribution exactly (and a seeded request draws the same random numbers as without Medusa).
    def accept(self, seqs: list[Sequence], trees: list[VerifyTree], candidates: list[int], logits: torch.Tensor,
               rng: torch.Generator) -> tuple[list[list[int]], list[int]]:
        """Per sequence: the accepted nodes (root first) and the bonus token after them. seqs[b]'s rows of
        candidates and logits are the nodes of its tree trees[b], in order, after the rows of the sequences before
        it. Greedy requests follow the argmax; sampled ones the rule above, or typical acceptance when configured
        so."""
        starts = row_starts(trees)
        row_params = [s.params for s, vt in zip(seqs, trees) for _ in range(vt.tree.size)]
        if any(s.matcher is not None for s in seqs):  # (a copy: logprobs read the model's own logits)
            logits = logits.to(torch.float32, copy=True)
            for b, (seq, vt) in enumerate(zip(seqs, trees)):
                if seq.matcher is not None:
                    rows = slice(starts[b], starts[b + 1])
                    mask_tree_(logits[rows], seq.matcher, vt.node_paths(candidates[rows]))
        if any(s.stop_token_ids and not s.may_stop() for s in seqs):  # min_tokens: no stop token before it
            logits = logits.to(torch.float32, copy=True)
            ban_(logits, [() if seq.may_stop(depth) else seq.stop_token_ids
                          for seq, vt in zip(seqs, trees) for depth in vt.tree.depths])
        if any(s.params.logit_bias or has_penalties(s.params) for s in seqs):
            logits = self._adjusted_logits(seqs, trees, candidates, logits.float(), row_params)  # in fp32, as Sampler
        # (unadjusted, the argmax of the model's own logits: exact in their dtype, without an fp32 copy)
        greedy_tokens = argmax_ids(logits, self.kernels) if any(s.params.greedy for s in seqs) else []
        paths, bonus = [], []
        for b, (seq, vt) in enumerate(zip(seqs, trees)):
            rows = slice(starts[b], starts[b + 1])
            tokens = candidates[rows]
            generator = seq.generator or rng
            if seq.params.greedy:
                path, token = walk_tree(tokens, vt.children, greedy_tokens[rows].__getitem__)
            elif self.rule != "typical":
                # the distribution only at the nodes the walk reaches (a step emits a token or two of a tree's rows)
                path, token = walk_tree(tokens, vt.children, partial(draw_at, logits[rows], seq.params, generator))
            else:  # judges every node of the tree
                probs = filtered_probs(logits[rows].float(), row_params[rows])
                accepted, log_p = typical_acceptance(torch.tensor(tokens, device=logits.device)[None], probs[None],
                                                     vt.tree.parents, self.posterior_threshold, self.posterior_alpha)
                path = typical_path(vt.tree, accepted[0].tolist(), log_p[0].tolist())
                token = draw_tokens(probs[path[-1]][None], [generator])[0]
            paths.append(path)
            bonus.append(token)
        return paths, bonus

    @staticmethod
    def _adjusted_logits(seqs: list[Sequence], trees: list[VerifyTree], candidates: list[int], logits: torch.Tensor,
                         row_params: list[SamplingParams]) -> torch.Tensor:
        """logit_bias and penalties at every node; the penalties read each node's own history."""
        penalized = [b for b, s in enumerate(seqs) if has_penalties(s.params)]
        if not penalized:
            return adjust_logits(logits, row_params, penalized_rows=[])
        starts = row_starts(trees)
        sizes = [trees[b].tree.size for b in penalized]
        counts = TokenCounts.of([seqs[b].token_ids for b in penalized], [seqs[b].num_prompt_tokens for b in penalized],
                                logits.shape[-1], logits.device).repeat_interleave(torch.tensor(sizes))
        count_rows, path_tokens = [], []  # each node's path below the root, counted in that node's row
        for first, b in zip(accumulate([0, *sizes]), penalized):
            node, path_node = trees[b].path_pairs
            count_rows.append(first + node)
            path_tokens.append(torch.tensor(candidates[starts[b]:starts[b + 1]])[path_node])
        counts.add(torch.cat(count_rows), torch.cat(path_tokens))
        return adjust_logits(logits, row_params, counts,
                             [row for b in penalized for row in range(starts[b], starts[b + 1])])


def row_starts(trees: list[VerifyTree]) -> list[int]:
    """Where each sequence's rows start, and the end of the last: a sequence's rows are its tree's nodes."""
    return [0, *accumulate(vt.tree.size for vt in trees)]


@dataclass
class TreeRows:
    """The rows of a step's Medusa trees, sequence after sequence: sequence b's node i (of trees[b]) is row
    row_starts(trees)[b] + i, input_ids and positions give its token and position, and spans[b] the cache entries its
    nodes write, one each."""

    trees: list[VerifyTree]
    input_ids: list[int]
    positions: list[int]
    spans: list[tuple[int, int]]

    def mask(self, num_plain: int) -> torch.Tensor:
        """ForwardContext.tree_mask of a step whose first num_plain sequences verify no tree, then these: [num_seqs,
        T, T] over each one's last T cache entries, T the largest tree's size. A smaller tree's nodes are the last of
        those entries; the entries before them are causal, as are a plain sequence's."""
        size = max(vt.tree.size for vt in self.trees)
        device = self.trees[0].tree.mask.device
        masks = torch.ones(num_plain + len(self.trees), size, size, dtype=torch.bool, device=device).tril()
        for mask, vt in zip(masks[num_plain:], self.trees):
            mask[size - vt.tree.size:, size - vt.tree.size:] = vt.tree.mask
        return masks


def path_logprobs(seqs: list[Sequence], trees: list[VerifyTree], paths: list[list[int]], out: list[list[int]],
                  logits: torch.Tensor) -> list[list[tuple | None]]:
    """Per sequence, each emitted token's logprobs (token_logprobs) from the logits of its path's node before it
    (logits: the model's own, each sequence's tree's rows after the last's, as Acceptance.accept reads them; out: the
    emitted tokens, the bonus token last); None where the request asked for none."""
    starts = row_starts(trees)
    wanted = [b for b, seq in enumerate(seqs) if seq.params.logprobs is not None]
    found = iter(token_logprobs(logits[[starts[b] + node for b in wanted for node in paths[b]]].float(),
                                [t for b in wanted for t in out[b]],
                                [seqs[b].params for b in wanted for _ in out[b]]) if wanted else [])
    return [[next(found) for _ in tokens] if seq.params.logprobs is not None else [None] * len(tokens)
            for seq, tokens in zip(seqs, out)]
