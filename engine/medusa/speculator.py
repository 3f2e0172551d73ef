"""The Medusa decode step: propose candidates with the heads (models.medusa), verify a whole tree per
sequence in one forward, accept (engine.medusa.acceptance: greedy, the argmax's path; sampled, speculative rejection
sampling, which keeps plain sampling's distribution exactly, or typical acceptance), compact the KV cache.

Indexing: the base model's logits at hidden state h_i predict token i+1; head k (from 0) at h_i predicts
token i+2+k. A sequence in decode has its last token pending (not yet in the cache); that token is the
tree's root, and the heads' top-k at the hidden state of the token before it fill the tree's nodes: Medusa
heads all at once (a depth-d node takes head d-1's candidate of its rank), Hydra heads level by level (a
depth-d node takes its rank among the candidates head d-1 gives its parent, reading the parent's path). Each
sequence drafts, in place of the heads' tree (unless the user named one), a tree of as many nodes shaped at each
step by its drafts' own probabilities (SpineTrees, tree.spine_tree: EAGLE-2's choice of
the likeliest nodes, along the spine of rank-0 drafts).
Where the sequence's last tokens occurred in it before, a chain of the tokens that followed them then
(prompt lookup, engine.medusa.ngram) is verified instead of the heads' tree; a batch verifies each sequence's own
tree in one forward, under a mask of its own. The heads stop drafting for a while for a sequence decoding
alone, or a batch, whose tree steps emit fewer tokens than a step costs against a plain one, as the engine timed
its own steps, else as train-medusa timed the tree (engine.medusa.payoff)."""
from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from itertools import accumulate, chain, pairwise
from weakref import WeakKeyDictionary

import torch
from torch import nn

from engine.config import EngineConfig
from engine.kv_cache import KVCache
from engine.medusa.acceptance import Acceptance, TreeRows, VerifyTree, path_logprobs, row_starts
from engine.medusa.ngram import NgramIndex, PredictionIndex
from engine.medusa.payoff import WINDOW, Payoff, StepClock
from engine.medusa.tree import (
    DEFAULT_TREE,
    MedusaTree,
    TreeChoice,
    build_tree,
    load_tree,
    spine_may_grow,
    spine_paths,
    spine_tree,
)
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from models.kernels.decode import DecodeKernels, set_decode_kernels
from models.medusa import MedusaHeads, load_medusa_heads

LOOKUP_ONLY = "lookup"  # EngineConfig.medusa: speculate by prompt lookup alone, without heads
PREDICTION_ONLY = "prediction"  # EngineConfig.medusa: draft only from requests' predicted outputs

# Drafting reads every head's weights each step, from memory (the model's forward evicts them), so they are
# kept in bf16; their precision only moves which drafts are offered, never the output (the base model verifies
# each). Default model: 4 heads for one sequence 328 -> 293 us; 3.79 -> 3.78 tokens per step.
DRAFT_DTYPE = torch.bfloat16
LOOKUP_TOKENS = 4  # prompt lookup alone (no heads' tree to size its chains by): the longest chain
MAX_CHAIN = 8  # with heads, the longest chain however big their tree (8 measured: chain_limit)
# a sequence decoding alone whose last PREDICTION_RUN tokens followed its predicted output drafts MAX_CHAIN of it
# (or ngram_tokens), whatever its tree: such drafts are mostly accepted whole (`bench prediction`, answers
# regenerated: SmolLM2 Q4_1 1.28x plain speculating alone, 2.18x with chains of 3 from the prediction, its tree's
# length, 3.21x with chains of 8; BF16 5.26x -> 6.52x)
PREDICTION_RUN = 8
SPINE_WIDTH = 8  # a spine tree's candidates per level, at most (SpineTrees)


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


