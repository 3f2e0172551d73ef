"""Medusa trees: `medusa_choices` (rank paths such as [[0], [0, 0], [1]]) -> static verification buffers.

Path [r0, r1, ..., rd-1] is the node reached by taking head 0's rank-r0 token, then head 1's rank-r1
token, and so on; node 0 is the root, the last accepted token. Every head reads the same hidden state,
so the token of a depth-d node depends only on its own rank: head d-1's top-k list at that rank."""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models.kernels import cpu_fingerprint
from models.medusa import DRAFT_VOCAB_FILE, WEIGHTS_FILE

# Shipped trees, by name (the number is the paths, i.e. nodes besides the root). On a CPU the small
# ones win: a few rows (root included) go through the same weight-streaming kernel as a one-token
# decode step and cost little more; mc_sim_7b_63 is the reference's tree for 7B models on GPUs.
TREES: dict[str, list[list[int]]] = {
    "chain2": [[0], [0, 0]],
    "chain3": [[0], [0, 0], [0, 0, 0]],
    "cpu3": [[0], [1], [0, 0]],
    "chain4": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]],
    "cpu6": [[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0]],
    "cpu12": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [1, 1], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0, 0],
              [0, 0, 0, 1]],
    "mc_sim_7b_63": [
        [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
        [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8],
        [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0],
        [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0],
        [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1],
        [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0]],
}
DEFAULT_TREE = "chain4"
TREE_FILE = "tree.json"  # beside a set of heads: the tree train-medusa measured best for them (see TreeChoice)


@dataclass(frozen=True)
class MedusaTree:
    """Static buffers of one tree. Invariant: node 0 is the root and nodes are sorted by (depth, path),
    so every node's ancestors have smaller indices; node i sits at position (root position + depths[i])."""

    name: str
    paths: list[tuple[int, ...]]  # node i >= 1 is paths[i - 1]
    mask: torch.Tensor  # [T, T] bool: node i sees node j iff j is i or an ancestor of i
    depths: list[int]  # [T] root 0 (host lists: they only build step inputs)
    parents: list[int]  # [T] node index of the parent (the root is its own parent)
    candidate_index: list[int]  # [T] index into [root, head 0's top-k, head 1's top-k, ...]
    leaf_paths: list[list[int]]  # the nodes of each root-to-leaf path, root first
    top_k: int  # candidates taken from each head

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def depth(self) -> int:
        """Heads the tree needs: the depth of its deepest node."""
        return max(self.depths)

    def to(self, device: torch.device | str) -> MedusaTree:
        return replace(self, mask=self.mask.to(device))

    def cut(self, depth: int) -> MedusaTree:
        """The tree's nodes down to `depth` (the first nodes of this one: nodes are sorted by depth)."""
        if not 1 <= depth <= self.depth:
            raise ValueError(f"medusa tree {self.name!r} is {self.depth} deep; it cannot be cut at depth {depth}")
        if depth == self.depth:
            return self
        kept = [list(p) for p in self.paths if len(p) <= depth]
        return build_tree(kept, f"{self.name}[:{depth}]").to(self.mask.device)


def build_tree(choices: list[list[int]], name: str = "custom") -> MedusaTree:
    paths = sorted({tuple(c) for c in choices}, key=lambda p: (len(p), p))
    if len(paths) != len(choices):
        raise ValueError(f"medusa tree {name!r} lists a path twice")
    if not paths or any(len(p) == 0 or min(p) < 0 for p in paths):
        raise ValueError(f"medusa tree {name!r}: every path must be a non-empty list of ranks >= 0")
    index = {p: i + 1 for i, p in enumerate(paths)}
    missing = sorted({p[:-1] for p in paths if len(p) > 1} - set(index))
    if missing:
        raise ValueError(f"medusa tree {name!r} is not connected: the parent paths "
                         f"{[list(p) for p in missing]} are missing")
    top_k = max(max(p) for p in paths) + 1
    size = len(paths) + 1

    mask = torch.eye(size, dtype=torch.bool)
    mask[:, 0] = True
    depths = [0] * size
    parents = [0] * size
    candidate_index = [0] * size
    for p, i in index.items():
        ancestors = [index[p[:d]] for d in range(1, len(p))]
        mask[i, ancestors] = True
        depths[i] = len(p)
        parents[i] = ancestors[-1] if ancestors else 0
        candidate_index[i] = 1 + (len(p) - 1) * top_k + p[-1]

    leaves = [p for p in paths if not any(q[:len(p)] == p and len(q) > len(p) for q in paths)]
    leaf_paths = [[0] + [index[leaf[:d]] for d in range(1, len(leaf) + 1)] for leaf in leaves]
    return MedusaTree(name, paths, mask, depths, parents, candidate_index, leaf_paths, top_k)


