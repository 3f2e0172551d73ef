"""Context length: max_model_len follows the RoPE scaling (as vLLM computes it), the engine's normal path runs
beyond the original context with transformers' logits as the oracle (dynamic NTK included, chunked or from the
prefix cache), and a request that cannot fit is a ContextLengthError, never cut short."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, ContextLengthError, SamplingParams
from models.config import ModelConfig

from conftest import hf_model, save_tiny_model

ORIGINAL = 32  # the tiny models' max_position_embeddings (the original context)
FACTOR = 4.0
CONTEXT = int(FACTOR * ORIGINAL)
ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": FACTOR, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": FACTOR, "rope_theta": 10000.0},
    # Qwen2.5's way: max_position_embeddings is the original context, the factor extends it
    "yarn": {"rope_type": "yarn", "factor": FACTOR, "rope_theta": 10000.0,
             "original_max_position_embeddings": ORIGINAL},
    "llama3": {"rope_type": "llama3", "factor": FACTOR, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "rope_theta": 500000.0, "original_max_position_embeddings": ORIGINAL},
}
# Llama 3's scaling states the extended context in max_position_embeddings (3.2: 131072, factor 32 over 8192):
# the factor does not extend it further (as vLLM reads it); the others' max_position_embeddings is the original
MAX_POSITIONS = {"llama3": CONTEXT}
PROMPT_LEN = 100
TOL = 1e-4


def config_dict(max_position_embeddings: int, rope: dict | None) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": max_position_embeddings,
            "rope_scaling": rope}


def test_a_max_model_len_beyond_the_models_context_is_refused(tiny_model_dir):
    """As vLLM refuses it: positions beyond what the model was trained (and RoPE-scaled) for."""
    context = LLM(tiny_model_dir).max_model_len
    assert LLM(tiny_model_dir, max_model_len=context // 2).max_model_len == context // 2
    with pytest.raises(ValueError, match=f"max_model_len {context + 1} exceeds this model's context of {context}"):
        LLM(tiny_model_dir, max_model_len=context + 1)
    with pytest.raises(ValueError, match="max_model_len 128 does not fit the KV cache, which holds 64 tokens"):
        LLM(tiny_model_dir, max_model_len=128, num_kv_blocks=4, block_size=16)


def test_max_model_len_follows_rope_scaling():
    assert ModelConfig.from_dict(config_dict(4096, None)).max_model_len == 4096
    for name, rope in ROPE_CASES.items():
        assert ModelConfig.from_dict(config_dict(MAX_POSITIONS.get(name, ORIGINAL), rope)).max_model_len == CONTEXT
    llama32 = ROPE_CASES["llama3"] | {"factor": 32.0}
    assert ModelConfig.from_dict(config_dict(CONTEXT, llama32)).max_model_len == CONTEXT
    # Llama 3.1 states its extended context itself (8192 x 8 would be less)
    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    assert ModelConfig.from_dict(config_dict(131072, llama31)).max_model_len == 131072
    # yarn with no factor: HF infers it from the two lengths
    yarn = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096}
    assert ModelConfig.from_dict(config_dict(163840, yarn)).max_model_len == 163840
    with_window = config_dict(ORIGINAL, ROPE_CASES["linear"]) | {"sliding_window": 100}
    assert ModelConfig.from_dict(with_window).max_model_len == 100


@pytest.fixture(scope="module", params=list(ROPE_CASES))
def rope_model(request, tmp_path_factory) -> tuple[str, object]:
    folder = tmp_path_factory.mktemp(f"rope_{request.param}")
    return request.param, save_tiny_model(folder, max_position_embeddings=MAX_POSITIONS.get(request.param, ORIGINAL),
                                          rope_parameters=ROPE_CASES[request.param])


def tokens(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logprobs(folder, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """transformers' log-softmax rows, as HF runs a prompt and then decodes: one forward over the prompt, then
    one cached token at a time (a fresh model each time: HF's dynamic RoPE keeps state between calls)."""
    model = hf_model(folder)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        rows, past = [out.logits[0]], out.past_key_values
        for token in generated[:-1]:
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            rows.append(out.logits[0])
            past = out.past_key_values
    return torch.cat(rows).log_softmax(dim=-1)


@pytest.mark.parametrize("chunked", [False, True])
def test_beyond_the_original_context_matches_hf(rope_model, chunked):
    """A 100-token prompt and 28 generated tokens on models whose original context is 32: every prompt row
    (prompt logprobs) and every generated token (logprobs) against transformers."""
    name, folder = rope_model
    llm = LLM(folder, block_size=8, max_num_batched_tokens=24 if chunked else 2048)
    assert llm.max_model_len == CONTEXT
    prompt = tokens(PROMPT_LEN)
    params = SamplingParams(max_tokens=CONTEXT - PROMPT_LEN, temperature=0, ignore_eos=True, logprobs=1,
                            prompt_logprobs=1)
    out = llm.generate(prompt, params)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == CONTEXT - PROMPT_LEN
    ref = hf_logprobs(folder, prompt, out.token_ids)
    assert out.prompt_logprobs[0] is None
    ours_prompt = torch.tensor([lp for lp, _ in out.prompt_logprobs[1:]])
    torch.testing.assert_close(ours_prompt, ref[torch.arange(PROMPT_LEN - 1), prompt[1:]], atol=TOL, rtol=0)
    generated_rows = ref[PROMPT_LEN - 1:]
    assert out.token_ids == generated_rows.argmax(dim=-1).tolist()
    ours = torch.tensor([lp for lp, _ in out.logprobs])
    torch.testing.assert_close(ours, generated_rows.max(dim=-1).values, atol=TOL, rtol=0)


def test_dynamic_ntk_with_the_prefix_cache(tmp_path):
    """Dynamic NTK rotates a prompt for its own length, so a cached prompt serves only prompts of that length:
    a shorter prompt with the same first 96 tokens gets no hit, and still HF's logits; the same prompt again
    gets its hit and the same output."""
    folder = save_tiny_model(tmp_path, max_position_embeddings=ORIGINAL, rope_parameters=ROPE_CASES["dynamic"])
    llm = LLM(folder, block_size=8)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    long_prompt = tokens(PROMPT_LEN)
    short_prompt = long_prompt[:96] + tokens(2, seed=2)
    first = llm.generate(long_prompt, params)[0]
    short = llm.generate(short_prompt, params)[0]
    again = llm.generate(long_prompt, params)[0]
    assert short.num_cached_tokens == 0 and again.num_cached_tokens == 96
    assert again.token_ids == first.token_ids
    torch.testing.assert_close(torch.tensor([lp for lp, _ in again.logprobs]),
                               torch.tensor([lp for lp, _ in first.logprobs]), atol=TOL, rtol=0)
    for prompt, out in ((long_prompt, first), (short_prompt, short)):
        ref = hf_logprobs(folder, prompt, out.token_ids)[len(prompt) - 1:]
        assert out.token_ids == ref.argmax(dim=-1).tolist()
        torch.testing.assert_close(torch.tensor([lp for lp, _ in out.logprobs]), ref.max(dim=-1).values,
                                   atol=TOL, rtol=0)
    # within the original context, prompts of any length share blocks (no scaling, one key)
    llm.generate(long_prompt[:30], params)
    assert llm.generate(long_prompt[:31], params)[0].num_cached_tokens == 24


def test_a_request_beyond_the_context_is_an_error(rope_model):
    _, folder = rope_model
    llm = LLM(folder, block_size=8)
    with pytest.raises(ContextLengthError, match=f"context is {CONTEXT} tokens, but {CONTEXT + 1} were asked for"):
        llm.add_request(tokens(PROMPT_LEN), SamplingParams(max_tokens=CONTEXT - PROMPT_LEN + 1))
    with pytest.raises(ContextLengthError, match=f"the prompt has {CONTEXT} tokens"):
        llm.add_request(tokens(CONTEXT), SamplingParams(max_tokens=1))
    assert issubclass(ContextLengthError, ValueError)
    # generate() takes all prompts or none
    with pytest.raises(ContextLengthError):
        llm.generate([tokens(10), tokens(PROMPT_LEN)], SamplingParams(max_tokens=CONTEXT - PROMPT_LEN + 1))
    assert not llm.has_unfinished() and llm.num_free_blocks == llm.block_manager.num_blocks


def test_the_kv_pool_bounds_the_context(tiny_model_dir):
    """A request must fit the KV pool on its own, so a small pool lowers max_model_len (and says so)."""
    llm = LLM(tiny_model_dir, num_kv_blocks=4, block_size=8)
    assert llm.max_model_len == 32
    with pytest.raises(ContextLengthError, match="context is 32 tokens"):
        llm.add_request(tokens(20), SamplingParams(max_tokens=13))