@dataclass
class SpineTrees:
    """The heads' trees for each sequence, shaped at each step by its drafts' own probabilities
    (tree.spine_tree): `depth` levels of `width` candidates along the spine, `size` nodes verified, as many as the
    static tree they stand in for (whose rows the engine timed). Invariant: shapes[counts] is the VerifyTree of
    spine_paths(counts), built when first drafted."""

    size: int
    depth: int
    width: int
    device: torch.device
    shapes: dict[tuple[int, ...], VerifyTree] = field(default_factory=dict)

    def verify_tree(self, counts: list[int]) -> VerifyTree:
        key = tuple(counts)
        if key not in self.shapes:
            self.shapes[key] = VerifyTree.of(build_tree(spine_paths(counts), f"spine{key}").to(self.device),
                                             node_tokens=True)
        return self.shapes[key]


@dataclass(frozen=True)
class HeadsTree:
    """A tree the heads draft for batches of up to max_batch_size sequences decoding together (None: any number),
    as drafting and verification read it; with `spine` (the tree not named by the user), each sequence drafts a
    spine tree of the same size in its place."""

    verify: VerifyTree
    levels: list[Level] | None  # Hydra heads: drafting level by level
    max_batch_size: int | None
    spine: SpineTrees | None = None

    @property
    def tree(self) -> MedusaTree:
        return self.verify.tree

    def owns(self, vt: VerifyTree) -> bool:
        """Is vt this tree, or one of its spine trees? (Either is timed and judged as this tree.)"""
        return vt is self.verify or (self.spine is not None and any(vt is s for s in self.spine.shapes.values()))


