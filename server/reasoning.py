"""Reasoning models' answers split into their reasoning and their content (`--reasoning-parser`, as vLLM's and
llama.cpp's servers do): the text up to `</think>` is the message's `reasoning_content`, the rest its `content`.
A structured output (or tools) constrains the content: the reasoning before it is free.
A streamed answer is split as it grows: each chunk sends what the split of the text so far adds to either part,
holding back the start of a tag until it is known to be one or not."""
from __future__ import annotations

from dataclasses import dataclass

from engine import ReasoningTags


@dataclass(frozen=True)
class ReasoningFormat:
    """How a model writes its reasoning (its tags): where the prompt opens it (DeepSeek-R1 and its distills), an
    answer is reasoning until the end tag, and all of it without one; otherwise (Qwen3) an answer reasons only where
    it starts with the start tag (not with enable_thinking off)."""

    tags: ReasoningTags

    def split(self, text: str, finished: bool) -> tuple[str, str]:
        """(reasoning, content) of an answer's text so far; before it is finished, a tag's start at its end is
        held back from both, as is an answer still too short to tell whether it opens with the start tag."""
        start, end = self.tags.start, self.tags.end
        opened = text.lstrip()
        if not finished and start.startswith(opened):  # (maybe the start tag still to come)
            return "", ""
        if opened.startswith(start):
            text = opened[len(start):]
        elif not self.tags.opened_by_prompt:
            return "", text
        at = text.find(end)
        if at >= 0:
            return text[:at].lstrip(), text[at + len(end):].lstrip()
        held = 0 if finished else next((k for k in range(len(end) - 1, 0, -1) if text.endswith(end[:k])), 0)
        return text[:len(text) - held].lstrip(), ""


REASONING_FORMATS = {"deepseek_r1": ReasoningFormat(ReasoningTags(opened_by_prompt=True)),
                     "qwen3": ReasoningFormat(ReasoningTags(opened_by_prompt=False))}


@dataclass
class ReasoningStream:
    """One streamed answer's parts. Invariant: `content` is the content part of the text so far, and
    `reasoning_sent` and `content_sent` the lengths of the parts the chunks sent (the split of a longer text only
    extends them)."""

    format: ReasoningFormat
    content: str = ""
    reasoning_sent: int = 0
    content_sent: int = 0

    def delta(self, text: str, finished: bool) -> tuple[str | None, str | None]:
        """What the text so far adds to each part (None: nothing)."""
        reasoning, self.content = self.format.split(text, finished)
        new_reasoning, new_content = reasoning[self.reasoning_sent:], self.content[self.content_sent:]
        self.reasoning_sent, self.content_sent = len(reasoning), len(self.content)
        return new_reasoning or None, new_content or None
