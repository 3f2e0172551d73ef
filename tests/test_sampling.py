"""Sampler: temperature 0 is argmax, seeds reproduce, top-k and top-p restrict the support; each transform
(logit_bias, penalties, min_p) recomputed by hand; greedy rows honour penalties and logit_bias; through the
engine, greedy decoding with every transform equals a hand-written loop over HF logits."""
from __future__ import annotations

import math

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampler import (
    NUCLEUS_CANDIDATES,
    Sampler,
    TokenCounts,
    adjust_logits,
    draw_tokens,
    filtered_probs,
    seeded_generator,
)

from conftest import adjusted_by_hand, hf_model

VOCAB = 50


def logits() -> torch.Tensor:
    return torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3


def draw(params: SamplingParams, n: int = 300) -> set[int]:
    sampler, rows = Sampler(), logits()
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(n):
        seen.update(sampler(rows[:1], [params], [gen]).token_ids)
    return seen


def test_draws_follow_each_rows_distribution():
    """Inverse transform sampling: each token as often as its probability (within 4.5 standard deviations over
    40000 draws), never one of probability 0, rows with their own generators, reproducible by seed."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1, 0.6]])
    n = 40000
    rows = probs.repeat(n, 1)
    tokens = torch.tensor(draw_tokens(rows, [torch.Generator().manual_seed(0)] * len(rows))).view(n, 3)
    for row, p in enumerate(probs):
        freq = torch.bincount(tokens[:, row], minlength=5).double() / n
        assert ((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (row, freq)
    again = draw_tokens(probs, [torch.Generator().manual_seed(7) for _ in range(3)])
    assert again == draw_tokens(probs, [torch.Generator().manual_seed(7) for _ in range(3)])


def test_temperature_zero_is_argmax():
    rows = logits()
    out = Sampler()(rows, [SamplingParams(temperature=0)] * 4, [None] * 4)
    assert out.token_ids == rows.argmax(-1).tolist()


def test_top_k_restricts_the_support():
    allowed = set(logits()[0].topk(3).indices.tolist())
    seen = draw(SamplingParams(temperature=2.0, top_k=3))
    assert seen == allowed


def test_top_p_restricts_the_support_to_the_nucleus():
    probs = logits()[0].softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    nucleus_size = int((sorted_probs.cumsum(0) < 0.7).sum()) + 1
    allowed = set(order[:nucleus_size].tolist())
    seen = draw(SamplingParams(temperature=1.0, top_p=0.7))
    assert seen <= allowed and len(seen) > 1


def test_unfiltered_sampling_reaches_beyond_the_top_tokens():
    assert len(draw(SamplingParams(temperature=5.0))) > 10


def test_seed_reproduces_output(tiny_model_dir):
    llm = LLM(tiny_model_dir, num_kv_blocks=64, block_size=16)
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    first, second = llm.generate(["abc", "abc"], params)
    assert first.token_ids == second.token_ids
    other = llm.generate("abc", SamplingParams(max_tokens=24, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert other.token_ids != first.token_ids


def test_seeds_that_differ_above_32_bits_draw_differently(tiny_model_dir):
    """torch's CPU generator keeps a seed's low 32 bits: 5 and 2^32 + 5 (and -1 and 2^32 - 1) drew the same tokens.
    Seeds in [0, 2^32) keep torch's own streams."""
    assert torch.equal(torch.rand(4, generator=seeded_generator(5, "cpu")),
                       torch.rand(4, generator=torch.Generator().manual_seed(5)))
    draws = {seed: torch.rand(4, generator=seeded_generator(seed, "cpu")).tolist()
             for seed in (5, (1 << 32) + 5, -1, (1 << 32) - 1, (1 << 63) - 1, -(1 << 63))}
    assert len({tuple(d) for d in draws.values()}) == len(draws)
    llm = LLM(tiny_model_dir, medusa=None)
    outs = [llm.generate("abc", SamplingParams(max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True))[0]
            for seed in (5, (1 << 32) + 5, (1 << 32) + 5)]
    assert outs[0].token_ids != outs[1].token_ids and outs[1].token_ids == outs[2].token_ids


