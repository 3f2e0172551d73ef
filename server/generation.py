"""What completions and chat share: queue a request's choices (n for each of its prompts; all or none), then
stream SSE chunks (usage last, if asked) or wait for the whole answer. The streams are closed either way, so a
client that goes away aborts its requests and frees their KV blocks."""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from engine import ContextLengthError, RequestOutput
from engine.structured import GrammarError
from server.async_engine import EngineError, EngineStopped, QueueFull, RequestStream
from server.errors import APIError, internal_error_message
from server.prompts import prediction_ids
from server.protocol import (
    ChatCompletionRequest,
    CompletionTokensDetails,
    ErrorResponse,
    PromptTokensDetails,
    SamplingRequest,
    Usage,
)
from server.responses import Renderer, step_info, timings
from server.sampling import sampling_params
from server.state import ServerState

logger = logging.getLogger("gorgon.server")

DISCONNECT_POLL_S = 0.25


async def generate(request: Request, state: ServerState, req: SamplingRequest, prompts: list[list[int]],
                   renderer: Renderer) -> Response:
    """Answer `prompts` (token ids; a chat has one): choice i is choice i % n of prompt i // n."""
    prediction = prediction_ids(state.tokenizer, req)
    if len(prediction) > state.llm.max_model_len:  # (no answer could repeat it)
        raise APIError(400, f"the prediction has {len(prediction)} tokens, more than this model's context "
                            f"({state.llm.max_model_len})", param="prediction")
    streams = await start(state, req, prompts, prediction)
    if not req.stream:
        finals = await finished(request, streams)
        return JSONResponse(renderer.response(finals, usage(prompts, finals, prediction)).model_dump())

    options = req.stream_options
    continuous_usage = options is not None and options.include_usage and options.continuous_usage_stats  # (as vLLM)

    async def events() -> AsyncIterator[str]:
        first_step_tokens: dict[int, int] = {}  # per choice: the tokens its first step made (for its timings)
        try:
            for chunk in renderer.head(len(streams), prompts):
                yield f"data: {chunk.model_dump_json()}\n\n"
            async for i, out in interleave(streams):  # one chunk per step, even when its text is still ''
                chunk = renderer.chunk(i, checked(out))
                if out.new_token_ids:
                    first_step_tokens.setdefault(i, len(out.new_token_ids))
                chunk.gorgon = step_info(out, state.tokenizer)  # ours: the step behind the chunk
                if out.finished and i in first_step_tokens:
                    chunk.gorgon.timings = timings(out, first_step_tokens[i])
                if continuous_usage:  # its choice's, so far
                    chunk.usage = usage([prompts[i // req.n]], [out])
                yield f"data: {chunk.model_dump_json()}\n\n"
            if req.stream_options and req.stream_options.include_usage:
                final = renderer.usage_chunk(usage(prompts, [s.last for s in streams], prediction))
                yield f"data: {final.model_dump_json()}\n\n"
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in-band, as OpenAI does
            logger.warning("stream failed: %s", e)
            yield f"data: {ErrorResponse(error=failure(e).info).model_dump_json()}\n\n"
        finally:
            close_all(streams)
        yield "data: [DONE]\n\n"

    # the background task covers a client gone before the body iterator ever started
    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(close_all, streams))


async def start(state: ServerState, req: SamplingRequest, prompts: list[list[int]],
                prediction: list[int] | None = None) -> list[RequestStream]:
    """Queue n choices of each prompt (each drafting from the predicted output's token ids, if any); all are taken
    or none is."""
    adapter = state.resolve_adapter(req.model)
    context = state.context_length(adapter)
    vocab_size = len(state.tokenizer) if state.tokenizer is not None else None  # None: the engine checks ids
    # a chat answer's structured output (or tools) comes after its reasoning, under --reasoning-parser
    reasoning = state.reasoning.tags if state.reasoning and isinstance(req, ChatCompletionRequest) else None
    choices = [(ids, sampling_params(req, len(ids), context, vocab_size, state.llm.sampling_defaults, choice=i,
                                     prediction=prediction, reasoning=reasoning))
               for ids in prompts for i in range(req.n)]
    try:
        if choices[0][1].structured is not None:  # compiled here, not on the step thread (seconds, for a large one)
            await asyncio.to_thread(state.llm.grammars.matcher, choices[0][1].structured)
        return await state.engine.add_requests(choices, adapter, req.model or state.config.model_name)
    except QueueFull as e:
        raise APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    except EngineStopped as e:
        raise failure(e) from None
    except ContextLengthError as e:  # the adapter changed meanwhile
        raise APIError(400, str(e), code="context_length_exceeded") from None
    except GrammarError as e:
        raise APIError(400, str(e), param=(req.structured_output_fields or ["tools"])[0]) from None
    except ValueError as e:
        raise APIError(400, str(e)) from None


async def finished(request: Request, streams: list[RequestStream]) -> list[RequestOutput]:
    """Every stream's finished output, the streams closed either way; the engine's failures as API errors."""
    try:
        return [checked(out) for out in await until_done(request, streams)]
    except (EngineError, EngineStopped) as e:
        raise failure(e) from None
    finally:
        close_all(streams)


def checked(out: RequestOutput) -> RequestOutput:
    """out, unless its request ended in failure (finish_reason "error": its structured output's grammar failed
    mid-answer, past llguidance's limits), which the client caused: a 400, never a "stop" with a cut answer."""
    if out.finish_reason == "error":
        raise APIError(400, out.error or "the request failed", code="structured_output_failed")
    return out


def failure(e: Exception) -> APIError:
    """A request's failure after it was taken, as the API's error: its own (checked), an engine shutting down or
    down a 503 (a client may retry elsewhere), the engine's failure on it a 500 that says so, anything else a 500
    that names only its kind."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineStopped):
        return APIError(503, str(e), "service_unavailable")
    return APIError(500, str(e) if isinstance(e, EngineError) else internal_error_message(e), "internal_error")


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


def usage(prompts: list[list[int]], finals: list[RequestOutput], prediction: list[int] | None = None) -> Usage:
    """Each prompt counts once, however many choices it has (as OpenAI counts), and so do the tokens of it the
    prefix cache held (its first choice's: the later ones find what the first wrote). With a prediction, as OpenAI
    words it, its tokens that appear in each answer are accepted (counted as often as both hold them, order aside:
    an in-order count, difflib's, is quadratic, seconds a choice on the event loop at a few thousand tokens), the
    rest rejected."""
    prompt = sum(map(len, prompts))
    choices = len(finals) // len(prompts)
    cached = sum(out.num_cached_tokens for out in finals[::choices])
    completion = sum(len(out.token_ids) for out in finals)
    details = None
    if prediction:
        predicted = Counter(prediction)
        accepted = sum((predicted & Counter(out.token_ids)).total() for out in finals)
        details = CompletionTokensDetails(accepted_prediction_tokens=accepted,
                                          rejected_prediction_tokens=len(prediction) * len(finals) - accepted)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached), completion_tokens_details=details)
