"""A request's sampling fields -> the engine's SamplingParams: the one place where they are mapped."""
from __future__ import annotations

from dataclasses import replace

from engine import SAMPLING_FIELDS, ReasoningTags, SamplingParams, StructuredOutput
from server.errors import APIError
from server.protocol import ChatCompletionRequest, SamplingRequest
from server.tools import output_format


def sampling_params(req: SamplingRequest, prompt_len: int, max_model_len: int, vocab_size: int | None,
                    model_defaults: dict[str, float | int], choice: int = 0,
                    prediction: list[int] | None = None, reasoning: ReasoningTags | None = None) -> SamplingParams:
    """How to decode choice `choice` of `req` (whose prompt has `prompt_len` tokens, and whose predicted output is
    `prediction`'s token ids) on a model with this context and vocabulary (None: unknown here, the engine checks
    ids); a sampling parameter the request leaves out takes the model's recommended value (`model_defaults`:
    LLM.sampling_defaults), where it has one. Its structured output (or tools) constrains what follows the
    reasoning, where the answer reasons with these tags (`reasoning`). A request that cannot be served as asked is
    an APIError (400) naming the field at fault."""
    check_context(req, prompt_len, max_model_len)
    limit = req.token_limit
    sampling = chosen_sampling(req, model_defaults)
    max_tokens = limit or max_model_len - prompt_len
    if req.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens {req.min_tokens} exceeds the tokens this answer may have ({max_tokens})",
                       param="min_tokens")
    structured = constraint(req)
    if structured is not None and reasoning is not None:
        structured = replace(structured, after_reasoning=reasoning)
    try:
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=req.min_tokens, temperature=sampling["temperature"],
            top_p=sampling["top_p"], top_k=max(sampling["top_k"], 0), min_p=sampling["min_p"],
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=sampling["repetition_penalty"],
            logit_bias=logit_bias(req.logit_bias or {}, vocab_size), stop=req.stop_list, ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens,
            stop_token_ids=stop_token_ids(req.stop_token_ids or [], vocab_size),
            seed=None if req.seed is None else req.seed + choice,  # n choices: distinct but reproducible
            logprobs=req.top_alternatives, prompt_logprobs=req.prompt_alternatives, use_medusa=req.use_medusa,
            structured=structured, prediction=prediction or [], cache_salt=req.cache_salt)
    except ValueError as e:  # bounds the protocol already checks; kept as a 400 should the two ever differ
        raise APIError(400, str(e)) from None


def constraint(req: SamplingRequest) -> StructuredOutput | None:
    """The request's structured output, or its tools' (an APIError naming the field at fault where not valid)."""
    try:
        structured = req.structured_output
        calls = output_format(req) if isinstance(req, ChatCompletionRequest) else None
    except ValueError as e:  # (without a structured output, the tools are at fault: tool_choice)
        raise APIError(400, str(e), param=(req.structured_output_fields or ["tool_choice"])[0]) from None
    return calls or structured  # (tools with a JSON structured output: the calls' format holds it)


def chosen_sampling(req: SamplingRequest, model_defaults: dict[str, float | int]) -> dict[str, float | int]:
    """The request's temperature, top_p, top_k, min_p and repetition_penalty; for one it leaves out, the model's
    recommended value, where it has one."""
    return {name: model_defaults[name] if name in model_defaults and name not in req.model_fields_set
            else getattr(req, name) for name in SAMPLING_FIELDS}


def check_context(req: SamplingRequest, prompt_len: int, max_model_len: int) -> None:
    """The prompt, and the prompt plus the tokens asked for, must fit the context (as vLLM checks it)."""
    prompt_param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if prompt_len >= max_model_len:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {max_model_len} tokens, "
                            "and at least one must be left to generate", param=prompt_param,
                       code="context_length_exceeded")
    limit = req.token_limit
    if limit is None:
        return
    chat_limit = isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None
    limit_param = "max_completion_tokens" if chat_limit else "max_tokens"
    if limit > max_model_len:
        raise APIError(400, f"{limit_param} {limit} exceeds the model's context ({max_model_len} tokens)",
                       param=limit_param, code="context_length_exceeded")
    if prompt_len + limit > max_model_len:
        raise APIError(400, f"this model's context is {max_model_len} tokens, but {prompt_len + limit} were asked for "
                            f"({prompt_len} in the {prompt_param}, {limit} to generate): shorten the {prompt_param} "
                            f"or lower {limit_param}", param=limit_param, code="context_length_exceeded")


def stop_token_ids(token_ids: list[int], vocab_size: int | None) -> list[int]:
    """vLLM's stop_token_ids, each a token of the vocabulary (the answer ends with it, included)."""
    bad = next((t for t in token_ids if vocab_size is not None and t >= vocab_size), None)
    if bad is not None:
        raise APIError(400, f"stop_token_ids: {bad} is not a token id (ids are in [0, {vocab_size}))",
                       param="stop_token_ids")
    return token_ids


def logit_bias(bias: dict[str, float], vocab_size: int | None) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as strings) with int keys, each a token of the vocabulary."""
    out = {}
    for key, value in bias.items():
        token = int(key) if key.isascii() and key.isdigit() else -1
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise APIError(400, f"logit_bias: {key!r} is not a token id (ids are in [0, {vocab_size or 'vocab'}))",
                           param="logit_bias")
        out[token] = value
    return out

