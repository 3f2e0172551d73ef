"""Sequence: one request's tokens and bookkeeping. Plain Python, no tensors."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch
from tokenizers.decoders import DecodeStream

from engine.config import SamplingParams

_private_cache_keys = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Invariant: token_ids = prompt + output; the cache holds K/V for token_ids[:num_computed_tokens],
    addressed through block_table (block i holds cache indices [i*block_size, (i+1)*block_size); token j
    is at cache index num_virtual_tokens + j)."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    adapter: object | None = None  # an adapters.LoadedAdapter, pinned for the request's lifetime
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    # dynamic NTK RoPE: the length that the prompt's rotations are scaled to, when beyond the model's
    # max_position_embeddings (0: unscaled); prompt K/V depends on it (models.layers.RotaryEmbedding.forward)
    dynamic_rope_len: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache chain hash of each full block
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    # what stopped it, as vLLM reports it: the stop string matched, or a stop token of params.stop_token_ids
    stop_reason: str | int | None = None
    error: str | None = None  # why it ended, where that was finish_reason "error" (its grammar failed)
    generator: torch.Generator | None = None
    # the tokens that end the output: the model's EOS ids (unless params.ignore_eos) and params.stop_token_ids
    stop_token_ids: frozenset[int] = frozenset()
    output_text: str = ""  # cut at a stop string once one is found
    num_released_chars: int = 0  # output_text reported so far; the rest could still begin a stop string
    decode_stream: DecodeStream | None = None  # incremental detokenizer state (engine.detokenizer)
    # per output token: (logprob of the chosen token, {token_id: logprob} of the top alternatives)
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    # the same for each prompt token scored so far (prompt_logprobs requests; token 0 has none), as vLLM
    prompt_logprobs: list[tuple[float, dict[int, float]] | None] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    first_scheduled_time: float | None = None  # when it first left the waiting queue
    num_draft_tokens: int = 0  # Medusa: tree nodes below the root its steps verified
    finish_time: float | None = None
    num_preemptions: int = 0
    # Medusa bookkeeping: tokens accepted per speculative step
    accepted_lengths: list[int] = field(default_factory=list)
    # params.return_hidden_states: the final hidden state of the row that sampled each output token
    hidden_states: list[torch.Tensor] = field(default_factory=list)
    # Medusa drafts for the tokens after the pending last one, per depth: Medusa heads' top-k token ids, or
    # (Hydra heads) the tokens of the tree's nodes at that depth; None: the next decode step is a plain one
    draft_token_ids: list[list[int]] | None = None
    # the tree they fill (engine.medusa.speculator.VerifyTree): a prompt-lookup chain, or one of the heads' trees
    draft_tree: object | None = None
    # structured outputs: the llguidance matcher of params.structured, fed every output token (engine.structured)
    matcher: object | None = None
    private_cache_key: int = field(default_factory=lambda: next(_private_cache_keys))
    prompt_token_ids: list[int] = field(init=False)  # token_ids[:num_prompt_tokens], one list for every output

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)
        # (one list: a stream's outputs may queue up behind a slow client)
        self.prompt_token_ids = self.token_ids[:self.num_prompt_tokens]

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def cache_key(self) -> bytes:
        """What besides the tokens decides the K/V, or who may share it (prefix-cache hashes start from it): the
        adapter's identity and version, the dynamic RoPE length, and the request's cache salt. A request that wants
        prompt logprobs must compute every prompt row, so it takes no prefix-cache hit: its key is its own."""
        if self.params.prompt_logprobs is not None:
            return f"private {self.private_cache_key}".encode()
        adapter = 0 if self.adapter is None else self.adapter.cache_key
        salt = "" if self.params.cache_salt is None else f" salt {self.params.cache_salt!r}"
        return f"adapter {adapter} rope {self.dynamic_rope_len}{salt}".encode()

    @property
    def num_virtual_tokens(self) -> int:
        """Cache entries before token 0 (a prefix adapter's virtual tokens): token i sits at cache index
        and RoPE position num_virtual_tokens + i."""
        return 0 if self.adapter is None else self.adapter.num_virtual_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def may_stop(self, ahead: int = 0) -> bool:
        """Whether the token sampled `ahead` tokens after the next one may end the output (params.min_tokens:
        until the output holds that many tokens, stop tokens are masked)."""
        return self.num_output_tokens + ahead >= self.params.min_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
