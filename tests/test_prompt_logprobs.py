"""Prompt logprobs: each prompt token's logprob and top alternatives, computed during prefill (chunked or not,
after preemption too), against log_softmax of transformers' logits over the prompt."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams

from conftest import hf_model

TOL = 1e-4


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_prompt_logprobs(folder, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(folder)(torch.tensor([prompt])).logits[0].log_softmax(dim=-1)


def check(out, ref: torch.Tensor, prompt: list[int], n: int) -> None:
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for j, (logprob, alternatives) in enumerate(out.prompt_logprobs[1:], start=1):
        assert abs(logprob - ref[j - 1, prompt[j]].item()) <= TOL, j
        top = ref[j - 1].topk(n)
        assert list(alternatives) == top.indices.tolist(), j
        assert torch.allclose(torch.tensor(list(alternatives.values())), top.values, atol=TOL, rtol=0)


@pytest.mark.parametrize("budget", [2048, 8])  # 8: the prompt is prefilled in chunks of 8 tokens
def test_prompt_logprobs_match_hf(tiny_model_dir, budget):
    llm = LLM(tiny_model_dir, block_size=4, max_num_batched_tokens=budget)
    prompt = tokens(37, seed=1)
    out = llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=3))[0]
    check(out, hf_prompt_logprobs(tiny_model_dir, prompt), prompt, 3)
    plain = llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0))[0]
    assert plain.prompt_logprobs is None and plain.token_ids == out.token_ids


def test_a_cached_prompt_is_computed_again(tiny_model_dir):
    """Prompt logprobs need every prompt row, so such a request takes no prefix-cache hit; requests without
    them still share the cached blocks."""
    llm = LLM(tiny_model_dir, block_size=4)
    prompt = tokens(30, seed=2)
    params = SamplingParams(max_tokens=2, temperature=0)
    llm.generate(prompt, params)
    out = llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0))[0]
    assert out.num_cached_tokens == 0
    assert all(alternatives == {} for _, alternatives in out.prompt_logprobs[1:])
    check(out, hf_prompt_logprobs(tiny_model_dir, prompt), prompt, 0)
    assert llm.generate(prompt, params)[0].num_cached_tokens == 28


def test_prompt_logprobs_survive_preemption(tiny_model_dir):
    """A pool too small for four requests at once: sequences are preempted and recomputed, and each prompt
    token is still scored once."""
    llm = LLM(tiny_model_dir, block_size=4, num_kv_blocks=12, max_num_batched_tokens=16)
    prompts = [tokens(20, seed=s) for s in range(4)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, prompt_logprobs=2))
    assert llm.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        check(out, hf_prompt_logprobs(tiny_model_dir, prompt), prompt, 2)


def test_streamed_outputs_carry_the_prompt_logprobs(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    prompt = tokens(12, seed=3)
    outs = list(llm.stream(prompt, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=1)))
    assert all(o.prompt_logprobs == outs[-1].prompt_logprobs for o in outs)
    check(outs[-1], hf_prompt_logprobs(tiny_model_dir, prompt), prompt, 1)