def test_logprobs_are_those_of_the_sampled_tokens():
    rows = logits()
    out = Sampler()(rows[:1], [SamplingParams(temperature=0, logprobs=2)], [None])
    chosen, top = out.logprobs[0]
    expected = rows[0].log_softmax(-1)
    assert abs(chosen - expected.max().item()) < 1e-6
    assert list(top) == expected.topk(2).indices.tolist()


# ---- each transform by hand -----------------------------------------------------------------------------
ROW = [2.0, -1.0, 3.0, -2.0, 0.5, 1.0]


def processed(params: SamplingParams, token_ids: list[int], num_prompt_tokens: int) -> list[float]:
    """ROW after logit_bias and penalties, for a row whose history is token_ids (the first num_prompt_tokens
    of them the prompt)."""
    counts = TokenCounts.of([token_ids], [num_prompt_tokens], len(ROW), torch.device("cpu"))
    return adjust_logits(torch.tensor([ROW]), [params], counts)[0].tolist()


def test_logit_bias_is_added():
    params = SamplingParams(logit_bias={0: 5.0, 3: -100.0, 5: 0.25})
    assert processed(params, [1], 1) == pytest.approx([7.0, -1.0, 3.0, -102.0, 0.5, 1.25])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    # prompt [1, 4], output [2]: tokens 1, 4 (prompt) and 2 (output) are penalized; 0, 3, 5 are not
    params = SamplingParams(repetition_penalty=2.0)
    assert processed(params, [1, 4, 2], 2) == pytest.approx([2.0, -2.0, 1.5, -2.0, 0.25, 1.0])


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    # prompt [0, 5]; output [2, 2, 3]: token 2 twice, token 3 once; prompt tokens are not penalized
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    assert processed(params, [0, 5, 2, 2, 3], 2) == pytest.approx([2.0, -1.0, 3.0 - 0.5 - 0.5, -2.0 - 0.5 - 0.25,
                                                                    0.5, 1.0])
    negative = SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5)  # negative values encourage repeats
    assert processed(negative, [0, 5, 2, 2, 3], 2)[2] == pytest.approx(3.0 + 1.0 + 1.0)


def test_min_p_drops_tokens_below_a_share_of_the_likeliest():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03]])
    kept = filtered_probs(probs.log(), [SamplingParams(min_p=0.2)])  # keeps p >= 0.1
    assert kept[0].tolist() == pytest.approx([0.5 / 0.92, 0.3 / 0.92, 0.12 / 0.92, 0.0, 0.0])
    hot = filtered_probs(probs.log(), [SamplingParams(min_p=0.2, temperature=2.0)])  # after temperature
    sqrt = probs[0].sqrt()
    assert hot[0].tolist() == pytest.approx((sqrt * (sqrt >= 0.2 * sqrt[0])).div((sqrt * (sqrt >= 0.2 * sqrt[0])).sum())
                                            .tolist())


def test_top_k_and_top_p_by_hand():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    assert filtered_probs(probs.log(), [SamplingParams(top_k=2)])[0].tolist() == pytest.approx([4 / 7, 3 / 7, 0, 0])
    # top_p 0.65: 0.4 and 0.3 reach it, so 0.2 and 0.1 go; at 0.75 they do not, so 0.2 stays
    top_p = filtered_probs(probs.log().repeat(2, 1), [SamplingParams(top_p=0.65), SamplingParams(top_p=0.75)])
    assert top_p.tolist() == [pytest.approx([4 / 7, 3 / 7, 0, 0]), pytest.approx([4 / 9, 3 / 9, 2 / 9, 0])]
    # top_p 0, which OpenAI's API allows (it was a 400, and its filter kept nothing: NaN): the likeliest alone,
    # with a token tied with it
    tied = torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.4, 0.4, 0.1, 0.1]])
    assert filtered_probs(tied.log(), [SamplingParams(top_p=0.0)] * 2).tolist() == [
        pytest.approx([0, 1, 0, 0]), pytest.approx([0.5, 0.5, 0, 0])]


