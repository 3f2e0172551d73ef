"""RequestOutput: what the engine reports about a request after a step."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.sequence import Sequence


@dataclass
class RequestOutput:
    """A snapshot of one request. `new_text`/`new_token_ids` are what this step added (for streaming). Until
    the request finishes, `text` and `new_text` leave out an end of the output that could begin a stop string."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    new_text: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int
    logprobs: list[tuple[float, dict[int, float]]] | None
    # prompt_logprobs requests: per prompt token, as logprobs (None for the first token, which nothing predicts)
    prompt_logprobs: list[tuple[float, dict[int, float]] | None] | None = None
    accepted_lengths: list[int] = field(default_factory=list)  # Medusa: tokens emitted per speculative step
    num_draft_tokens: int = 0  # Medusa: the drafted tokens its steps verified (accepted: sum(accepted_lengths) - steps)
    # return_hidden_states requests, once finished: [num output tokens, hidden size], row j the final hidden state
    # that sampled output token j
    hidden_states: torch.Tensor | None = None
    stop_reason: str | int | None = None  # the stop string matched, or the stop_token_ids token (vLLM's)
    error: str | None = None  # finish_reason "error": why (its structured output's grammar failed mid-answer)
    ttft_s: float | None = None
    queue_s: float | None = None  # arrival to first scheduled (None: never left the queue)
    latency_s: float = 0.0
    tokens_per_s: float = 0.0

    @classmethod
    def of(cls, seq: Sequence, new_text: str, new_token_ids: list[int]) -> RequestOutput:
        now = seq.finish_time or time.perf_counter()
        latency = now - seq.arrival_time
        return cls(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            text=seq.output_text[:seq.num_released_chars],
            token_ids=list(seq.output_token_ids),
            new_text=new_text,
            new_token_ids=new_token_ids,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            prompt_logprobs=list(seq.prompt_logprobs) if seq.params.prompt_logprobs is not None else None,
            accepted_lengths=list(seq.accepted_lengths),
            num_draft_tokens=seq.num_draft_tokens,
            hidden_states=torch.stack(seq.hidden_states) if seq.is_finished and seq.hidden_states else None,
            stop_reason=seq.stop_reason,
            error=seq.error,
            ttft_s=None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time,
            queue_s=None if seq.first_scheduled_time is None else seq.first_scheduled_time - seq.arrival_time,
            latency_s=latency,
            tokens_per_s=seq.num_output_tokens / latency if latency > 0 else 0.0,
        )
