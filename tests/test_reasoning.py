"""server.reasoning: a reasoning model's answer split into reasoning_content and content, whole and as it streams
(the parts that a stream's chunks send join into the whole answer's parts, whatever the chunks' boundaries)."""
from __future__ import annotations

import pytest

from server.reasoning import REASONING_FORMATS, ReasoningStream

CASES = [  # (parser, answer, reasoning, content)
    ("qwen3", "<think>\nLet me see. 2 < 3.\n</think>\n\nYes.", "Let me see. 2 < 3.\n", "Yes."),
    ("qwen3", "Yes, plainly.", "", "Yes, plainly."),  # enable_thinking off: no <think> written
    ("qwen3", "<div>a tag</div>", "", "<div>a tag</div>"),
    ("qwen3", "<think>cut short by max_tokens", "cut short by max_tokens", ""),
    ("qwen3", "<think>a</thin", "a</thin", ""),
    ("deepseek_r1", "First, 1 + 1.\n</think>\n\n2", "First, 1 + 1.\n", "2"),  # the prompt opened <think>
    ("deepseek_r1", "<think>\nIt writes the tag itself.</think>Done", "It writes the tag itself.", "Done"),
    ("deepseek_r1", "reasoning that never ends", "reasoning that never ends", ""),
]


@pytest.mark.parametrize("parser, answer, reasoning, content", CASES)
def test_an_answer_splits_at_the_end_of_its_reasoning(parser, answer, reasoning, content):
    assert REASONING_FORMATS[parser].split(answer, finished=True) == (reasoning, content)


@pytest.mark.parametrize("step", [1, 2, 3, 5])
@pytest.mark.parametrize("parser, answer, reasoning, content", CASES)
def test_streamed_parts_join_into_the_whole_answers_parts(parser, answer, reasoning, content, step):
    """Chunks of `step` characters: no tag's start is ever sent as text, and nothing sent is taken back."""
    stream, sent = ReasoningStream(REASONING_FORMATS[parser]), {"reasoning": "", "content": ""}
    ends = list(range(step, len(answer), step)) + [len(answer)]
    for end in ends:
        new_reasoning, new_content = stream.delta(answer[:end], finished=end == len(answer))
        sent["reasoning"] += new_reasoning or ""
        sent["content"] += new_content or ""
        assert "</think>" not in sent["reasoning"] + sent["content"]
    assert (sent["reasoning"], sent["content"]) == (reasoning, content)
