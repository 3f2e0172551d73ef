"""Incremental detokenization: each new token costs a decode of a few tokens, not of the whole output."""
from __future__ import annotations

from engine.sequence import Sequence

# tokens of context decoded before the new ones, so merges and leading spaces come out right
_CONTEXT_TOKENS = 5


def start_detokenizer(seq: Sequence) -> None:
    seq.read_offset = len(seq.token_ids)
    seq.prefix_offset = max(seq.read_offset - _CONTEXT_TOKENS, 0)


def detokenize_new_token(tokenizer, seq: Sequence) -> str:
    """Text added by seq's newest token ('' while a multi-byte character is still incomplete)."""
    ids = seq.token_ids
    prefix_text = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
    full_text = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
    if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
        return ""
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    return full_text[len(prefix_text):]