def sorted_filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """filtered_probs the obvious way: every row's whole vocabulary sorted, for top-k and for top-p."""
    logits = logits / torch.tensor([p.temperature for p in params])[:, None]
    for i, p in enumerate(params):
        row = logits[i]
        if p.min_p > 0:
            row[row < row.max() + math.log(p.min_p)] = float("-inf")
        if 0 < p.top_k < row.numel():
            row[row < row.sort(descending=True).values[p.top_k - 1]] = float("-inf")
        if p.top_p < 1.0:
            probs, order = row.softmax(dim=-1).sort(descending=True)
            row[order[probs.cumsum(dim=-1) - probs >= p.top_p]] = float("-inf")
    return logits.softmax(dim=-1)


def test_top_k_and_top_p_keep_what_a_full_sort_keeps_whatever_the_nucleus_size():
    vocab = 5000
    raw = torch.randn(8, vocab, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    # peaked rows hold their nucleus in a few tokens, row 4 in more than NUCLEUS_CANDIDATES; the flat ones need
    # most of the vocabulary, so the whole row is sorted
    raw = raw * torch.tensor([8.0, 8.0, 0.05, 0.05, 1.0, 1.0, 3.0, 0.01])[:, None]
    params = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.7, top_k=40, top_p=0.5),
              SamplingParams(temperature=1.0, top_p=0.95), SamplingParams(temperature=1.0, top_p=0.999),
              SamplingParams(temperature=1.0, top_k=vocab, top_p=0.9), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.5, min_p=0.01, top_k=300, top_p=0.8),
              SamplingParams(temperature=1.0, top_k=3)]
    fast, slow = filtered_probs(raw.clone(), params), sorted_filter(raw.clone(), params)
    assert torch.equal(fast > 0, slow > 0)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-7)
    kept = (fast > 0).sum(dim=-1).tolist()
    assert kept[0] < NUCLEUS_CANDIDATES < kept[4] < 16 * NUCLEUS_CANDIDATES < kept[2] < vocab
    assert kept[5] == vocab and kept[7] == 3


def test_greedy_rows_take_the_argmax_after_penalties_and_logit_bias():
    rows = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, frequency_penalty=0.5),
              SamplingParams(temperature=0, logit_bias={2: 3.5})]
    out = Sampler()(rows, params, [None] * 3, [[1, 0], [1, 0], [1, 0]], [1, 1, 1])
    assert out.token_ids == [0, 1, 2]


def test_banned_tokens_are_never_drawn_and_logprobs_stay_the_models():
    """min_tokens' ban on stop tokens: a banned row never takes the tokens, greedy or sampled; others are untouched."""
    rows = logits()[:2]
    favourite = rows[0].argmax().item()
    rows[0, favourite] += 20.0  # all but certain, unbanned
    gen = torch.Generator().manual_seed(1)
    for params in (SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=1.5, logprobs=0)):
        for _ in range(50):
            out = Sampler()(rows, [params, params], [gen, gen], banned=[{favourite, 3}, ()])
            assert out.token_ids[0] not in {favourite, 3}
            assert out.logprobs[0][0] == pytest.approx(rows[0].log_softmax(-1)[out.token_ids[0]].item(), abs=1e-6)
        assert out.token_ids[1] == rows[1].argmax().item() or not params.greedy
    assert Sampler()(rows, [SamplingParams(temperature=0)] * 2, [None, None]).token_ids[0] == favourite


def test_penalties_need_the_token_history():
    with pytest.raises(AssertionError, match="token history"):
        Sampler()(logits()[:1], [SamplingParams(presence_penalty=1.0)], [None])


def test_temperature_near_zero_is_greedy():
    rows = logits()
    history, prompt_lens = [[1, 2, 3, 7, 7]] * 4, [2] * 4
    penalties = dict(repetition_penalty=1.5, frequency_penalty=0.4, logit_bias={11: 2.0})
    for extra in ({}, penalties, dict(top_k=3, top_p=0.5)):
        greedy = Sampler()(rows, [SamplingParams(temperature=0, **extra)] * 4, [None] * 4, history, prompt_lens)
        cold = Sampler()(rows, [SamplingParams(temperature=1e-4, **extra)] * 4,
                         [torch.Generator().manual_seed(i) for i in range(4)], history, prompt_lens)
        assert cold.token_ids == greedy.token_ids
        # below vLLM's 1e-5 it is greedy: logits / 1e-39 overflowed to inf, NaN, and the vocabulary's last token
        colder = Sampler()(rows * 40, [SamplingParams(temperature=1e-39, **extra)] * 4,
                           [torch.Generator().manual_seed(i) for i in range(4)], history, prompt_lens)
        assert colder.token_ids == Sampler()(rows * 40, [SamplingParams(temperature=0, **extra)] * 4, [None] * 4,
                                             history, prompt_lens).token_ids


