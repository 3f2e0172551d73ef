"""Incremental detokenization with `tokenizers`' DecodeStream: each new token costs one small decode in
Rust (with a few tokens of context, so merges, leading spaces and multi-byte characters come out right)."""
from __future__ import annotations

from tokenizers.decoders import DecodeStream

from engine.sequence import Sequence


def start_detokenizer(seq: Sequence) -> None:
    seq.decode_stream = DecodeStream(ids=seq.token_ids, skip_special_tokens=True)


def detokenize_new_token(tokenizer, seq: Sequence) -> str:
    """Text added by seq's newest token ('' while a multi-byte character is still incomplete)."""
    return seq.decode_stream.step(tokenizer.backend_tokenizer, seq.token_ids[-1]) or ""
