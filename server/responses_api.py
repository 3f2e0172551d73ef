"""OpenAI's Responses API (/v1/responses), for text. A request's instructions and input become a chat in the model's
template, answered as /v1/chat/completions answers it (ChatCompletionRequest: the same sampling, structured outputs
from `text.format`, context checks), and come back as a Response object, or streamed as its events:
response.created, response.in_progress, response.output_item.added, response.content_part.added,
response.output_text.delta (one per engine step), response.output_text.done, response.content_part.done,
response.output_item.done, response.completed (or response.incomplete, where max_output_tokens cut the answer).
Nothing is stored, so there is no previous_response_id to go on from; tools are served on chat completions."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from engine import RequestOutput
from server.errors import ERROR_RESPONSES, APIError
from server.generation import close_all, finished, interleave, start
from server.guards import require_api_key
from server.prompts import chat_prompt_ids
from server.protocol import (
    ChatCompletionRequest,
    ResponseObject,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponsesRequest,
    ResponseUsage,
    random_id,
)
from server.state import State

router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)

# the chat fields an error may name, as /v1/responses calls them
RESPONSES_NAMES = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}


@router.post("/v1/responses", response_model=ResponseObject)
async def responses(req: ResponsesRequest, request: Request, state: State) -> Response:
    chat = as_chat(req)
    try:
        prompt_ids = chat_prompt_ids(state.tokenizer, chat.messages)
        streams = await start(state, chat, [prompt_ids])
    except APIError as e:
        raise renamed(e) from None
    answer = Answer(req, chat.model or state.config.model_name, len(prompt_ids))
    if not req.stream:
        (final,) = await finished(request, streams)
        return JSONResponse(answer.response(final).model_dump())

    async def events() -> AsyncIterator[str]:
        out: RequestOutput | None = None
        try:
            for event in answer.opening():
                yield sse(event)
            async for _, out in interleave(streams):
                if out.new_text:
                    yield sse(answer.delta(out.new_text))
            for event in answer.closing(out):
                yield sse(event)
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in-band
            yield sse(answer.event("error", code="internal_error", message=str(e), param=None))
        finally:
            close_all(streams)

    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(close_all, streams))


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
    message, param = e.info.message, e.info.param
    for chat_name, name in RESPONSES_NAMES.items():
        message = message.replace(chat_name, name)
    return APIError(e.status, message, e.info.type, RESPONSES_NAMES.get(param, param), e.info.code, e.headers)


def sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


class Answer:
    """One response as it is built: the Response object, its output message, and the events of a stream, numbered
    in the order they are made."""

    def __init__(self, req: ResponsesRequest, model: str, input_tokens: int) -> None:
        self.req, self.model, self.input_tokens = req, model, input_tokens
        self.id, self.item_id = random_id("resp"), random_id("msg")
        self.sequence_number = 0

    def response(self, final: RequestOutput | None) -> ResponseObject:
        """The Response object: in progress (final None), else finished with final's text and usage."""
        fmt = self.req.text.format if self.req.text is not None and self.req.text.format is not None else None
        common = dict(id=self.id, model=self.model, instructions=self.req.instructions,
                      max_output_tokens=self.req.max_output_tokens, temperature=self.req.temperature,
                      top_p=self.req.top_p, metadata=self.req.metadata or {},
                      text={"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}})
        if final is None:
            return ResponseObject(status="in_progress", output=[], **common)
        cut = final.finish_reason == "length"
        status = "incomplete" if cut else "completed"
        usage = ResponseUsage(input_tokens=self.input_tokens, output_tokens=len(final.token_ids),
                              total_tokens=self.input_tokens + len(final.token_ids))
        return ResponseObject(status=status, output=[self.message(final.text, status)], usage=usage,
                              incomplete_details={"reason": "max_output_tokens"} if cut else None, **common)

    def message(self, text: str, status: str) -> ResponseOutputMessage:
        content = [] if status == "in_progress" else [ResponseOutputText(text=text)]
        return ResponseOutputMessage(id=self.item_id, status=status, content=content)

    def event(self, type_: str, **fields) -> dict:
        event = {"type": type_, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return event

    def opening(self) -> list[dict]:
        started = self.response(None).model_dump()
        return [self.event("response.created", response=started),
                self.event("response.in_progress", response=started),
                self.event("response.output_item.added", output_index=0,
                           item=self.message("", "in_progress").model_dump()),
                self.event("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                           part=ResponseOutputText(text="").model_dump())]

    def delta(self, text: str) -> dict:
        return self.event("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                          delta=text, logprobs=[])

    def closing(self, final: RequestOutput) -> list[dict]:
        """The events after the last delta; the finished text is the deltas' (a stop string never reached them)."""
        done = self.response(final)
        item = done.output[0]
        where = dict(item_id=self.item_id, output_index=0, content_index=0)
        return [self.event("response.output_text.done", **where, text=item.content[0].text, logprobs=[]),
                self.event("response.content_part.done", **where, part=item.content[0].model_dump()),
                self.event("response.output_item.done", output_index=0, item=item.model_dump()),
                self.event(f"response.{done.status}", response=done.model_dump())]
