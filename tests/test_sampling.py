"""Sampler: temperature 0 is argmax, seeds reproduce, top-k and top-p restrict the support."""
from __future__ import annotations

import torch

from engine import LLM, SamplingParams
from engine.sampler import Sampler

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


def test_logprobs_are_those_of_the_sampled_tokens():
    rows = logits()
    out = Sampler()(rows[:1], [SamplingParams(temperature=0, logprobs=2)], [None])
    chosen, top = out.logprobs[0]
    expected = rows[0].log_softmax(-1)
    assert abs(chosen - expected.max().item()) < 1e-6
    assert list(top) == expected.topk(2).indices.tolist()
