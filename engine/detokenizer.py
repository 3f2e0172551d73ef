"""Incremental detokenization with `tokenizers`' DecodeStream: each new token costs one small decode in
Rust (with a few tokens of context, so merges, leading spaces and multi-byte characters come out right)."""
from __future__ import annotations

import logging
from functools import lru_cache

from tokenizers.decoders import DecodeStream

from engine.sequence import Sequence

logger = logging.getLogger("gorgon")

# the prompt tokens a stream sees first, their text discarded: context for merges and leading spaces
MIN_CONTEXT_TOKENS, MAX_CONTEXT_TOKENS = 4, 24


def start_detokenizer(tokenizer, seq: Sequence) -> None:
    """A stream primed with the fewest of the prompt's last tokens (MIN_CONTEXT_TOKENS to MAX_CONTEXT_TOKENS) that
    start at a character, their text discarded. A window that starts inside one (byte-fallback tokens) decodes
    as U+FFFD, which the first output token would carry into the answer; one that ends inside a character, a
    prompt cut there, is fine: the first output token completes it. (DecodeStream(ids=prompt) would emit the
    whole prompt with the first output token where the prompt ends inside a character.)"""
    prompt = seq.token_ids
    context = prompt[-MIN_CONTEXT_TOKENS:]
    for n in range(MIN_CONTEXT_TOKENS, min(len(prompt), MAX_CONTEXT_TOKENS) + 1):
        if "\ufffd" not in tokenizer.decode(prompt[-n:]).rstrip("\ufffd"):
            context = prompt[-n:]
            break
    seq.decode_stream = DecodeStream(skip_special_tokens=seq.params.skip_special_tokens)
    try:
        for token in context:
            seq.decode_stream.step(tokenizer.backend_tokenizer, token)
    except Exception:  # noqa: BLE001 - a prompt of ids that are no UTF-8 broke it: no context, then
        seq.decode_stream = DecodeStream(skip_special_tokens=seq.params.skip_special_tokens)


def detokenize_new_token(tokenizer, seq: Sequence) -> str:
    """Text added by seq's newest token ('' while a multi-byte character is still incomplete)."""
    try:
        return seq.decode_stream.step(tokenizer.backend_tokenizer, seq.token_ids[-1]) or ""
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        if not str(e).startswith("Invalid prefix"):
            raise
        # byte-fallback tokens that are no UTF-8 where a character should end (a sampled <0x41> <0xE2> x) break
        # the stream's state, and would fail the step of every request in the batch: a new stream goes on
        logger.debug("detokenizer restarted after %s", e)
        seq.decode_stream = DecodeStream(skip_special_tokens=seq.params.skip_special_tokens)
        return seq.decode_stream.step(tokenizer.backend_tokenizer, seq.token_ids[-1]) or ""


def token_text(tokenizer, token_id: int) -> str:
    """A token's text as it reads inside a text, as logprobs show it: decoded after an anchor token ("a"), whose
    text is then cut off, since a SentencePiece decoder (Llama 2, Mistral, TinyLlama) drops the leading space of a
    text's first token (decoding "▁the" alone gives "the", so the tokens would not join into the answer). U+FFFD
    for a token that holds part of a character, as decoding it alone gives."""
    backend = tokenizer.backend_tokenizer
    anchor, prefix = _anchor(tokenizer)
    text = backend.decode([anchor, token_id], skip_special_tokens=False)
    return text[len(prefix):] if text.startswith(prefix) else backend.decode([token_id], skip_special_tokens=False)


@lru_cache(maxsize=8)
def _anchor(tokenizer) -> tuple[int, str]:
    """The token that spells "a" (the last of those that do), and its text."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
    return anchor, tokenizer.backend_tokenizer.decode([anchor], skip_special_tokens=False)