def test_top_p_keeps_the_same_tokens_whatever_the_rest_of_the_batch():
    """bf16 logits tie often: top-p keeps the tokens tied with the last one it keeps, so that how many tokens the
    batch makes it sort (a flat row: the whole vocabulary) cannot change which of two tied ones a row keeps, nor a
    seeded request's tokens."""
    vocab, generator = 49152, torch.Generator().manual_seed(0)
    params, flat = SamplingParams(top_p=0.5), SamplingParams(top_p=0.99)
    changed = 0
    for _ in range(20):
        row = (torch.randn(vocab, generator=generator) * 2.5).bfloat16().float()
        alone = filtered_probs(row[None], [params])[0]
        together = filtered_probs(torch.stack([row, torch.zeros(vocab)]), [params, flat])[0]
        changed += not torch.equal(alone > 0, together > 0)
        kept = row[alone > 0]
        assert not ((row == kept.min()) & (alone == 0)).any()  # no token tied with a kept one is dropped
    assert changed == 0


def test_mixed_greedy_and_sampled_rows_equal_each_row_alone():
    rows = logits()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=10),
              SamplingParams(temperature=0, presence_penalty=1.0), SamplingParams(temperature=0.7, min_p=0.05,
                                                                               repetition_penalty=1.3)]
    history, prompt_lens = [[0], [1, 2], [3, 3, 4], [5, 6, 5]], [1, 1, 1, 2]

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(10 + i) for i in range(4)]

    together = Sampler()(rows, params, generators(), history, prompt_lens).token_ids
    alone = [Sampler()(rows[i:i + 1], params[i:i + 1], generators()[i:i + 1], history[i:i + 1], prompt_lens[i:i + 1])
             .token_ids[0] for i in range(4)]
    assert together == alone


# ---- through the engine ----------------------------------------------------------------------------------
def test_engine_greedy_with_every_transform_equals_a_hand_loop(tiny_model_dir):
    """Greedy decoding with logit_bias, repetition, presence and frequency penalties: our engine against a
    loop over HF's logits with the transforms written out per token."""
    prompt = [5, 17, 99, 17, 42, 5]
    params = SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.3, presence_penalty=0.4,
                            frequency_penalty=0.3, logit_bias={65: 1.5, 17: -0.5}, ignore_eos=True)
    model, tokens = hf_model(tiny_model_dir), list(prompt)
    for _ in range(params.max_tokens):
        with torch.no_grad():
            row = model(torch.tensor([tokens])).logits[0, -1].tolist()
        row = adjusted_by_hand(row, params, tokens, tokens[len(prompt):])
        tokens.append(max(range(len(row)), key=row.__getitem__))
    ours = LLM(tiny_model_dir, num_kv_blocks=64).generate([prompt], params)[0].token_ids
    assert ours == tokens[len(prompt):]
    plain = LLM(tiny_model_dir, num_kv_blocks=64).generate([prompt], SamplingParams(max_tokens=24, temperature=0,
                                                                                      ignore_eos=True))[0]
    assert plain.token_ids != ours  # the transforms changed the text


def test_logit_bias_ids_outside_the_vocabulary_are_refused(tiny_model_dir):
    llm = LLM(tiny_model_dir, num_kv_blocks=64)
    for bad in ({256: 1.0}, {-1: 1.0}, {2**70: 1.0}, {"7": 1.0}):
        with pytest.raises(ValueError, match="logit_bias token ids"):
            llm.add_request([5, 6], SamplingParams(logit_bias=bad))
    assert not llm.has_unfinished()
    assert len(llm.generate([5, 6], SamplingParams(max_tokens=2, logit_bias={255: 1.0}))[0].token_ids) == 2
