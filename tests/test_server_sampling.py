"""server.sampling: the one mapping from a request's fields to the engine's SamplingParams (no model needed)."""
from __future__ import annotations

import pytest

from engine import SamplingParams
from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.sampling import sampling_params

CONTEXT, VOCAB = 512, 256


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "hi", **fields})


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_every_sampling_field_reaches_the_engine():
    req = completion(max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5,
                     frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={"5": -100, "17": 2.5}, seed=3,
                     stop=["\n\n", "END"], ignore_eos=True, stop_token_ids=[7], logprobs=2, use_medusa=False)
    assert sampling_params(req, 10, CONTEXT, VOCAB, {}) == SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.2, logit_bias={5: -100.0, 17: 2.5}, seed=3, stop=["\n\n", "END"], ignore_eos=True,
        stop_token_ids=[7], logprobs=2, use_medusa=False)


def test_openai_defaults_map_to_the_engine_defaults():
    params = sampling_params(completion(), prompt_len=10, max_model_len=CONTEXT, vocab_size=VOCAB, model_defaults={})
    assert params == SamplingParams(max_tokens=16)  # OpenAI's completions default
    params = sampling_params(chat(), prompt_len=10, max_model_len=CONTEXT, vocab_size=VOCAB, model_defaults={})
    assert params == SamplingParams(max_tokens=CONTEXT - 10)  # chat: up to the end of the context


def test_fields_left_out_take_the_models_recommended_values():
    """As vLLM's --generation-config auto: a parameter the request sets wins, one it leaves out takes the model's
    (a default the API would have written is not a choice the client made)."""
    recommended = {"temperature": 0.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    params = sampling_params(chat(top_p=1.0, top_k=0), 10, CONTEXT, VOCAB, recommended)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (
        0.3, 1.0, 0, 0.0, 1.05)
    assert sampling_params(completion(temperature=1.0), 10, CONTEXT, VOCAB, recommended).temperature == 1.0


def test_choices_get_distinct_reproducible_seeds():
    req = completion(n=3, seed=7)
    assert [sampling_params(req, 10, CONTEXT, VOCAB, {}, choice=i).seed for i in range(3)] == [7, 8, 9]
    assert sampling_params(completion(n=2), 10, CONTEXT, VOCAB, {}, choice=1).seed is None


@pytest.mark.parametrize("fields, want", [
    ({}, None),
    ({"logprobs": True}, 0),
    ({"logprobs": True, "top_logprobs": 4}, 4),
])
def test_chat_logprobs(fields, want):
    assert sampling_params(chat(**fields), 10, CONTEXT, VOCAB, {}).logprobs == want


def test_chat_top_logprobs_needs_logprobs():
    with pytest.raises(ValueError, match="top_logprobs needs logprobs"):
        chat(top_logprobs=4)


def test_chat_max_completion_tokens_wins_over_max_tokens():
    assert sampling_params(chat(max_tokens=9, max_completion_tokens=5), 10, CONTEXT, VOCAB, {}).max_tokens == 5


def test_echo_with_logprobs_asks_for_the_prompt_logprobs():
    assert sampling_params(completion(echo=True, logprobs=3), 10, CONTEXT, VOCAB, {}).prompt_logprobs == 3
    assert sampling_params(completion(logprobs=3), 10, CONTEXT, VOCAB, {}).prompt_logprobs is None
    assert sampling_params(completion(echo=True), 10, CONTEXT, VOCAB, {}).prompt_logprobs is None


def test_vllm_top_k_minus_one_means_off():
    assert sampling_params(completion(top_k=-1), 10, CONTEXT, VOCAB, {}).top_k == 0


@pytest.mark.parametrize("req, prompt_len, param, code", [
    (completion(max_tokens=16), CONTEXT, "prompt", "context_length_exceeded"),
    (chat(), CONTEXT, "messages", "context_length_exceeded"),
    (completion(max_tokens=CONTEXT + 1), 10, "max_tokens", "context_length_exceeded"),
    (completion(max_tokens=CONTEXT - 9), 10, "max_tokens", "context_length_exceeded"),
    (chat(max_completion_tokens=CONTEXT - 9), 10, "max_completion_tokens", "context_length_exceeded"),
])
def test_what_does_not_fit_the_context_is_an_error(req, prompt_len, param, code):
    with pytest.raises(APIError) as e:
        sampling_params(req, prompt_len, CONTEXT, VOCAB, {})
    assert (e.value.status, e.value.info.param, e.value.info.code) == (400, param, code)


def test_a_request_that_exactly_fills_the_context_is_served():
    assert sampling_params(completion(max_tokens=CONTEXT - 10), 10, CONTEXT, VOCAB, {}).max_tokens == CONTEXT - 10


@pytest.mark.parametrize("key", ["-1", "256", "abc", "1.5", "", " 3", "٣"])
def test_logit_bias_keys_must_be_token_ids(key):
    with pytest.raises(APIError) as e:
        sampling_params(completion(logit_bias={key: 1.0}), 10, CONTEXT, VOCAB, {})
    assert e.value.info.param == "logit_bias"
