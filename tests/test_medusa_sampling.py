"""Sampled Medusa verification preserves plain sampling's distribution: the rejection rule recomputed by hand
on a hand-built tree, and chi-square tests of the joint distribution of the first tokens against the exact
one, on a model with a 16-token vocabulary (so the joint distribution has few cells)."""
from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampler import TokenCounts, adjust_logits, filtered_probs
from engine.sequence import Sequence
from models.medusa import MedusaConfig, MedusaHeads, save_medusa_heads

from conftest import adjusted_by_hand, hf_model, save_tiny_model

VOCAB = 16
PROMPT = [5, 9, 3, 12, 7]
# root; depth 1: head 0's ranks 0-3; depth 2: head 1's ranks 0-1 under the first and rank 0 under the next two
TREE = [[0], [1], [2], [3], [0, 0], [0, 1], [1, 0], [2, 0]]
NUM_SAMPLES = 4000
P_MIN = 1e-4  # chi-square p-value below which the distributions differ (fixed seeds: the test is deterministic)

PLAIN_T1 = SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True)
FILTERED = SamplingParams(max_tokens=3, temperature=0.8, top_k=6, top_p=0.8, ignore_eos=True)
PENALIZED = SamplingParams(max_tokens=3, temperature=1.0, min_p=0.05, repetition_penalty=1.5, presence_penalty=0.5,
                           frequency_penalty=0.4, logit_bias={5: 1.0, 0: -2.0}, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads, and on a shared machine extra threads make them far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """(model folder, heads folder, tree file): a 16-token model, 2 random heads, TREE."""
    folder = save_tiny_model(tmp_path_factory.mktemp("vocab16"), vocab_size=VOCAB)
    heads_dir = tmp_path_factory.mktemp("vocab16_heads")
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(2, 1, 64, VOCAB, False))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_medusa_heads(heads, heads_dir)
    tree = heads_dir / "tree.json"
    tree.write_text(json.dumps(TREE))
    return folder, heads_dir, tree


def medusa_llm(small_vocab, **kwargs) -> LLM:
    folder, heads_dir, tree = small_vocab
    return LLM(folder, medusa=str(heads_dir), medusa_tree=str(tree), max_num_seqs=1024, num_kv_blocks=2048, **kwargs)


def chi_square_p_value(observed: Counter, expected: dict, n: int) -> float:
    """Goodness of fit of `observed` counts to the probabilities `expected`; cells expected fewer than 5 times
    are pooled into one."""
    stat, cells, pooled_observed, pooled_expected = 0.0, 0, 0, 0.0
    assert set(observed) <= {cell for cell, p in expected.items() if p > 0}, "a cell of probability 0 came out"
    for cell, p in expected.items():
        if n * p >= 5:
            stat += (observed[cell] - n * p) ** 2 / (n * p)
            cells += 1
        else:
            pooled_observed += observed[cell]
            pooled_expected += n * p
    if pooled_expected > 0:
        stat += (pooled_observed - pooled_expected) ** 2 / pooled_expected
        cells += 1
    return torch.special.gammaincc(torch.tensor((cells - 1) / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


def exact_joint(folder, params: SamplingParams, num_tokens: int) -> dict[tuple[int, ...], float]:
    """The probability of every sequence of the first num_tokens tokens under plain sampling: the model's
    logits after each possible prefix (one HF forward per length), through the sampler's own transforms."""
    model = hf_model(folder)
    joint = {(): 1.0}
    for _ in range(num_tokens):
        prefixes = list(joint)
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT + list(p) for p in prefixes])).logits[:, -1]
        histories = [PROMPT + list(p) for p in prefixes]
        counts = TokenCounts.of(histories, [len(PROMPT)] * len(prefixes), VOCAB, logits.device)
        probs = filtered_probs(adjust_logits(logits, [params] * len(prefixes), counts), [params] * len(prefixes))
        joint = {(*p, t): joint[p] * probs[i, t].item() for i, p in enumerate(prefixes) for t in range(VOCAB)}
    return joint


