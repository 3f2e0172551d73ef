"""Prompt lookup (n-gram) drafts: when a sequence's last few tokens occurred earlier in it (prompt or output),
the tokens that followed them then are a likely continuation now. Answers that quote, summarise or edit
their prompt repeat long runs of it, and such a draft is often right several tokens deep, where the heads'
guesses are not. It costs no model work, and the base model verifies it like any tree. A request's predicted
output (OpenAI's Predicted Outputs) is looked up the same way (PredictionIndex)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

NGRAM_SIZES = (3, 2)  # suffix lengths tried, longest first: a longer match predicts better, a shorter one more often


def ngrams(token_ids: list[int], first_stop: int) -> Iterator[tuple[tuple[int, ...], int]]:
    """(n-gram, the position right after it) for each n of NGRAM_SIZES and each n-gram ending at a position from
    first_stop on that has a continuation (so never the one ending at the last token), in order of position."""
    for stop in range(first_stop, len(token_ids)):
        for n in NGRAM_SIZES:
            if stop >= n:
                yield tuple(token_ids[stop - n:stop]), stop


@dataclass
class NgramIndex:
    """One sequence's n-grams. Invariant: `last_seen[key]` is the position right after the latest occurrence of
    the n-gram `key` that ends before position `indexed`, the first position not yet indexed; the n-gram ending
    at the sequence's last token has no continuation and is never indexed, so a match is always an earlier one."""

    last_seen: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0

    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to max_tokens tokens that followed the latest earlier occurrence of the sequence's last 3 tokens
        (else its last 2); [] when they never occurred before."""
        for key, stop in ngrams(token_ids, max(self.indexed, min(NGRAM_SIZES))):  # those with a continuation
            self.last_seen[key] = stop
        self.indexed = max(self.indexed, len(token_ids))
        for n in NGRAM_SIZES:
            start = self.last_seen.get(tuple(token_ids[-n:])) if len(token_ids) > n else None
            if start is not None:
                return token_ids[start:start + max_tokens]
        return []


@dataclass
class PredictionIndex:
    """A request's predicted output as a draft source. Invariant: `text` is the prompt's last max(NGRAM_SIZES)
    tokens, then the prediction, so that an answer's first tokens draft the prediction's start;
    `positions[key]` lists the positions right after each occurrence of the n-gram `key` in `text` that has a
    continuation; a sequence of n tokens is expected to end at text position n + `offset` (where the last
    draft left it); `followed`: the last draft continued the prediction where it was expected to (the answer
    follows it), not where its last tokens occur elsewhere."""

    text: list[int]
    positions: dict[tuple[int, ...], list[int]]
    offset: int
    followed: bool = True

    @classmethod
    def of(cls, prompt_ids: list[int], prediction: list[int]) -> PredictionIndex:
        tail = prompt_ids[-max(NGRAM_SIZES):]
        text = tail + prediction
        positions: dict[tuple[int, ...], list[int]] = {}
        for key, stop in ngrams(text, min(NGRAM_SIZES)):
            positions.setdefault(key, []).append(stop)
        return cls(text, positions, len(tail) - len(prompt_ids))

    def on_track(self, token_ids: list[int], run: int) -> bool:
        """Have the sequence's last `run` tokens been the prediction's, where the sequence is expected to be?"""
        expected = len(token_ids) + self.offset
        return run <= expected <= len(self.text) and self.text[expected - run:expected] == token_ids[-run:]

    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to max_tokens tokens of the prediction after an occurrence of the sequence's last 3 tokens (else its
        last 2), the one nearest where the sequence is expected to be in it (code repeats its lines); [] when
        they do not occur in it."""
        for n in NGRAM_SIZES:
            starts = self.positions.get(tuple(token_ids[-n:])) if len(token_ids) >= n else None
            if starts:
                expected = len(token_ids) + self.offset
                start = min(starts, key=lambda position: abs(position - expected))
                self.offset, self.followed = start - len(token_ids), start == expected
                return self.text[start:start + max_tokens]
        return []
