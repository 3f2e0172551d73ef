"""OpenAI's Responses API (/v1/responses), for text (no images or audio). A request's instructions and input become
a chat in the model's template, answered as /v1/chat/completions answers it (ChatCompletionRequest: the same
sampling, structured outputs from `text.format`, context checks), and come back as a Response object, or streamed
as its events: response.created, response.in_progress, response.output_item.added, response.content_part.added,
response.output_text.delta (one per engine step), response.output_text.done, response.content_part.done,
response.output_item.done, response.completed (or response.incomplete, where max_output_tokens cut the answer).
Function tools are chat completions' (server.tools), their calls output items of type function_call, and earlier
calls and their outputs input items. Nothing is stored, so there is no previous_response_id to go on from."""
from __future__ import annotations

import json
import logging
import re
import time
from bisect import bisect_left
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from engine import RequestOutput
from server.errors import ERROR_RESPONSES, APIError
from server.generation import checked, close_all, failure, finished, interleave, start
from server.guards import require_api_key
from server.prompts import chat_request_ids
from server.protocol import (
    ChatCompletionRequest,
    ResponseFunctionCall,
    ResponseObject,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningText,
    ResponsesRequest,
    ResponseUsage,
    ToolCall,
    random_id,
)
from server.reasoning import ReasoningFormat, ReasoningStream
from server.sampling import chosen_sampling
from server.state import State
from server.tools import json_answer, read_answer, response_text

logger = logging.getLogger("gorgon.server")
router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)

# the chat fields an error may name, as /v1/responses calls them (the longest first)
RESPONSES_NAMES = {"response_format.json_schema": "text.format", "response_format": "text.format",
                   "max_tokens": "max_output_tokens", "messages": "input"}
# a chat field's name in an error's message, not in a quoted value of the request's (a tool named 'send_messages')
CHAT_NAME = re.compile(r"(?<![\w'\".])(" + "|".join(map(re.escape, RESPONSES_NAMES)) + r")(?![\w'\"])")


@router.post("/v1/responses", response_model=ResponseObject)
@router.post("/responses", include_in_schema=False)
async def responses(req: ResponsesRequest, request: Request, state: State) -> Response:
    chat = as_chat(req)
    try:
        prompt_ids, tools = chat_request_ids(state.tokenizer, chat, state.llm.config.chat_template_kwargs)
        streams = await start(state, chat, [prompt_ids])
    except APIError as e:
        raise renamed(e) from None
    answer = Answer(req, chat.model or state.config.model_name, len(prompt_ids), tools,
                    chosen_sampling(chat, state.llm.sampling_defaults), state.reasoning, state.tokenizer,
                    json_answer(chat))
    if not req.stream:
        (final,) = await finished(request, streams)
        return JSONResponse(answer.response(final).model_dump())

    async def events() -> AsyncIterator[str]:
        out: RequestOutput | None = None
        try:
            for event in answer.opening():
                yield sse(event)
            async for _, out in interleave(streams):
                for event in answer.step(checked(out)):
                    yield sse(event)
            for event in answer.closing(out):
                yield sse(event)
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in-band
            logger.warning("stream failed: %s", e)
            error = failure(e).info
            yield sse(answer.event("error", code=error.type, message=error.message, param=None))
        finally:
            close_all(streams)

    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(close_all, streams))


@router.api_route("/v1/responses/{response_id:path}", methods=["GET", "DELETE", "POST"], include_in_schema=False)
@router.api_route("/responses/{response_id:path}", methods=["GET", "DELETE", "POST"], include_in_schema=False)
async def stored_response(response_id: str) -> None:
    """Retrieve, delete, cancel, input_items: of responses this server never stores."""
    raise APIError(404, f"no response {response_id.split('/')[0]!r} is stored here: this server stores no responses "
                        "(send each request's whole input)", "not_found_error", code="response_not_found")


def as_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The request as a chat completion; where that is not valid, a 400 naming the Responses API's field."""
    try:
        return req.chat()
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        message = first["msg"] if first["type"] == "field_error" else f"{field}: {first['msg']}"
        raise renamed(APIError(400, message, param=str(first["loc"][0]) if first["loc"] else None)) from None


def renamed(e: APIError) -> APIError:
    """e, naming the fields of /v1/responses where it names a chat completion's."""
    message = CHAT_NAME.sub(lambda match: RESPONSES_NAMES[match.group(1)], e.info.message)
    param = e.info.param
    return APIError(e.status, message, e.info.type, RESPONSES_NAMES.get(param, param), e.info.code, e.headers)


def sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


class Answer:
    """One response as it is built: the Response object, its output items (under --reasoning-parser a reasoning item
    first, then a message, and with tools the calls of functions after it), and the events of a stream, numbered in
    the order they are made. With tools the answer is server.tools' JSON object: a stream sends its response text
    as it grows, its calls once whole. Invariant: `sent` holds, per streamed item kind, the text its deltas sent,
    and `indices` the output index of each item the stream has opened."""

    def __init__(self, req: ResponsesRequest, model: str, input_tokens: int, tools: bool,
                 sampling: dict[str, float | int], reasoning: ReasoningFormat | None, tokenizer,
                 json_value: bool = False) -> None:
        self.req, self.model, self.input_tokens, self.tools = req, model, input_tokens, tools
        self.json_value = json_value  # with tools, a text answer is a JSON value (server.tools.json_answer)
        self.sampling = sampling  # the parameters sampled with (server.sampling.chosen_sampling), reported
        self.reasoning, self.tokenizer = reasoning, tokenizer
        self.stream = ReasoningStream(reasoning) if reasoning is not None else None
        self.id, self.created_at = random_id("resp_"), int(time.time())
        self.item_ids = {"reasoning": random_id("rs_"), "message": random_id("msg_")}
        self.sequence_number = 0
        self.sent = {"reasoning": "", "message": ""}
        self.indices: dict[str, int] = {}
        self.closed: set[str] = set()

    def parts(self, text: str) -> tuple[str, str | None, list[ToolCall]]:
        """A whole answer's (reasoning, message text or None, calls)."""
        reasoning, text = self.reasoning.split(text, finished=True) if self.reasoning else ("", text)
        content, calls = read_answer(text, self.json_value) if self.tools else (text, [])
        return reasoning, None if content == "" and reasoning else content, calls

    def response(self, final: RequestOutput | None) -> ResponseObject:
        """The Response object: in progress (final None), else finished with final's output and usage."""
        fmt = self.req.text.format if self.req.text is not None and self.req.text.format is not None else None
        choice = self.req.tool_choice
        common = dict(id=self.id, created_at=self.created_at, model=self.model, instructions=self.req.instructions,
                      max_output_tokens=self.req.max_output_tokens, temperature=self.sampling["temperature"],
                      top_p=self.sampling["top_p"], metadata=self.req.metadata or {},
                      text={"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
                      tools=[t.model_dump(exclude_none=True) for t in self.req.tools or []],
                      tool_choice=choice.model_dump() if isinstance(choice, BaseModel) else choice or "auto",
                      parallel_tool_calls=self.req.parallel_tool_calls)
        if final is None:
            return ResponseObject(status="in_progress", output=[], **common)
        cut = final.finish_reason == "length"
        status = "incomplete" if cut else "completed"
        reasoning, content, calls = self.parts(final.text)
        # (reasoning whose end tag came is complete, though the answer after it was cut)
        reasoning_status = "completed" if self.reasoning and self.reasoning.tags.end in final.text else status
        output: list = [self.reasoning_item(reasoning, reasoning_status)] if reasoning else []
        output += [] if content is None else [self.message(content, status)]
        output += [ResponseFunctionCall(id=random_id("fc_"), call_id=call.id, name=call.function.name,
                                        arguments=call.function.arguments, status=status) for call in calls]
        usage = ResponseUsage(input_tokens=self.input_tokens, output_tokens=len(final.token_ids),
                              total_tokens=self.input_tokens + len(final.token_ids),
                              input_tokens_details={"cached_tokens": final.num_cached_tokens,
                                                    "cache_write_tokens": 0},  # (nothing is charged)
                              output_tokens_details={"reasoning_tokens": self.reasoning_tokens(final, reasoning)})
        return ResponseObject(status=status, output=output, usage=usage, completed_at=None if cut else int(time.time()),
                              incomplete_details={"reason": "max_output_tokens"} if cut else None, **common)

    def reasoning_tokens(self, final: RequestOutput, reasoning: str) -> int:
        """The output tokens up to the end of the reasoning's end tag (all of them where it has none): the fewest
        whose text holds the tag, by bisection (a few decodes, not one per token)."""
        if not reasoning:
            return 0
        end, ids = self.reasoning.tags.end, final.token_ids
        if end not in final.text:
            return len(ids)
        return bisect_left(range(len(ids) + 1), True, key=lambda n: end in self.tokenizer.decode(ids[:n]))

    def message(self, text: str, status: str) -> ResponseOutputMessage:
        content = [] if status == "in_progress" else [ResponseOutputText(text=text)]
        return ResponseOutputMessage(id=self.item_ids["message"], status=status, content=content)

    def reasoning_item(self, text: str, status: str) -> ResponseReasoningItem:
        content = [] if status == "in_progress" else [ResponseReasoningText(text=text)]
        return ResponseReasoningItem(id=self.item_ids["reasoning"], status=status, content=content)

    def event(self, type_: str, **fields) -> dict:
        event = {"type": type_, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return event

    def opening(self) -> list[dict]:
        started = self.response(None).model_dump()
        return [self.event("response.created", response=started), self.event("response.in_progress", response=started)]

    def step(self, out: RequestOutput) -> list[dict]:
        """The events of a step's output: what it adds to the reasoning, then to the message's text (with tools, to
        the response text so far)."""
        if self.stream is not None:
            reasoning, content = self.stream.delta(out.text, out.finished)
            text = self.stream.content
        else:
            reasoning, content, text = None, out.new_text, out.text
        if self.tools:
            content = "" if self.json_value else (response_text(text) or "")[len(self.sent["message"]):]
        return (self.delta("reasoning", reasoning) if reasoning else []) + (self.delta("message", content)
                                                                              if content else [])

    def delta(self, kind: str, text: str) -> list[dict]:
        """Open the item of this kind (closing the reasoning before the message), and send text to it."""
        events = self.open(kind)
        self.sent[kind] += text
        return events + [self.event(f"response.{TEXT_EVENTS[kind]}.delta", item_id=self.item_ids[kind],
                                    output_index=self.indices[kind], content_index=0, delta=text,
                                    **LOGPROBS[kind])]

    def open(self, kind: str) -> list[dict]:
        if kind in self.indices:
            return []
        events = self.close("reasoning", self.reasoning_item(self.sent["reasoning"], "completed")) \
            if kind == "message" and "reasoning" in self.indices else []
        self.indices[kind] = len(self.indices)
        item, part = ((self.message("", "in_progress"), ResponseOutputText(text="")) if kind == "message" else
                      (self.reasoning_item("", "in_progress"), ResponseReasoningText(text="")))
        return events + [self.event("response.output_item.added", output_index=self.indices[kind],
                                    item=item.model_dump()),
                         self.event("response.content_part.added", item_id=self.item_ids[kind],
                                    output_index=self.indices[kind], content_index=0, part=part.model_dump())]

    def close(self, kind: str, item: ResponseOutputMessage | ResponseReasoningItem) -> list[dict]:
        """The item's last text, and its end (once)."""
        if kind in self.closed:
            return []
        self.closed.add(kind)
        text = item.content[0].text
        events = self.delta(kind, text[len(self.sent[kind]):]) if len(text) > len(self.sent[kind]) else self.open(kind)
        where = dict(item_id=self.item_ids[kind], output_index=self.indices[kind], content_index=0)
        return events + [self.event(f"response.{TEXT_EVENTS[kind]}.done", **where, text=text, **LOGPROBS[kind]),
                         self.event("response.content_part.done", **where, part=item.content[0].model_dump()),
                         self.event("response.output_item.done", output_index=self.indices[kind],
                                    item=item.model_dump())]

    def closing(self, final: RequestOutput) -> list[dict]:
        """The events after the last step: the reasoning's and the message's last text and their ends, each call
        whole, the response."""
        done = self.response(final)
        events = []
        for index, item in enumerate(done.output):
            if isinstance(item, (ResponseOutputMessage, ResponseReasoningItem)):
                events += self.close(item.type, item)
                continue
            where = dict(item_id=item.id, output_index=index)
            events += [self.event("response.output_item.added", output_index=index,
                                  item=item.model_copy(update={"arguments": "", "status": "in_progress"}).model_dump()),
                       self.event("response.function_call_arguments.delta", **where, delta=item.arguments),
                       self.event("response.function_call_arguments.done", **where, arguments=item.arguments),
                       self.event("response.output_item.done", output_index=index, item=item.model_dump())]
        return events + [self.event(f"response.{done.status}", response=done.model_dump())]


# each item kind's text events: response.output_text.delta / .done, response.reasoning_text.delta / .done
TEXT_EVENTS = {"message": "output_text", "reasoning": "reasoning_text"}
LOGPROBS = {"message": {"logprobs": []}, "reasoning": {}}  # (output text events list none: none are served)