# ---- the rule on a hand-built tree ------------------------------------------------------------------------
def specinfer_outcomes(node_probs: list[list[float]], tokens: list[int], children: list[list[int]]) -> dict:
    """Probability of every (accepted path, bonus token) under SpecInfer's multi-candidate rule with point-mass
    drafts, literally: at a node, try its children in order, accept child x with probability residual(x); on
    rejection zero residual(x) and renormalise; when all are rejected, draw the bonus from the residual."""
    outcomes: dict[tuple[tuple[int, ...], int], float] = {}

    def visit(path: list[int], reach: float) -> None:
        residual = list(node_probs[path[-1]])
        for child in children[path[-1]]:
            total = sum(residual)
            accept = residual[tokens[child]] / total if total > 0 else 0.0
            if accept > 0:
                visit(path + [child], reach * accept)
            reach *= 1 - accept
            residual[tokens[child]] = 0.0
        total = sum(residual)
        for token, r in enumerate(residual):
            if r > 0:
                outcomes[(tuple(path), token)] = reach * r / total

    visit([0], 1.0)
    return outcomes


def hand_node_probs(seq: Sequence, tokens: list[int], parents: list[int], logits: torch.Tensor) -> list[list[float]]:
    """Each node's distribution by hand: its history is the sequence's tokens and its path's below the root."""
    p, out = seq.params, []
    for node in range(len(tokens)):
        path, n = [], node
        while n != 0:
            path.append(tokens[n])
            n = parents[n]
        row = adjusted_by_hand(logits[node].tolist(), p, seq.token_ids + path[::-1], seq.output_token_ids + path[::-1])
        if p.greedy:
            out.append([float(t == max(range(len(row)), key=row.__getitem__)) for t in range(len(row))])
            continue
        row = [x / p.temperature for x in row]
        kth = sorted(row, reverse=True)[p.top_k - 1]
        weights = [math.exp(x) if x >= kth else 0.0 for x in row]
        out.append([w / sum(weights) for w in weights])
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_rejection_rule_recomputed_on_a_hand_built_tree(small_vocab, temperature):
    """Medusa's verification of one tree, 20000 times, against the rule's outcome probabilities computed
    by hand from the base logits, with top-k, penalties and logit_bias reading each node's own path."""
    llm = medusa_llm(small_vocab)
    tree, children = llm.medusa.tree_for(1).tree, llm.medusa.tree_for(1).verify.children
    assert tree.size == 9 and children[0] == [1, 2, 3, 4] and children[1] == [5, 6] and children[3] == [8]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(tree.size, VOCAB, generator=g) * 2
    params = SamplingParams(temperature=temperature, top_k=6, repetition_penalty=1.3, presence_penalty=0.3,
                            frequency_penalty=0.2, logit_bias={4: 1.5})
    seq = Sequence("hand", PROMPT + [4, 9, 4], params, num_prompt_tokens=len(PROMPT))
    # children of the root are likely tokens (so the walk goes deep), one a token of the history
    likely = logits[0].argsort(descending=True).tolist()
    tokens = [4, likely[0], likely[1], 9, likely[2], likely[3], 4, likely[0], 11]
    probs = hand_node_probs(seq, tokens, tree.parents, logits)
    expected = specinfer_outcomes(probs, tokens, children)
    assert sum(expected.values()) == pytest.approx(1.0)

    copies, rounds = 2000, 10
    rng = torch.Generator().manual_seed(1)
    observed: Counter = Counter()
    for _ in range(rounds):
        paths, bonus = llm.medusa.acceptance.accept([seq] * copies, [llm.medusa.tree_for(1).verify] * copies,
                                                    tokens * copies, logits.repeat(copies, 1), rng)
        observed.update((tuple(path), token) for path, token in zip(paths, bonus))
    if temperature == 0:
        assert len(expected) == 1 and observed == Counter({next(iter(expected)): copies * rounds})
    else:
        assert max(len(path) for path, _ in observed) == 3  # the walk reached depth 2
        assert chi_square_p_value(observed, expected, copies * rounds) > P_MIN


# ---- end to end: the joint distribution of the first tokens -------------------------------------------------
SLOW = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("GORGON_SLOW") != "1", reason="slow: GORGON_SLOW=1")]


