"""AsyncEngine: one thread drives `LLM.step()`; each request's outputs reach the event loop through a
queue of its own."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from engine import RequestOutput, SamplingParams
from server.metrics import RequestTracker, ServerMetrics

logger = logging.getLogger("gorgon.server")
T = TypeVar("T")


# steps that fail one after the other on this many distinct prompts, with no prompt in every one of their batches:
# the engine is broken (a sticky CUDA error, say), and is down (/health says so), rather than failing every request
# it takes. (One request that fails a step however often a client retries it, as the openai SDK retries a 500
# twice, does not put the engine down; nor does one failed step of a large batch.)
MAX_FAILED_PROMPTS = 3


class EngineError(RuntimeError):
    """The engine failed while decoding this request (other requests are unaffected)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down, or is down (a tensor-parallel worker died), and takes no requests."""


class QueueFull(RuntimeError):
    """As many requests wait for admission as the server allows; the client may retry later."""


class RequestStream:
    """One accepted request's outputs, in order, up to the finished one. Whoever holds it calls `close()`
    when done with it: that aborts the request if it has not ended (and frees its KV blocks)."""

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        self.engine, self.request_id = engine, request_id
        self.queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self.tracker: RequestTracker | None = None
        self.last: RequestOutput | None = None
        self.ended = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.ended:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, Exception):
            self._end("error")
            raise item
        self.last = item
        if self.tracker:
            self.tracker.on_output(item)
        if item.finished:
            self._end(item.finish_reason)
        return item

    def close(self) -> None:
        if not self.ended:
            self._end("abort")
            self.engine._post(partial(self.engine._abort, self.request_id))

    def _end(self, reason: str) -> None:
        self.ended = True
        self.engine._streams.pop(self.request_id, None)
        if self.tracker:
            self.tracker.finish(self.last, reason)


def in_passing_thread(fn: Callable[..., T], *args) -> T:
    """fn(*args) on a thread that ends when it returns. OpenMP (torch's CPU threads) keeps a pool of
    workers for every thread that ever ran a parallel region, and libgomp all but stops spinning once it
    manages more threads than there are CPUs: each parallel region of the step thread then waits for its
    workers to wake, which made single-stream decode 3.5x slower in the server than in `LLM.generate`
    (SmolLM2 Q4_1, 2 cores). So the step thread is the one lasting thread to run torch's parallel work: the
    model, and adapters, load on passing threads."""
    thread = ThreadPoolExecutor(max_workers=1)
    try:
        result = thread.submit(fn, *args).result()
    except BaseException:  # (not waiting for it: Ctrl-C during a load ends the wait at once)
        thread.shutdown(wait=False)
        raise
    thread.shutdown(wait=True)  # the thread has ended when this returns
    return result


class AsyncEngine:
    """Invariant: only the step thread touches the engine's request state (add_request, step, abort), and
    every request it accepted ends with exactly one final item on its queue: a finished RequestOutput or
    an exception. Adapter loads run in passing threads (in_passing_thread); the engine publishes them
    between steps."""

    def __init__(self, llm, metrics: ServerMetrics | None = None, max_waiting_requests: int | None = None) -> None:
        self.llm = llm
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
        self._adding = 0  # event loop only: requests posted to the step thread, not yet in the engine's queue
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._active: set[str] = set()  # step thread only: requests the engine holds
        self._streams: dict[str, RequestStream] = {}  # event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._exit = False
        self._down: str | None = None  # set by the step thread: why the engine failed for good

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the step thread, which takes the engine's steps until stop() (LLM.claim_steps: RuntimeError while
        a generate() of the same LLM runs)."""
        self._loop = asyncio.get_running_loop()
        self.llm.claim_steps()
        self._thread = threading.Thread(target=self._run, name="gorgon-step-loop", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and not self._stopping
                and self.failure is None)

    @property
    def failure(self) -> str | None:
        """Why the engine cannot serve any more (LLM.failure, or steps failing one after the other), or None."""
        return self.llm.failure or self._down

    async def stop(self) -> None:
        """Refuse new requests, fail the ones still in flight, and end the step thread."""
        self._stopping = True
        if self._thread is None:
            return
        self.end_requests("the server is shutting down")
        self._post(partial(setattr, self, "_exit", True))
        await asyncio.to_thread(self._thread.join)

    def end_requests(self, why: str) -> None:
        """End every request the engine holds with EngineStopped(why) (the engine goes on)."""
        self._post(partial(self._fail, None, EngineStopped(why)))

    # ---- requests (event loop side) ----------------------------------------------------------------
    async def add_request(self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None,
                          model_name: str = "") -> RequestStream:
        """Queue one request: add_requests of one."""
        return (await self.add_requests([(prompt, params)], adapter, model_name))[0]

    async def add_requests(self, requests: list[tuple[str | list[int], SamplingParams]], adapter: str | None = None,
                           model_name: str = "") -> list[RequestStream]:
        """Queue requests (a request's n choices) and wait until the engine has taken them: all, or none. Raises
        ValueError if the engine rejects one, or if they could never wait together within the queue's limit;
        QueueFull if the waiting queue has no room for them now."""
        if not self.is_running:
            failure = self.failure
            raise EngineStopped(f"the engine is down: {failure}" if failure else "the server is shutting down")
        self._check_room(len(requests))
        self._adding += len(requests)  # (all at once: a request checked while these are added counts them all)
        arrival_time = time.perf_counter()  # (their waits for the step thread count in their latency)
        streams: list[RequestStream] = []
        try:
            for prompt, params in requests:
                streams.append(await self._add_one(prompt, params, adapter, arrival_time))
                self._adding -= 1
        except BaseException:
            self._adding -= len(requests) - len(streams)
            for stream in streams:
                stream.close()
            raise
        if self.metrics:  # (only now: the requests of a refused batch were never the server's to count)
            for stream in streams:
                stream.tracker = self.metrics.request_tracker(model_name)
        return streams

    def _check_room(self, count: int) -> None:
        if self.max_waiting_requests is None:
            return
        max_num_seqs = self.llm.config.max_num_seqs
        if count > max_num_seqs + self.max_waiting_requests:
            raise ValueError(f"{count} choices could never run or wait together here: this server runs "
                             f"{max_num_seqs} requests at once and queues {self.max_waiting_requests} more")
        stats = self.llm.stats()
        # every request passes through the waiting queue: those the running batch has no room for are queued.
        # Where requests already wait, the batch has none (no slot, or no KV blocks: the scheduler took what fit)
        free = max_num_seqs - stats.num_running if stats.num_waiting == 0 else 0
        queued = stats.num_waiting + self._adding - free  # (negative: room in the batch)
        if queued + count > self.max_waiting_requests:
            raise QueueFull(f"{max(queued, 0)} requests are waiting for room in the running batch, and this server "
                            f"queues at most {self.max_waiting_requests}; retry later")

    async def _add_one(self, prompt: str | list[int], params: SamplingParams, adapter: str | None,
                       arrival_time: float) -> RequestStream:
        stream = RequestStream(self, f"req-{uuid.uuid4().hex}")
        self._streams[stream.request_id] = stream
        accepted = self._loop.create_future()
        self._post(partial(self._add, stream.request_id, prompt, params, adapter, arrival_time, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            stream.close()  # the add may still happen: the abort queued behind it undoes it
            raise
        except Exception:
            stream.ended = True
            self._streams.pop(stream.request_id, None)
            raise
        return stream

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.to_thread(in_passing_thread, self.llm.load_adapter, name, path)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(in_passing_thread, self.llm.unload_adapter, name)

    def list_adapters(self) -> list[dict]:
        return self.llm.list_adapters()

    def _post(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, items: list[tuple[str, RequestOutput | Exception]]) -> None:
        """Event loop side of delivery; items of a request that is gone (aborted) are dropped."""
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(item)

    # ---- the step thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self.llm.release_steps()

    def _serve(self) -> None:
        failed_prompts: set[int] = set()  # of the steps failed in a row
        common_prompts: set[int] | None = None  # those in every one of their batches (None: no step failed)
        while not self._exit:
            while not self._commands.empty():
                try:
                    self._commands.get()()
                except Exception:  # noqa: BLE001 - the loop must outlive any one command
                    logger.exception("an engine command failed")
            if self._exit:
                break
            if self._down is not None:  # every request, running or just added, fails at once
                self._fail(None, EngineStopped(f"the engine is down: {self._down}"))
            if self._down is not None or not self.llm.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.llm.step()
                failed_prompts, common_prompts = set(), None
            except Exception as e:  # noqa: BLE001 - the loop must outlive any one batch
                # the batch's requests, and those it finished before it failed (their last output is lost)
                batch = set(self.llm.stats().running_request_ids) | {r for r in self._active
                                                                     if r not in self.llm.requests}
                prompts = {hash(tuple(seq.prompt_token_ids)) for r in batch
                           if (seq := self.llm.requests.get(r)) is not None}
                failed_prompts |= prompts
                common_prompts = prompts if common_prompts is None else common_prompts & prompts
                if self.llm.failure is not None or (len(failed_prompts) >= MAX_FAILED_PROMPTS
                                                    and not common_prompts):  # for good
                    self._down = self.llm.failure or (f"steps failed one after another on {len(failed_prompts)} "
                                                      f"prompts, the last with: {e}")
                    logger.exception("the engine is down: %s", self._down)
                    continue
                logger.exception("engine step failed; failing the requests of its batch")
                self._fail(list(batch) or None, EngineError(f"the engine failed while decoding this request: {e}"))
                continue
            for out in outputs:
                if out.finished:
                    self._active.discard(out.request_id)
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, [(o.request_id, o) for o in outputs])

    def _add(self, request_id: str, prompt: str | list[int], params: SamplingParams, adapter: str | None,
             arrival_time: float, accepted: asyncio.Future) -> None:
        try:
            self.llm.add_request(prompt, params, request_id=request_id, adapter=adapter, arrival_time=arrival_time)
        except Exception as e:  # noqa: BLE001 - handed to the request's own coroutine
            self._loop.call_soon_threadsafe(_resolve, accepted, e)
            return
        self._active.add(request_id)
        self._loop.call_soon_threadsafe(_resolve, accepted, None)

    def _abort(self, request_id: str) -> None:
        if request_id in self._active:
            self._active.discard(request_id)
            self.llm.abort(request_id)

    def _fail(self, request_ids: list[str] | None, error: Exception) -> None:
        """Abort these requests (None: all the engine holds) and hand each the error."""
        failed = list(self._active) if request_ids is None else [r for r in request_ids if r in self._active]
        for request_id in failed:
            self._active.discard(request_id)
            try:
                self.llm.abort(request_id)
            except Exception:  # noqa: BLE001 - keep failing the others
                logger.exception("aborting %s failed", request_id)
        if failed:
            self._loop.call_soon_threadsafe(self._deliver, [(r, error) for r in failed])


def _resolve(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():  # its request was cancelled while waiting to be added
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
