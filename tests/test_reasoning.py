"""server.reasoning: a reasoning model's answer split into reasoning_content and content, whole and as it streams
(the parts that a stream's chunks send join into the whole answer's parts, whatever the chunks' boundaries); the
Responses API's reasoning items, whole and as events."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from engine import RequestOutput
from server.protocol import ResponsesRequest
from server.reasoning import REASONING_FORMATS, ReasoningStream
from server.responses_api import Answer

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


def output(text: str, new_text: str, finished: bool) -> RequestOutput:
    return RequestOutput("r", None, [1], text, list(range(len(text))), new_text, [], finished,
                         "stop" if finished else None, 0, None)


@dataclass
class Characters:
    """A tokenizer of one token per character of `text` (token i: its character i)."""

    text: str

    def decode(self, ids: list[int]) -> str:
        return "".join(self.text[i] for i in ids)


@pytest.mark.parametrize("step", [1, 4, 100])
@pytest.mark.parametrize("parser, answer, reasoning, content", CASES)
def test_the_responses_api_gives_reasoning_an_item_of_its_own(parser, answer, reasoning, content, step):
    """Under --reasoning-parser a response's output is a reasoning item (where there is reasoning), then the message
    (where there is content); streamed, each item opens, takes its text deltas and closes before the next opens, at
    the output index it has in the response."""
    answer_ = Answer(ResponsesRequest(input="hi"), "m", 1, False, {"temperature": 1.0, "top_p": 1.0},
                     REASONING_FORMATS[parser], Characters(answer))
    ends = list(range(step, len(answer), step)) + [len(answer)]
    events = answer_.opening()
    for before, end in zip([0, *ends], ends):
        events += answer_.step(output(answer[:end], answer[before:end], end == len(answer)))
    final = output(answer, "", True)
    events += answer_.closing(final)
    whole = answer_.response(final)
    kinds = [(item.type, item.content[0].text) for item in whole.output]
    has_message = bool(content or not reasoning)
    assert kinds == [("reasoning", reasoning)] * bool(reasoning) + [("message", content)] * has_message
    end = answer.find("</think>")
    reasoning_tokens = (end + len("</think>") if end >= 0 else len(answer)) if reasoning else 0
    assert whole.usage.output_tokens_details["reasoning_tokens"] == reasoning_tokens
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for index, item in enumerate(whole.output):
        text_event = "reasoning_text" if item.type == "reasoning" else "output_text"
        mine = [e for e in events if e.get("output_index") == index]
        assert [e["type"] for e in mine[:2]] == ["response.output_item.added", "response.content_part.added"]
        assert [e["type"] for e in mine[-3:]] == [f"response.{text_event}.done", "response.content_part.done",
                                                  "response.output_item.done"]
        assert {e["type"] for e in mine[2:-3]} <= {f"response.{text_event}.delta"}
        assert "".join(e["delta"] for e in mine[2:-3]) == mine[-3]["text"] == item.content[0].text
        assert mine[-1]["item"] == item.model_dump()
    item_0, item_1 = ([events.index(e) for e in events if e.get("output_index") == i] for i in range(2))
    assert not item_1 or max(item_0) < min(item_1)  # the reasoning item closes before the message opens


@pytest.mark.parametrize("answer, reasoning_status", [("<think>ab</think>Hello", "completed"),
                                                      ("<think>abc", "incomplete")])
def test_a_cut_answer_leaves_its_finished_reasoning_completed(answer, reasoning_status):
    """max_output_tokens cut the answer: its reasoning item is incomplete only where the cut came inside it, in
    the streamed item as in the response."""
    answer_ = Answer(ResponsesRequest(input="hi"), "m", 1, False, {"temperature": 1.0, "top_p": 1.0},
                     REASONING_FORMATS["qwen3"], Characters(answer))
    final = RequestOutput("r", None, [1], answer, list(range(len(answer))), answer, [], True, "length", 0, None)
    events = answer_.opening() + answer_.step(final) + answer_.closing(final)
    whole = answer_.response(final)
    assert whole.status == "incomplete" and whole.output[0].status == reasoning_status
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done[0] == whole.output[0].model_dump() and events[-1]["response"]["output"][0]["status"] == reasoning_status


def test_reasoning_items_sent_back_go_with_the_assistant_message_after_them():
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [], "status": "completed",
                 "content": [{"type": "reasoning_text", "text": "Hmm."}]}
    answer = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Yes."}]}
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    chat = ResponsesRequest(input=[{"role": "user", "content": "hi"}, reasoning, answer,
                                   {"role": "user", "content": "and?"}, reasoning, call,
                                   {"type": "function_call_output", "call_id": "c1", "output": "1"}]).chat()
    assert [(m.role, m.reasoning_content) for m in chat.messages] == [
        ("user", None), ("assistant", "Hmm."), ("user", None), ("assistant", "Hmm."), ("tool", None)]