@pytest.mark.parametrize("params", [PLAIN_T1, FILTERED, pytest.param(PENALIZED, marks=SLOW)],
                         ids=["t1", "top_k_top_p", "penalties_min_p"])
def test_sampled_medusa_follows_plain_sampling(small_vocab, params):
    """4000 samples of the first 3 tokens, plain and with Medusa, each against the exact joint distribution.
    Token 1 comes from the prefill; tokens 2 and 3 from tree steps (accepted drafts or bonus tokens). The
    penalties run (slow) adds nothing the hand-built tree test does not check, but end to end."""
    folder = small_vocab[0]
    expected = exact_joint(folder, params, 3)
    plain = LLM(folder, max_num_seqs=1024, num_kv_blocks=2048).generate([PROMPT] * NUM_SAMPLES, params)
    assert chi_square_p_value(Counter(tuple(o.token_ids) for o in plain), expected, NUM_SAMPLES) > P_MIN
    medusa = medusa_llm(small_vocab).generate([PROMPT] * NUM_SAMPLES, params)
    steps = [n for o in medusa for n in o.accepted_lengths]
    assert sum(n > 1 for n in steps) > 0.15 * len(steps)  # drafts were accepted often, and rejected often
    assert chi_square_p_value(Counter(tuple(o.token_ids) for o in medusa), expected, NUM_SAMPLES) > P_MIN


def test_typical_acceptance_does_not_follow_plain_sampling(small_vocab):
    """The test above has the power to see a wrong rule: typical acceptance fails it, with a quarter of the samples."""
    expected, n = exact_joint(small_vocab[0], PLAIN_T1, 3), NUM_SAMPLES // 4
    typical = medusa_llm(small_vocab, medusa_acceptance="typical").generate([PROMPT] * n, PLAIN_T1)
    assert chi_square_p_value(Counter(tuple(o.token_ids) for o in typical), expected, n) < P_MIN


def test_seeded_medusa_draws_what_plain_sampling_draws(small_vocab):
    """One draw per emitted token from the request's generator, as plain decoding makes: a seeded request
    gives the same tokens with and without Medusa."""
    params = [SamplingParams(max_tokens=40, temperature=1.0, top_p=0.95, seed=i, ignore_eos=True) for i in range(16)]
    plain = LLM(small_vocab[0]).generate([PROMPT] * 16, params)
    medusa = medusa_llm(small_vocab).generate([PROMPT] * 16, params)
    assert [o.token_ids for o in medusa] == [o.token_ids for o in plain]
    assert len({tuple(o.token_ids) for o in plain}) == 16
    assert sum(sum(o.accepted_lengths) for o in medusa) > 1.2 * sum(len(o.accepted_lengths) for o in medusa)


@pytest.mark.parametrize("acceptance", ["rejection", "typical"])
def test_top_k_1_is_greedy_with_either_rule(small_vocab, acceptance):
    """A request's own filters bound what it accepts: top_k=1 at any temperature emits plain greedy's tokens."""
    greedy = LLM(small_vocab[0]).generate([PROMPT] * 4, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    params = SamplingParams(max_tokens=30, temperature=1.5, top_k=1, ignore_eos=True)
    medusa = medusa_llm(small_vocab, medusa_acceptance=acceptance).generate([PROMPT] * 4, params)
    assert [o.token_ids for o in medusa] == [o.token_ids for o in greedy]
    assert max(n for o in medusa for n in o.accepted_lengths) > 1


def test_greedy_medusa_with_penalties_and_logit_bias_equals_plain(small_vocab):
    params = SamplingParams(max_tokens=40, temperature=0, repetition_penalty=1.4, frequency_penalty=0.5,
                            presence_penalty=0.3, logit_bias={3: 2.0}, ignore_eos=True)
    plain = LLM(small_vocab[0]).generate([PROMPT], params)[0]
    medusa = medusa_llm(small_vocab).generate([PROMPT], params)[0]
    no_penalties = LLM(small_vocab[0]).generate([PROMPT], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert medusa.token_ids == plain.token_ids != no_penalties[0].token_ids
    assert max(medusa.accepted_lengths) > 1