def spine_tree(logprobs: list[list[float]], size: int) -> list[int]:
    """A tree of `size` nodes chosen from the drafts' own probabilities, as EAGLE-2 chooses (Li et al., 2024), along
    a spine: at each depth d the heads drafted the children of the spine's depth-(d-1) node (the root first), the
    rank-r one with log-probability logprobs[d-1][r]; the spine goes on through each level's rank-0 child. A node's
    score is its path's log-probability. Returns how many of each depth's children (their lowest ranks) the tree
    takes: the size - 1 likeliest nodes, ties to the shallower, then to the lower rank. A child never scores above its
    parent, so the nodes taken hold their parents; trailing depths with none are left off."""
    scored, spine = [], 0.0
    for depth, level in enumerate(logprobs):
        scored += [(-(spine + logprob), depth, rank) for rank, logprob in enumerate(level)]
        spine += level[0]
    counts = [0] * len(logprobs)
    for _, depth, _ in sorted(scored)[:size - 1]:
        counts[depth] += 1
    while counts and not counts[-1]:
        counts.pop()
    return counts


def spine_may_grow(logprobs: list[list[float]], size: int) -> bool:
    """Could spine_tree take a node of the next level, were it drafted after `logprobs`? Not once size - 1 nodes score
    at least the spine's deepest: a node below it scores no more, and ties go to the shallower. (Drafting stops there:
    the tree is the same.)"""
    spine, scores = 0.0, []
    for level in logprobs:
        scores += [spine + logprob for logprob in level]
        spine += level[0]
    return sum(score >= spine for score in scores) < size - 1


def spine_paths(counts: list[int]) -> list[list[int]]:
    """The rank paths of a spine tree (spine_tree): counts[d] children of the spine's depth-d node."""
    return [[0] * depth + [rank] for depth, n in enumerate(counts) for rank in range(n)]


def load_tree(name_or_file: str) -> MedusaTree:
    """A shipped tree by name, or a JSON file holding a list of rank paths."""
    if name_or_file in TREES:
        return build_tree(TREES[name_or_file], name_or_file)
    path = Path(name_or_file)
    if not path.is_file():
        raise ValueError(f"unknown medusa tree {name_or_file!r}: give one of {', '.join(TREES)}, or a JSON "
                         "file with a list of rank paths")
    return build_tree(rank_paths(json.loads(path.read_text()), path), path.stem)


def rank_paths(choices: object, source: Path) -> list[list[int]]:
    """choices, read from source, if it is a list of rank paths; else a ValueError naming source."""
    if not isinstance(choices, list) or not all(isinstance(c, list) and all(isinstance(r, int) for r in c)
                                                for c in choices):
        raise ValueError(f"{source} must hold a JSON list of rank paths, e.g. [[0], [0, 0], [1]]")
    return choices


# ---- choosing a tree from measurement -------------------------------------------------------------------
def accepted_path_counts(ranks: torch.Tensor, max_rank: int) -> Counter[tuple[int, ...]]:
    """ranks [P, K]: at each of P held-out positions, the rank of the right token among head k's candidates
    (max_rank or more: not among them). Returns how often each rank path was right from the root on: a tree
    node with that path would have been accepted that often."""
    counts: Counter[tuple[int, ...]] = Counter()
    for row in ranks.tolist():
        for depth, rank in enumerate(row):
            if rank >= max_rank:
                break
            counts[tuple(row[:depth + 1])] += 1
    return counts


def expected_tokens_per_step(paths: list[tuple[int, ...]] | list[list[int]], counts: Counter[tuple[int, ...]],
                             num_positions: int) -> float:
    """Tokens a step emits on average with this tree: the bonus token, plus one per accepted node (the
    right tokens are one sequence, so at most one node per depth is right)."""
    return 1 + sum(counts[tuple(p)] for p in paths) / num_positions


def best_tree(counts: Counter[tuple[int, ...]], num_paths: int) -> list[list[int]]:
    """The num_paths rank paths accepted most often: the tree of that size that accepts the most tokens.
    A path is never right more often than its parent, and ties go to the shorter one, so it is connected."""
    return [list(p) for p in sorted(counts, key=lambda p: (-counts[p], len(p), p))[:num_paths]]


