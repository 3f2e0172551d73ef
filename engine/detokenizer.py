"""Incremental detokenization with `tokenizers`' DecodeStream: each new token costs one small decode in
Rust (with a few tokens of context, so merges, leading spaces and multi-byte characters come out right)."""
from __future__ import annotations

from tokenizers.decoders import DecodeStream

from engine.sequence import Sequence

NUM_CONTEXT_TOKENS = 6  # prompt tokens the stream sees first: context for merges and leading spaces


def start_detokenizer(tokenizer, seq: Sequence) -> None:
    """A stream primed with the prompt's last tokens, their text discarded. (DecodeStream(ids=prompt) would
    emit the whole prompt with the first output token when the prompt ends inside a multi-byte character.)"""
    seq.decode_stream = DecodeStream(skip_special_tokens=seq.params.skip_special_tokens)
    for token in seq.token_ids[-NUM_CONTEXT_TOKENS:]:
        seq.decode_stream.step(tokenizer.backend_tokenizer, token)


def detokenize_new_token(tokenizer, seq: Sequence) -> str:
    """Text added by seq's newest token ('' while a multi-byte character is still incomplete)."""
    return seq.decode_stream.step(tokenizer.backend_tokenizer, seq.token_ids[-1]) or ""
