"""FastAPI app: OpenAI completions and chat (SSE streaming), models, vLLM's adapter routes, health, metrics."""
from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import RequestOutput, SamplingParams
from server.async_engine import AsyncEngine, EngineError, EngineStopped, RequestStream
from server.metrics import ServerMetrics
from server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                             ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatResponseMessage, CompletionChoice,
                             CompletionLogprobs, CompletionRequest, CompletionResponse, ErrorInfo, ErrorResponse,
                             LoadLoraAdapterRequest, ModelCard, ModelList, SamplingRequest, TokenLogprob, TopLogprob,
                             UnloadLoraAdapterRequest, Usage, random_id)

logger = logging.getLogger("gorgon.server")

# Used when the tokenizer has none (e.g. a base model): one "<|role|>" header line per message.
FALLBACK_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
DISCONNECT_POLL_S = 0.25

Body = TypeVar("Body", bound=BaseModel)


@dataclass
class ServerConfig:
    """What the HTTP layer needs besides the engine. `model_name` is the base model's id in the API."""

    model_name: str
    model_root: str  # the base model's folder, reported as its `root`
    api_key: str | None = None  # when set, /v1/* requires "Authorization: Bearer <api_key>"
    max_request_bytes: int = 1 << 20


class APIError(Exception):
    """An error the client caused (or may retry), sent as OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.info = status, ErrorInfo(message=message, type=type_, param=param, code=code)


def error_response(status: int, info: ErrorInfo) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status)


def create_app(llm, config: ServerConfig) -> FastAPI:
    """An app serving `llm`; its step loop runs from startup to shutdown."""
    metrics = ServerMetrics(llm)
    engine = AsyncEngine(llm, metrics)
    tokenizer = llm.tokenizer

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="gorgon", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.info)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, ErrorInfo(message=str(e.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, ErrorInfo(message=f"internal error: {e}", type="internal_error"))

    async def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), config.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key")

    async def read_body(request: Request, schema: type[Body]) -> Body:
        limit = config.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
        try:
            return schema.model_validate_json(bytes(body))
        except ValidationError as e:
            first = e.errors()[0]
            if first["type"] == "json_invalid":
                raise APIError(400, f"the body is not valid JSON: {first['msg']}") from None
            param = ".".join(str(part) for part in first["loc"]) or None
            raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None

    def resolve_adapter(model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base model)."""
        if model in (None, "", config.model_name):
            return None
        if any(a["name"] == model for a in engine.list_adapters()):
            return model
        raise APIError(404, f"the model {model!r} does not exist", "not_found_error", "model", "model_not_found")

    def sampling_params(req: SamplingRequest, max_tokens: int | None, prompt_len: int, logprobs: int | None,
                        index: int) -> SamplingParams:
        if max_tokens is not None and max_tokens > llm.max_model_len:
            raise APIError(400, f"max_tokens {max_tokens} exceeds the model's context ({llm.max_model_len} tokens)",
                           param="max_tokens")
        try:
            return SamplingParams(
                max_tokens=max_tokens or llm.max_model_len - prompt_len, temperature=req.temperature,
                top_p=req.top_p, top_k=req.top_k, stop=req.stop_list, ignore_eos=req.ignore_eos,
                seed=None if req.seed is None else req.seed + index,  # n choices: distinct but reproducible
                logprobs=logprobs, use_medusa=req.use_medusa)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def start(req: SamplingRequest, prompt_ids: list[int], max_tokens: int | None,
                    logprobs: int | None) -> list[RequestStream]:
        """Queue the request's n choices; all are taken or none is."""
        adapter = resolve_adapter(req.model)
        if len(prompt_ids) >= llm.max_model_len:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                                f"{llm.max_model_len} tokens, and at least one must be left to generate",
                           param="prompt" if isinstance(req, CompletionRequest) else "messages",
                           code="context_length_exceeded")
        params = [sampling_params(req, max_tokens, len(prompt_ids), logprobs, i) for i in range(req.n)]
        streams: list[RequestStream] = []
        try:
            for p in params:
                streams.append(await engine.add_request(prompt_ids, p, adapter, req.model or config.model_name))
        except EngineStopped as e:
            raise APIError(503, str(e), "service_unavailable") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        finally:
            if len(streams) < len(params):
                close_all(streams)
        return streams

    # ---- OpenAI routes ----------------------------------------------------------------------------------
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        req = await read_body(request, CompletionRequest)
        prompt_ids = tokenizer(req.prompt)["input_ids"] if isinstance(req.prompt, str) else req.prompt
        streams = await start(req, prompt_ids, req.max_tokens, req.logprobs)
        request_id = random_id("cmpl")
        model = req.model or config.model_name

        def logprobs_of(out: RequestOutput, token_ids: list[int], text_offset: int) -> CompletionLogprobs | None:
            if req.logprobs is None:
                return None
            return completion_logprobs(tokenizer, token_ids, out.logprobs[len(out.logprobs) - len(token_ids):],
                                       text_offset)

        async def chunks(streams: list[RequestStream]) -> AsyncIterator[BaseModel]:
            text_len = [0] * len(streams)
            async for i, out in interleave(streams):  # one chunk per step, even when its text is still ''
                choice = CompletionChoice(index=i, text=out.new_text, finish_reason=out.finish_reason,
                                          logprobs=logprobs_of(out, out.new_token_ids, text_len[i]))
                yield CompletionResponse(id=request_id, model=model, choices=[choice])
                text_len[i] += len(out.new_text)

        async def response(streams: list[RequestStream]) -> Response:
            finals = await until_done(request, streams)
            choices = [CompletionChoice(index=i, text=out.text, finish_reason=out.finish_reason,
                                        logprobs=logprobs_of(out, out.token_ids, 0)) for i, out in enumerate(finals)]
            return JSONResponse(CompletionResponse(id=request_id, model=model, choices=choices,
                                                   usage=usage(prompt_ids, finals)).model_dump())

        def usage_chunk(u: Usage) -> CompletionResponse:
            return CompletionResponse(id=request_id, model=model, choices=[], usage=u)

        return await _respond(request, req, streams, chunks, response, usage_chunk, prompt_ids)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await read_body(request, ChatCompletionRequest)
        messages = [m.model_dump() for m in req.messages]
        text = tokenizer.apply_chat_template(messages, chat_template=tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE,
                                             tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        streams = await start(req, prompt_ids, req.token_limit, logprobs)
        request_id = random_id("chatcmpl")
        model = req.model or config.model_name

        def logprobs_of(out: RequestOutput, token_ids: list[int]) -> ChatLogprobs | None:
            if logprobs is None:
                return None
            return chat_logprobs(tokenizer, token_ids, out.logprobs[len(out.logprobs) - len(token_ids):])

        async def chunks(streams: list[RequestStream]) -> AsyncIterator[BaseModel]:
            for i in range(len(streams)):
                yield ChatCompletionChunk(id=request_id, model=model, choices=[
                    ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            async for i, out in interleave(streams):
                choice = ChatChunkChoice(index=i, delta=ChatDelta(content=out.new_text),
                                         finish_reason=out.finish_reason, logprobs=logprobs_of(out, out.new_token_ids))
                yield ChatCompletionChunk(id=request_id, model=model, choices=[choice])

        async def response(streams: list[RequestStream]) -> Response:
            finals = await until_done(request, streams)
            choices = [ChatChoice(index=i, message=ChatResponseMessage(content=out.text),
                                  finish_reason=out.finish_reason, logprobs=logprobs_of(out, out.token_ids))
                       for i, out in enumerate(finals)]
            return JSONResponse(ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                                       usage=usage(prompt_ids, finals)).model_dump())

        def usage_chunk(u: Usage) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, model=model, choices=[], usage=u)

        return await _respond(request, req, streams, chunks, response, usage_chunk, prompt_ids)

    async def _respond(request: Request, req: SamplingRequest, streams: list[RequestStream], chunks, response,
                       usage_chunk, prompt_ids: list[int]) -> Response:
        """Stream SSE chunks (then usage, if asked) or wait for the whole answer. The streams are closed
        either way, so a client that goes away aborts its requests and frees their KV blocks."""
        if not req.stream:
            try:
                return await response(streams)
            except EngineError as e:
                raise APIError(500, str(e), "internal_error") from None
            finally:
                close_all(streams)

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in chunks(streams):
                    yield f"data: {chunk.model_dump_json()}\n\n"
                if req.stream_options and req.stream_options.include_usage:
                    final = usage_chunk(usage(prompt_ids, [s.last for s in streams]))
                    yield f"data: {final.model_dump_json()}\n\n"
            except Exception as e:  # noqa: BLE001 - the status line is sent: report in-band, as OpenAI does
                logger.warning("stream failed: %s", e)
                error = ErrorResponse(error=ErrorInfo(message=str(e), type="internal_error"))
                yield f"data: {error.model_dump_json()}\n\n"
            finally:
                close_all(streams)
            yield "data: [DONE]\n\n"

        # the background task covers a client gone before the body iterator ever started
        return StreamingResponse(events(), media_type="text/event-stream",
                                 background=BackgroundTask(close_all, streams))

    @v1.get("/models")
    async def models() -> ModelList:
        cards = [ModelCard(id=config.model_name, root=config.model_root)]
        cards += [ModelCard(id=a["name"], root=a["path"], parent=config.model_name) for a in engine.list_adapters()]
        return ModelList(data=cards)

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        req = await read_body(request, LoadLoraAdapterRequest)
        if req.lora_name == config.model_name:
            raise APIError(400, f"{req.lora_name!r} is the base model's name", param="lora_name")
        try:
            await engine.load_adapter(req.lora_name, req.lora_path)
        except (ValueError, OSError) as e:
            raise APIError(400, str(e), param="lora_path") from None
        return PlainTextResponse(f"Success: adapter '{req.lora_name}' added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        req = await read_body(request, UnloadLoraAdapterRequest)
        try:
            await engine.unload_adapter(req.lora_name)
        except ValueError as e:
            raise APIError(400, str(e), param="lora_name") from None
        return PlainTextResponse(f"Success: adapter '{req.lora_name}' removed successfully.")

    app.include_router(v1)

    # ---- operations -----------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.is_running:
            return error_response(503, ErrorInfo(message="the engine is not running", type="service_unavailable"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")


def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


async def interleave(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they arrive, tagged with their index; raises the first failure."""
    merged: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                merged.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            merged.put_nowait((i, e))
        merged.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await merged.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def until_done(request: Request, streams: list[RequestStream]) -> list[RequestOutput]:
    """The finished output of every stream. A client that disconnects meanwhile cancels the wait (the
    caller's close_all then aborts the requests)."""

    async def collect() -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for i, out in interleave(streams):
            finals[i] = out
        return finals

    task = asyncio.create_task(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "the client closed the connection")
    finally:
        task.cancel()


def usage(prompt_ids: list[int], finals: list[RequestOutput]) -> Usage:
    completion = sum(len(out.token_ids) for out in finals)
    return Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion, total_tokens=len(prompt_ids) + completion)


def completion_logprobs(tokenizer, token_ids: list[int], entries: list[tuple[float, dict[int, float]]],
                        text_offset: int) -> CompletionLogprobs:
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp for lp, _ in entries], text_offset=offsets,
                              top_logprobs=[{tokenizer.decode([t]): v for t, v in top.items()} for _, top in entries])


def chat_logprobs(tokenizer, token_ids: list[int], entries: list[tuple[float, dict[int, float]]]) -> ChatLogprobs:
    def top(t: int, lp: float) -> TopLogprob:
        token = tokenizer.decode([t])
        return TopLogprob(token=token, logprob=lp, bytes=list(token.encode()))

    return ChatLogprobs(content=[TokenLogprob(**top(t, lp).model_dump(),
                                              top_logprobs=[top(a, alp) for a, alp in alternatives.items()])
                                 for t, (lp, alternatives) in zip(token_ids, entries)])