def machine_tree_file(heads_folder: str | Path, weights: str) -> Path:
    """Where `train-medusa --retime` keeps the tree it measured for these heads (as stored beside them) on
    this CPU at this thread count, with these weights (EngineConfig.weights: the checkpoint and the dtype it
    runs in, on which a tree step's cost against a plain one depends as much as on the CPU); the engine prefers
    it to the one beside the heads, which was measured where the heads were trained. Keyed on the heads' files
    (tree.json, their weights, their draft vocabulary): a tree.json copied beside other heads, or heads trained
    again with --no-tree, never take another's timing. Under $GORGON_CACHE_DIR (default ~/.cache/gorgon)."""
    digest = hashlib.sha256()
    for name in (TREE_FILE, WEIGHTS_FILE, DRAFT_VOCAB_FILE):
        path = Path(heads_folder) / name
        digest.update(path.read_bytes() if path.is_file() else b"")
        digest.update(b"\0")  # one file's end, so that bytes cannot move from one file to the next
    heads = digest.hexdigest()[:12]
    model = hashlib.sha256(weights.encode()).hexdigest()[:8]
    root = Path(os.environ.get("GORGON_CACHE_DIR", Path.home() / ".cache" / "gorgon"))
    return root / "medusa_trees" / f"{heads}-{model}-{cpu_fingerprint()}-{torch.get_num_threads()}threads.json"


@dataclass(frozen=True)
class BatchTree:
    """A tree chosen for batches of up to max_batch_size sequences decoding together (None: any number)."""

    paths: list[list[int]]
    max_batch_size: int | None = None


@dataclass
class TreeChoice:
    """The trees measured best for a set of heads on one machine, stored beside them (TREE_FILE), or for this
    machine and weights (machine_tree_file); the engine uses them when no tree is named. Invariant: `trees` are in
    order of max_batch_size, each serving the batch sizes above the one before it up to its own (the biggest tree
    pays most for a sequence decoding alone, where a step costs least more than a plain one, a smaller one in a
    batch); above the last one's max_batch_size the engine decodes plainly. No trees: none beat plain decoding."""

    trees: list[BatchTree]
    summary: str  # the choice and its figures, in words
    measurements: dict  # what the choice was made from

    @property
    def max_batch_size(self) -> int | None:
        """The most sequences decoding together at which a tree was measured to pay (None: not measured)."""
        return self.trees[-1].max_batch_size if self.trees else None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(
            {"trees": [{"tree": t.paths, "max_batch_size": t.max_batch_size} for t in self.trees],
             "summary": self.summary, "measurements": self.measurements}, indent=1) + "\n")

    def break_even(self) -> dict[int, float]:
        """Per batch size timed: the step cost of the tree chosen there against a plain one, i.e. the tokens a step
        must emit per sequence for the tree to pay (engine.medusa.payoff); empty when the choice holds no timing of
        its trees."""
        rows = self.measurements.get("candidates", [])
        sizes = sorted({int(key.removeprefix("step_ms_bs")) for row in rows for key in row
                        if key.startswith("step_ms_bs")})
        ratios = {}
        for b in sizes:
            tree = next((t for t in self.trees if t.max_batch_size is None or b <= t.max_batch_size), None)
            row = next((r for r in rows if tree is not None and r["tree"] == tree.paths), {})
            if f"step_ms_bs{b}" in row:
                ratios[b] = row[f"step_ms_bs{b}"] / row[f"plain_step_ms_bs{b}"]
        return ratios

    @classmethod
    def load(cls, heads_folder: str | Path, weights: str) -> TreeChoice | None:
        """The choice measured on this machine with these weights (machine_tree_file), else the one stored beside
        the heads; None if there is none."""
        path = machine_tree_file(heads_folder, weights)
        return cls.read(path if path.is_file() else Path(heads_folder) / TREE_FILE)

    @classmethod
    def read(cls, path: Path) -> TreeChoice | None:
        """The choice in one file (or, as files before per-batch trees held it, one "tree" and its
        "max_batch_size"); None if there is no such file."""
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        entries = record.get("trees")
        if entries is None:
            entries = [] if record.get("tree") is None else [record]
        trees = []
        for entry in entries:
            build_tree(rank_paths(entry.get("tree"), path), str(path))  # a broken file fails here, naming itself
            cap = entry.get("max_batch_size")
            if cap is not None and (not isinstance(cap, int) or cap < 1):
                raise ValueError(f"{path}: max_batch_size must be a positive integer or null, got {cap!r}")
            trees.append(BatchTree(entry["tree"], cap))
        caps = [t.max_batch_size for t in trees]
        bounded = [c for c in caps if c is not None]
        if None in caps[:-1] or bounded != sorted(set(bounded)):
            raise ValueError(f"{path}: the trees must come in order of max_batch_size, each bigger than the one "
                             f"before (null, any number, only last), got {caps}")
        return cls(trees, record.get("summary", ""), record.get("measurements", {}))
