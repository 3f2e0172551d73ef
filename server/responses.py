"""OpenAI response bodies from engine outputs, for completions and chat: whole answers, SSE chunks, logprobs."""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from pydantic import BaseModel

from engine import RequestOutput
from engine.detokenizer import token_text
from server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    StepInfo,
    Timings,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
    random_id,
)
from server.reasoning import ReasoningFormat, ReasoningStream
from server.tools import read_answer, response_text


class Renderer(ABC):
    """One endpoint's bodies for one request of n choices. `token_ids`: the bodies carry token ids too (asked
    for with return_token_ids, or always when the server has no tokenizer, since the text is then empty)."""

    def __init__(self, prefix: str, model: str, tokenizer, logprobs: int | None, token_ids: bool) -> None:
        self.id, self.model, self.tokenizer = random_id(prefix), model, tokenizer
        self.created = int(time.time())  # one for every body of the answer
        self.logprobs, self.token_ids = logprobs, token_ids

    @abstractmethod
    def head(self, n: int, prompts: list[list[int]]) -> list[BaseModel]:
        """Chunks streamed before any output, for n choices in all."""

    @abstractmethod
    def chunk(self, index: int, out: RequestOutput) -> BaseModel:
        """What choice `index` added in one step."""

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> BaseModel:
        """The last chunk of a stream whose client asked for usage."""

    @abstractmethod
    def response(self, finals: list[RequestOutput], usage: Usage) -> BaseModel:
        """The whole answer."""

    def token_text(self, token_id: int) -> str:
        return token_text(self.tokenizer, token_id) if self.tokenizer is not None else f"token_id:{token_id}"

    def ids(self, token_ids: list[int]) -> list[int] | None:
        return token_ids if self.token_ids else None


