"""Reasoning models' answers split into their reasoning and their content (`--reasoning-parser`, as vLLM's and
llama.cpp's servers do): the text up to `</think>` is the message's `reasoning_content`, the rest its `content`.
A streamed answer is split as it grows: each chunk sends what the split of the text so far adds to either part,
holding back the start of a tag until it is known to be one or not."""
from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningFormat:
    """How a model writes its reasoning. `opened_by_prompt`: its chat template ends the prompt with `<think>`
    (DeepSeek-R1 and its distills), so an answer is reasoning until `</think>`, and all of it without one;
    otherwise (Qwen3) an answer reasons only where it starts with `<think>` (not with enable_thinking off)."""

    opened_by_prompt: bool

    def split(self, text: str, finished: bool) -> tuple[str, str]:
        """(reasoning, content) of an answer's text so far; before it is finished, a tag's start at its end is
        held back from both, as is an answer still too short to tell whether it opens with `<think>`."""
        opened = text.lstrip()
        if not finished and START.startswith(opened):  # (maybe "<think>" still to come)
            return "", ""
        if opened.startswith(START):
            text = opened[len(START):]
        elif not self.opened_by_prompt:
            return "", text
        end = text.find(END)
        if end >= 0:
            return text[:end].lstrip(), text[end + len(END):].lstrip()
        held = 0 if finished else next((k for k in range(len(END) - 1, 0, -1) if text.endswith(END[:k])), 0)
        return text[:len(text) - held].lstrip(), ""


REASONING_FORMATS = {"deepseek_r1": ReasoningFormat(opened_by_prompt=True),
                     "qwen3": ReasoningFormat(opened_by_prompt=False)}


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