class Medusa:
    """Medusa speculation for one engine: by its heads and prompt lookup, or (heads None) by prompt lookup
    alone. Invariant: a sequence whose draft_token_ids are set has its last token pending, the tree they fill
    in draft_tree and room for max_tree_size more cache entries in the context; its next decode step verifies that
    tree, alone or beside its batch's other trees, where the step's budget and free blocks allow (else it decodes
    plainly). `trees`, the heads' (for sequences decoding alone first), are in
    order of max_batch_size."""

    def __init__(self, heads: MedusaHeads | None, trees: list[tuple[MedusaTree, int | None]], model: nn.Module,
                 kv_cache: KVCache, max_model_len: int, acceptance: Acceptance, max_batch_size: int | None = None,
                 ngram_tokens: int | None = 0, break_even: dict[int, float] | None = None, guard: bool = True,
                 spine: bool = False, own_lookup: bool = True) -> None:
        self.model, self.kv_cache, self.acceptance = model, kv_cache, acceptance
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        # prompt lookup: chains as long as chain_limit allows (ngram_tokens: at most; None: MAX_CHAIN, LOOKUP_TOKENS
        # without heads), verified in place of the heads' tree
        self.ngram_tokens = ngram_tokens
        self.own_lookup = own_lookup  # (False: only requests with a predicted output are looked up)
        self.ngram_indexes: WeakKeyDictionary[Sequence, NgramIndex] = WeakKeyDictionary()  # gone with the sequence
        self.predictions: WeakKeyDictionary[Sequence, PredictionIndex] = WeakKeyDictionary()
        # the heads' tree's step cost against a plain step, per batch size, as train-medusa timed it (empty: not
        # timed), until the engine has timed its own steps (step_clock): where the tree steps emit fewer tokens the
        # heads pause (engine.medusa.payoff), for a sequence decoding alone or for a whole batch
        self.break_even = break_even or {}
        self.guard = guard  # (False: the heads draft at every step, and no step is made plain to be timed)
        self.step_clock = StepClock()
        # this step's drafting, the last step's (which drafted the tree this one verifies), the heads' tree verified
        self._drafting, self._drafted, self._verified = 0.0, 0.0, None
        self.payoffs: WeakKeyDictionary[Sequence, Payoff] = WeakKeyDictionary()  # of sequences decoding alone
        self.recent_emitted: deque[float] = deque(maxlen=WINDOW)  # their last tree steps' tokens, any sequence's
        self.batch_payoff, self.batch_steps = Payoff(), 0  # of batches; its clock: batch steps proposed for
        self.heads, self.trees = heads, []
        if heads is not None:
            self._set_heads(heads, trees, spine)
        # the longest chain at any batch size: one sequence's (following its prediction), two's, and the first size
        # each further tree serves
        longest = max(map(self.chain_limit, {1, 2, *(t.max_batch_size + 1 for t in self.trees if t.max_batch_size)}))
        longest = longest and max(longest, self.prediction_limit)
        self.chains = [VerifyTree.of(build_tree([[0] * d for d in range(1, n + 1)], f"lookup{n}").to(kv_cache.device),
                                     node_tokens=True) for n in range(1, longest + 1)]
        drafted = [*(t.verify for t in self.trees), *self.chains[-1:]]  # (a spine tree: as many nodes as its tree)
        self.max_tree_size = max((vt.tree.size for vt in drafted), default=1)
        self.max_depth = max((vt.tree.depth for vt in drafted), default=0)

    def _set_heads(self, heads: MedusaHeads, trees: list[tuple[MedusaTree, int | None]], spine: bool) -> None:
        for tree, _ in trees:
            if tree.depth > heads.config.num_heads:
                raise ValueError(f"medusa tree {tree.name!r} is {tree.depth} deep, but there are only "
                                 f"{heads.config.num_heads} heads (a depth-d node takes head d-1's candidates)")
            if heads.num_draft_tokens < tree.top_k:
                raise ValueError(f"medusa tree {tree.name!r} takes each head's top {tree.top_k}, but the heads' "
                                 f"draft vocabulary has only {heads.num_draft_tokens} tokens")
        self.draft_weights = heads.draft_weights(self.model.lm_head)
        self.sequential = heads.config.sequential
        self.trees = [HeadsTree(VerifyTree.of(tree.to(self.kv_cache.device), node_tokens=self.sequential),
                                hydra_levels(tree) if self.sequential else None, cap) for tree, cap in trees]
        if spine:
            for i, heads_tree in enumerate(self.trees):
                paths = heads_tree.tree.size - 1  # (no deeper than that many nodes reach)
                if paths > 1:  # (one path: the spine tree is the tree)
                    spine_trees = SpineTrees(paths + 1, min(heads.config.num_heads, paths),
                                             min(SPINE_WIDTH, paths, heads.num_draft_tokens), self.kv_cache.device)
                    self.trees[i] = replace(heads_tree, spine=spine_trees)

    @property
    def prediction_limit(self) -> int:
        """The longest chain from its predicted output for a sequence decoding alone that follows it."""
        return MAX_CHAIN if self.ngram_tokens is None else self.ngram_tokens

    def chain_limit(self, batch_size: int) -> int:
        """The longest lookup chain at this batch size. With heads, no more rows than their tree there, which the
        engine pays for: a sequence decoding alone verifies a chain in place of the tree, so as many tokens as the tree
        drafts (SmolLM2 BF16 on AMX tiles, a 9-node tree: chains of 8 where they were 4, docstring prompts 1.90x ->
        2.01x; Q4_1, the 4-node chain, where each row costs arithmetic: chains of 3, 1.17x -> 1.25x, and of 8 1.11x);
        in a batch too (SmolLM2 Q4_1, batch 4, the 2-node tree: 0.85x-0.92x plain with chains of 4). Prompt lookup
        alone: LOOKUP_TOKENS. ngram_tokens, where given, bounds them (else MAX_CHAIN, with heads)."""
        if not self.trees:
            return LOOKUP_TOKENS if self.ngram_tokens is None else self.ngram_tokens
        return min(self.prediction_limit, self.tree_for(batch_size).tree.size - 1)

    def tree_for(self, batch_size: int) -> HeadsTree:
        """The heads' tree for this many sequences decoding together (beyond every tree's max_batch_size, which
        medusa_max_batch_size may raise, the last)."""
        return next((t for t in self.trees if t.max_batch_size is None or batch_size <= t.max_batch_size),
                    self.trees[-1])

    @classmethod
    def from_config(cls, config: EngineConfig, model: nn.Module, kv_cache: KVCache, max_model_len: int,
                    kernels: DecodeKernels | None) -> Medusa | None:
        """The engine's Medusa: heads from config.medusa, tree from config.medusa_tree, else the one measured
        for the heads (TreeChoice), else the default; None when the measurement found that no tree pays.
        config.medusa "lookup": prompt lookup alone; "prediction": requests' predicted outputs alone. Drafting uses
        the CPU kernels when the engine does."""
        acceptance = Acceptance(config.medusa_acceptance, config.medusa_posterior_threshold,
                                config.medusa_posterior_alpha, kernels)
        options = dict(acceptance=acceptance, ngram_tokens=config.medusa_ngram_tokens, guard=config.medusa_guard)
        if config.medusa in (LOOKUP_ONLY, PREDICTION_ONLY):
            if config.medusa_ngram_tokens == 0:
                raise ValueError(f"medusa {config.medusa!r} speculates by prompt lookup alone: medusa_ngram_tokens "
                                 "must be >= 1")
            if config.medusa_tree is not None:
                raise ValueError(f"medusa {config.medusa!r} drafts chains of looked-up tokens, not a tree of heads' "
                                 "guesses: medusa_tree is for heads")
            # batch 1 unless told: the chains do not pay in a batch, where each row costs arithmetic (SmolLM2 Q4_1,
            # 4 sequences, 2 threads, Zen 4: 0.90x / 1.03x plain decoding on everyday / docstring prompts, one forward
            # for chains and plain rows; 0.83x when sequences without a match took a forward of their own)
            return cls(None, [], model, kv_cache, max_model_len, max_batch_size=config.medusa_max_batch_size or 1,
                       own_lookup=config.medusa == LOOKUP_ONLY, **options)
        choice = TreeChoice.load(config.medusa, config.weights) if config.medusa_tree is None else None
        if choice is not None and not choice.trees:
            warnings.warn(f"Medusa heads {config.medusa}: {choice.summary}; decoding plainly", stacklevel=2)
            return None
        heads = load_medusa_heads(config.medusa, model.config.hidden_size, model.config.vocab_size,
                                  DRAFT_DTYPE, kv_cache.device)
        set_decode_kernels(heads, kernels)
        if choice is not None:
            timed = {"threads": choice.measurements.get("threads"), "weights": choice.measurements.get("weights")}
            here = {"threads": torch.get_num_threads(), "weights": config.weights}
            differs = [f"{key} {timed[key]} (this engine: {here[key]})" for key in timed
                       if timed[key] not in (None, here[key])]
            if differs:
                warnings.warn(f"Medusa heads {config.medusa}: their tree was timed with {' and '.join(differs)}, "
                              "where it and its batch limit may not pay (time the trees here: gorgon train-medusa "
                              "--retime --out HEADS --model MODEL --threads N; or name a tree and "
                              "--medusa-max-batch-size)", stacklevel=2)
            trees = [(build_tree(t.paths, "measured"), t.max_batch_size) for t in choice.trees]
        else:
            tree = load_tree(config.medusa_tree or DEFAULT_TREE)
            if config.medusa_tree is None:  # the default tree, as deep as the heads allow
                tree = tree.cut(min(tree.depth, heads.config.num_heads))
            trees = [(tree, None)]
        max_batch_size = config.medusa_max_batch_size or (choice.max_batch_size if choice is not None else None)
        return cls(heads, trees, model, kv_cache, max_model_len, max_batch_size=max_batch_size,
                   break_even=choice.break_even() if choice is not None else None,
                   spine=config.medusa_tree is None, **options)

    def can_speculate(self, seq: Sequence) -> bool:
        # requests that want hidden states decode plainly; adapters speculate with the base model's heads
        # (verification runs through the adapter, so output is unchanged; only acceptance may drop)
        params = seq.params
        return (params.use_medusa and not params.return_hidden_states and not seq.is_finished
                and seq.num_virtual_tokens + len(seq) - 1 + self.max_tree_size <= self.max_model_len)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], hidden: torch.Tensor, num_running: int) -> None:
        """Set each sequence's drafts: by prompt lookup where its last tokens occurred before, else by the heads
        from the hidden state [len(seqs), hidden] of the token before its pending one (None where it cannot
        speculate, and for all of them while more than max_batch_size of the engine's num_running sequences
        decode: there plain steps are faster)."""
        crowded = self.max_batch_size is not None and num_running > self.max_batch_size
        speculating = [] if crowded else [i for i, seq in enumerate(seqs) if self.can_speculate(seq)]
        for seq in seqs:
            seq.draft_token_ids, seq.draft_tree = None, None
        judged = self.guard and bool(self.trees)
        if speculating and judged and self.step_clock.wants_plain(num_running):
            speculating = []  # a plain step, timed
        # a batch drafts as a whole or not at all, as its steps were timed (payoff)
        if judged and num_running > 1 and speculating:
            self.batch_steps += 1
            if not self.batch_payoff.pays(self.batch_steps, self._break_even_at(num_running)):
                speculating = []
        if self.chains:
            limit = self.chain_limit(num_running)
            following = self.prediction_limit if num_running == 1 else limit
            speculating = [i for i in speculating if not self._look_up(seqs[i], limit, following)]
        if judged and num_running == 1:
            speculating = [i for i in speculating
                           if self._payoff(seqs[i]).pays(len(seqs[i]), self._break_even_at(1))]
        if not speculating or self.heads is None:
            return
        start = time.perf_counter()
        heads_tree = self.tree_for(num_running)
        if heads_tree.spine is not None:
            drafted = self._draft_spines(hidden[speculating], [seqs[i].token_ids[-1] for i in speculating],
                                         heads_tree.spine)
        else:
            if self.sequential:
                roots = torch.tensor([seqs[i].token_ids[-1] for i in speculating], device=hidden.device)
                drafts = self._draft_levels(hidden[speculating], roots, heads_tree.levels)
            else:
                tree = heads_tree.tree
                top = self.heads.top_k(hidden[speculating], self.draft_weights, tree.depth, tree.top_k)  # [depth, B, k]
                drafts = top.transpose(0, 1).tolist()
            drafted = [(seq_drafts, heads_tree.verify) for seq_drafts in drafts]
        for i, (seq_drafts, vt) in zip(speculating, drafted):
            seqs[i].draft_token_ids, seqs[i].draft_tree = seq_drafts, vt
        self._drafting = time.perf_counter() - start  # (the drafts' .tolist() waited for a GPU)

    def _payoff(self, seq: Sequence) -> Payoff:
        """The record of a sequence decoding alone. A new one starts from the last window of tree steps on this
        engine (the heads' recent luck with such text), so that after sequences the heads failed on, one is judged
        at once, not after a window of its own failing steps (SmolLM2 Q4_1, everyday prompts: 0.96-0.98x plain
        -> 1.00x, sampled 0.94x -> 0.97x)."""
        if seq not in self.payoffs:
            self.payoffs[seq] = Payoff(deque(self.recent_emitted, maxlen=WINDOW))
        return self.payoffs[seq]

    def _break_even_at(self, batch_size: int) -> float | None:
        """The tokens a step of the heads' tree must emit per sequence at this batch size to pay: its time against
        a plain step's, as the engine timed them, else as train-medusa did at the smallest batch size that holds
        batch_size (else at the largest it timed); None where neither did."""
        live = self.step_clock.ratio(batch_size, self.tree_for(batch_size).verify)
        if live is not None or not self.break_even:
            return live
        sizes = sorted(self.break_even)
        return self.break_even[next((b for b in sizes if b >= batch_size), sizes[-1])]

    def record_step(self, batch: ScheduledBatch, seconds: float) -> None:
        """Time a decode step that was all plain, or all one of the heads' trees (StepClock). Its cost leaves out
        the drafting it did for the next step and takes in the drafting of the tree it verified."""
        if self.guard and self.trees:  # (only the guard reads the clock)
            if batch.tree_seqs and not batch.seqs and self._verified is not None:
                self.step_clock.record(len(batch.tree_seqs), self._verified, seconds - self._drafting + self._drafted)
            elif batch.seqs and not batch.tree_seqs and all(n == 1 for n in batch.num_new_tokens):
                self.step_clock.record(len(batch.seqs), None, seconds - self._drafting)
        self._drafting, self._drafted, self._verified = 0.0, self._drafting, None

    def _look_up(self, seq: Sequence, max_tokens: int, following: int) -> bool:
        """Draft by prompt lookup (at most max_tokens): from the sequence's predicted output where it follows it
        (`following` tokens where its last PREDICTION_RUN were the prediction's); else where its last tokens
        occurred in it before; else where they occur in the predicted output. (Where an answer edits the prediction
        throughout, its own earlier edits predict the next ones better.)"""
        prediction = self.predictions.get(seq)
        if prediction is None and seq.params.prediction:
            prediction = self.predictions[seq] = PredictionIndex.of(seq.prompt_token_ids,
                                                                    seq.params.prediction)
        found = []
        if prediction is not None:
            on_track = prediction.on_track(seq.token_ids, PREDICTION_RUN)
            found = prediction.propose(seq.token_ids, following if on_track else max_tokens)
        if (self.own_lookup or prediction is not None) and not (found and prediction.followed):
            found = self.ngram_indexes.setdefault(seq, NgramIndex()).propose(seq.token_ids, max_tokens) or found
        if found:
            seq.draft_token_ids, seq.draft_tree = [[t] for t in found], self.chains[len(found) - 1]
        return bool(found)

    @staticmethod
    def _node_tokens(seq: Sequence) -> list[int]:
        """The token at each node of the tree a sequence drafted: its root (its pending token), then its drafts."""
        drafts = [seq.token_ids[-1], *chain.from_iterable(seq.draft_token_ids)]
        return [drafts[i] for i in seq.draft_tree.candidate_index]

    def _draft_levels(self, hidden: torch.Tensor, roots: torch.Tensor, levels: list[Level]) -> list[list[list[int]]]:
        """Hydra: the tree's node tokens, level by level, for B sequences from their hidden states [B, hidden]
        and roots [B] -> per sequence, per depth, its nodes' tokens. At depth d, states[:, j] is what node j
        (of that depth) starts from: its parent's head input (the hidden state at the root)."""
        num_seqs, width = hidden.shape
        states, tokens, drafts = hidden[:, None], roots[:, None], []  # [B, nodes, hidden], [B, nodes]
        embed = self.model.model.embed_tokens
        for head, level in enumerate(levels):
            parent_states = states[:, level.parents].flatten(0, 1)
            parent_tokens = tokens[:, level.parents].flatten()
            x, top, _ = self.heads.draft_level(parent_states, embed(parent_tokens), head, self.draft_weights,
                                               level.top_k)
            top = top.view(num_seqs, len(level.parents), -1)
            tokens = top[:, level.child_parent, level.child_rank]  # [B, m]
            states = x.view(num_seqs, len(level.parents), width)[:, level.child_parent]
            drafts.append(tokens)
        bounds = [0, *accumulate(t.shape[1] for t in drafts)]
        return [[row[a:b] for a, b in pairwise(bounds)] for row in torch.cat(drafts, dim=1).tolist()]

    def _draft_spines(self, hidden: torch.Tensor, roots: list[int],
                      spine: SpineTrees) -> list[tuple[list[list[int]], VerifyTree]]:
        """Each sequence's spine tree from its hidden state (hidden: [B, hidden]) and root token -> per sequence (its
        nodes' tokens per depth, the tree). Hydra heads: each level runs the head on the spine's node alone (its
        rank-0 child leads on), and no level is drafted that none of the trees could take a node of (spine_may_grow:
        SmolLM2's 5-node trees on everyday prompts drafted 2.7 of their 4 levels); Medusa heads read the hidden
        state alone, so one call drafts every level."""
        if self.sequential:
            state, token = hidden, torch.tensor(roots, device=hidden.device)
            tops, levels = [], [[] for _ in roots]  # levels[b]: sequence b's log-probabilities, level by level
            for head in range(spine.depth):
                state, top, logprob = self.heads.draft_level(state, self.model.model.embed_tokens(token), head,
                                                             self.draft_weights, spine.width)
                tops.append(top)
                token = top[:, 0]
                for seq_levels, level in zip(levels, logprob.tolist()):
                    seq_levels.append(level)
                if not any(spine_may_grow(seq_levels, spine.size) for seq_levels in levels):
                    break
            tops = torch.stack(tops, dim=1)  # [B, levels drafted, width]
        else:
            tops, logprobs = self.heads.top_k_logprobs(hidden, self.draft_weights, spine.depth, spine.width)
            tops, levels = tops.transpose(0, 1), logprobs.transpose(0, 1).tolist()
        drafted = []
        for seq_tops, seq_levels in zip(tops.tolist(), levels):
            counts = spine_tree(seq_levels, spine.size)
            drafted.append(([row[:n] for row, n in zip(seq_tops, counts)], spine.verify_tree(counts)))
        return drafted

    def tree_rows(self, seqs: list[Sequence]) -> TreeRows:
        """The rows that verify these sequences' drafts: each its own tree (the heads' or a lookup chain), rooted at
        its pending token, node i at cache index root + i."""
        trees = [seq.draft_tree for seq in seqs]
        positions, spans = [], []
        for seq, vt in zip(seqs, trees):
            root = seq.num_virtual_tokens + seq.num_computed_tokens  # the root's cache index and position
            positions += [root + d for d in vt.tree.depths]
            spans.append((root, root + vt.tree.size))
        return TreeRows(trees, [t for seq in seqs for t in self._node_tokens(seq)], positions, spans)

    @torch.inference_mode()
    def verify(self, seqs: list[Sequence], rows: TreeRows, hidden: torch.Tensor, logits: torch.Tensor,
               slot_mapping: torch.Tensor, rng: torch.Generator,
               num_running: int) -> tuple[list[list[int]], list[list[tuple | None]], torch.Tensor]:
        """Accept from the forward over `rows` (this step's tree rows: their hidden states, logits and cache slots);
        returns, per sequence, the accepted tokens plus the bonus token sampled by the base model after them, their
        logprobs (each read at the node before it, as plain decoding reads them; None where not asked for), and the
        accepted last node's hidden states [len(seqs), hidden] (what propose() needs next). The accepted K/V ends up
        in consecutive cache entries after the sequence's past; the caller releases the blocks beyond them."""
        trees, starts = rows.trees, row_starts(rows.trees)
        paths, bonus = self.acceptance.accept(seqs, trees, rows.input_ids, logits, rng)
        self._compact(slot_mapping, starts, paths)
        out = [[rows.input_ids[first + node] for node in path[1:]] + [bonus[b]]
               for b, (first, path) in enumerate(zip(starts, paths))]
        logprobs = path_logprobs(seqs, trees, paths, out, logits)
        owners = [next((h for h in self.trees if h.owns(vt)), None) for vt in trees]  # (None: a lookup chain)
        self._verified = owners[0].verify if owners[0] is not None and owners.count(owners[0]) == len(owners) else None
        if any(owners):
            if num_running == 1:
                self._payoff(seqs[0]).record(len(out[0]))
                self.recent_emitted.append(len(out[0]))
            else:
                self.batch_payoff.record(sum(map(len, out)) / len(out))
        return out, logprobs, hidden[[first + path[-1] for first, path in zip(starts, paths)]]

    def _compact(self, slot_mapping: torch.Tensor, starts: list[int], paths: list[list[int]]) -> None:
        """Move each accepted path's K/V (all layers) so that its depth-d node sits in the slot of tree
        row d: sequence b's node i was written to slot_mapping[starts[b] + i], the slot of cache index root + i."""
        moves = [(first + node, first + depth) for first, path in zip(starts, paths)
                 for depth, node in enumerate(path) if node != depth]
        if not moves:
            return
        src, dst = map(list, zip(*moves))
        self.kv_cache.copy(slot_mapping[src], slot_mapping[dst])