class CompletionRenderer(Renderer):
    """Choice i answers prompt i // n (a batch of prompts, n choices each)."""

    def __init__(self, model: str, tokenizer, logprobs: int | None, token_ids: bool, n: int,
                 echo: list[str] | None = None) -> None:
        super().__init__("cmpl-", model, tokenizer, logprobs, token_ids)
        self.n = n
        self.echo = echo  # each prompt's text, which starts its choices' text (None: no echo)
        # per choice streamed: the next token's text_offset (the length of the tokens before it, as `tokens`
        # spells them, so that streamed and whole answers agree)
        self.offset: dict[int, int] = {}

    def head(self, n: int, prompts: list[list[int]]) -> list[BaseModel]:
        return []  # an echo comes with each choice's first output, which brings the prompt's logprobs

    def chunk(self, index: int, out: RequestOutput) -> BaseModel:
        first = index not in self.offset
        echo = self._echo(index) if first else ""
        offset = self.offset.get(index, 0)
        logprobs = self._logprobs(out, out.new_token_ids, offset, bool(echo))
        self.offset[index] = offset + (sum(map(len, logprobs.tokens)) if logprobs else 0)
        return self._body([self._choice(index, out, echo + out.new_text, out.new_token_ids, logprobs, first)])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._body([], usage)

    def response(self, finals: list[RequestOutput], usage: Usage) -> BaseModel:
        return self._body([self._choice(i, out, self._echo(i) + out.text, out.token_ids,
                                        self._logprobs(out, out.token_ids, 0, bool(self._echo(i))), True)
                           for i, out in enumerate(finals)], usage)

    def _echo(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo else ""

    def _choice(self, index: int, out: RequestOutput, text: str, token_ids: list[int],
                logprobs: CompletionLogprobs | None, with_prompt_ids: bool) -> CompletionChoice:
        return CompletionChoice(index=index, text=text, finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                                logprobs=logprobs,
                                token_ids=self.ids(token_ids),
                                prompt_token_ids=self.ids(out.prompt_token_ids) if with_prompt_ids else None)

    def _body(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _logprobs(self, out: RequestOutput, token_ids: list[int], text_offset: int,
                  with_prompt: bool) -> CompletionLogprobs | None:
        """Logprobs of `token_ids`, the last of `out`'s tokens, preceded by the prompt's if `with_prompt`."""
        if self.logprobs is None:
            return None
        entries = out.logprobs[len(out.logprobs) - len(token_ids):]
        if with_prompt:
            token_ids, entries = out.prompt_token_ids + token_ids, out.prompt_logprobs + entries
        tokens = [self.token_text(t) for t in token_ids]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=[None if e is None else finite(e[0]) for e in entries], text_offset=offsets,
            top_logprobs=[None if e is None else {self.token_text(t): finite(v) for t, v in e[1].items()}
                          for e in entries])


class ChatRenderer(Renderer):
    """`tools`: the answers are server.tools' JSON objects, read into content or tool calls (a stream sends a
    response's text as it grows, calls in its last chunk)."""

    def __init__(self, model: str, tokenizer, logprobs: int | None, token_ids: bool, tools: bool = False,
                 reasoning: ReasoningFormat | None = None, token_bytes: Callable[[int], bytes] | None = None,
                 json_value: bool = False) -> None:
        super().__init__("chatcmpl-", model, tokenizer, logprobs, token_ids)
        self.tools, self.reasoning = tools, reasoning
        self.json_value = json_value  # with tools, a text answer is a JSON value (server.tools.json_answer)
        self.token_bytes = token_bytes  # a token's own bytes (engine.structured.Grammars.token_bytes)
        self.response_sent: dict[int, int] = {}  # tools: per streamed choice, the characters of its text sent
        self.reasoning_streams: dict[int, ReasoningStream] = {}  # reasoning: per streamed choice, its parts

    def head(self, n: int, prompts: list[list[int]]) -> list[BaseModel]:
        (prompt_ids,) = prompts  # a chat is one prompt
        return [self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))],
                            prompt_ids=self.ids(prompt_ids)) for i in range(n)]

    def chunk(self, index: int, out: RequestOutput) -> BaseModel:
        reasoning, content, text = None, out.new_text, out.text
        if self.reasoning is not None:
            stream = self.reasoning_streams.setdefault(index, ReasoningStream(self.reasoning))
            reasoning, content = stream.delta(out.text, out.finished)
            text = stream.content
        delta, finish_reason = ChatDelta(content=content, reasoning_content=reasoning), out.finish_reason
        if self.tools:
            delta, finish_reason = self._tools_delta(index, out, text)
            delta.reasoning_content = reasoning
        return self._chunk([ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                                            stop_reason=out.stop_reason,
                                            token_ids=self.ids(out.new_token_ids),
                                            logprobs=self._logprobs(out, out.new_token_ids))])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def response(self, finals: list[RequestOutput], usage: Usage) -> BaseModel:
        choices = [ChatChoice(index=i, message=message, finish_reason=finish_reason, stop_reason=out.stop_reason,
                              logprobs=self._logprobs(out, out.token_ids), token_ids=self.ids(out.token_ids))
                   for i, out in enumerate(finals) for message, finish_reason in [self._message(out)]]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage,
                                      prompt_token_ids=self.ids(finals[0].prompt_token_ids))

    def _tools_delta(self, index: int, out: RequestOutput, answer: str) -> tuple[ChatDelta, str | None]:
        """What a streamed answer of server.tools' format (`answer`: its text so far, past any reasoning) adds: its
        response text as it grows, its calls whole."""
        sent = self.response_sent.get(index, 0)
        if not out.finished:  # (a JSON value comes whole, with the calls)
            text = "" if self.json_value else response_text(answer) or ""
            self.response_sent[index] = max(sent, len(text))
            return ChatDelta(content=text[sent:] or None), None
        message, finish_reason = self._message(out)
        calls = [ToolCallDelta(index=k, **call.model_dump()) for k, call in enumerate(message.tool_calls)]
        content = None if message.content is None else message.content[sent:]
        return ChatDelta(content=content, tool_calls=calls or None), finish_reason

    def _message(self, out: RequestOutput) -> tuple[ChatResponseMessage, str | None]:
        """A finished answer's message and finish_reason ("tool_calls" where it calls tools)."""
        reasoning, text = self.reasoning.split(out.text, finished=True) if self.reasoning else (None, out.text)
        reasoning = reasoning or None
        if not self.tools:
            return ChatResponseMessage(content=text if text or not reasoning else None,
                                       reasoning_content=reasoning), out.finish_reason
        content, calls = read_answer(text, self.json_value)
        return (ChatResponseMessage(content=content, reasoning_content=reasoning, tool_calls=calls),
                "tool_calls" if calls else out.finish_reason)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None,
               prompt_ids: list[int] | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage,
                                   prompt_token_ids=prompt_ids)

    def _logprobs(self, out: RequestOutput, token_ids: list[int]) -> ChatLogprobs | None:
        if self.logprobs is None:
            return None
        entries = out.logprobs[len(out.logprobs) - len(token_ids):]

        def top(t: int, lp: float) -> TopLogprob:
            token = self.token_text(t)
            # a token that holds part of a character reads as U+FFFD: its bytes are its own (they join into the text)
            raw = self.token_bytes(t) if "\ufffd" in token and self.token_bytes is not None else token.encode()
            return TopLogprob(token=token, logprob=finite(lp), bytes=list(raw))

        return ChatLogprobs(content=[TokenLogprob(**top(t, lp).model_dump(),
                                                  top_logprobs=[top(a, alp) for a, alp in alternatives.items()])
                                     for t, (lp, alternatives) in zip(token_ids, entries)])


def finite(logprob: float) -> float:
    """A logprob as JSON carries it: -inf (a token the model's logits rule out) and NaN as OpenAI's -9999.0, its
    "very unlikely" (JSON has no -inf: the body failed to render)."""
    return logprob if math.isfinite(logprob) else -9999.0


def step_info(out: RequestOutput, tokenizer) -> StepInfo:
    """Ours, on streamed chunks: the step behind a chunk, its tokens and their text (see StepInfo)."""
    tokens = None if tokenizer is None else [token_text(tokenizer, t) for t in out.new_token_ids]
    return StepInfo(step_tokens=len(out.new_token_ids), tokens=tokens)


def timings(out: RequestOutput, first_step_tokens: int) -> Timings:
    """A finished answer's speed (see Timings), from the engine's clock: the first step's tokens made
    `first_step_tokens` of its tokens at `ttft_s`, the last one at `latency_s`."""
    decode_s = out.latency_s - out.ttft_s
    decoded = len(out.token_ids) - first_step_tokens
    return Timings(prompt_ms=1000 * out.ttft_s, predicted_n=decoded, predicted_ms=1000 * decode_s,
                   predicted_per_second=decoded / decode_s if decoded and decode_s > 0 else None)
