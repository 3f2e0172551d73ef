"""OpenAI response bodies from engine outputs, for completions and chat: whole answers, SSE chunks, logprobs."""
from __future__ import annotations

from abc import ABC, abstractmethod

from pydantic import BaseModel

from engine import RequestOutput
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
    TokenLogprob,
    TopLogprob,
    Usage,
    random_id,
)


class Renderer(ABC):
    """One endpoint's bodies for one request of n choices."""

    @abstractmethod
    def head(self, n: int) -> list[BaseModel]:
        """Chunks streamed before any output."""

    @abstractmethod
    def chunk(self, index: int, out: RequestOutput) -> BaseModel:
        """What choice `index` added in one step."""

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> BaseModel:
        """The last chunk of a stream whose client asked for usage."""

    @abstractmethod
    def response(self, finals: list[RequestOutput], usage: Usage) -> BaseModel:
        """The whole answer."""


class CompletionRenderer(Renderer):
    def __init__(self, model: str, tokenizer, logprobs: int | None, echo: str = "") -> None:
        self.id, self.model, self.tokenizer = random_id("cmpl"), model, tokenizer
        self.logprobs, self.echo = logprobs, echo  # echo: the prompt's text, which starts every choice's text
        # per choice streamed: the next token's text_offset (the length of the tokens before it, as `tokens`
        # spells them, so that streamed and whole answers agree)
        self.offset: dict[int, int] = {}

    def head(self, n: int) -> list[BaseModel]:
        return []  # an echo comes with each choice's first output, which brings the prompt's logprobs

    def chunk(self, index: int, out: RequestOutput) -> BaseModel:
        echo = "" if index in self.offset else self.echo
        offset = self.offset.get(index, 0)
        logprobs = self._logprobs(out, out.new_token_ids, offset, bool(echo))
        self.offset[index] = offset + (sum(map(len, logprobs.tokens)) if logprobs else 0)
        return self._body([CompletionChoice(index=index, text=echo + out.new_text, finish_reason=out.finish_reason,
                                            logprobs=logprobs)])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._body([], usage)

    def response(self, finals: list[RequestOutput], usage: Usage) -> BaseModel:
        return self._body([CompletionChoice(index=i, text=self.echo + out.text, finish_reason=out.finish_reason,
                                            logprobs=self._logprobs(out, out.token_ids, 0, bool(self.echo)))
                           for i, out in enumerate(finals)], usage)

    def _body(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, model=self.model, choices=choices, usage=usage)

    def _logprobs(self, out: RequestOutput, token_ids: list[int], text_offset: int,
                  with_prompt: bool) -> CompletionLogprobs | None:
        """Logprobs of `token_ids`, the last of `out`'s tokens, preceded by the prompt's if `with_prompt`."""
        if self.logprobs is None:
            return None
        entries = out.logprobs[len(out.logprobs) - len(token_ids):]
        if with_prompt:
            token_ids, entries = out.prompt_token_ids + token_ids, out.prompt_logprobs + entries
        tokens = [self.tokenizer.decode([t]) for t in token_ids]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=[None if e is None else e[0] for e in entries], text_offset=offsets,
            top_logprobs=[None if e is None else {self.tokenizer.decode([t]): v for t, v in e[1].items()}
                          for e in entries])


class ChatRenderer(Renderer):
    def __init__(self, model: str, tokenizer, logprobs: int | None) -> None:
        self.id, self.model, self.tokenizer, self.logprobs = random_id("chatcmpl"), model, tokenizer, logprobs

    def head(self, n: int) -> list[BaseModel]:
        return [self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
                for i in range(n)]

    def chunk(self, index: int, out: RequestOutput) -> BaseModel:
        return self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=out.new_text),
                                            finish_reason=out.finish_reason,
                                            logprobs=self._logprobs(out, out.new_token_ids))])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def response(self, finals: list[RequestOutput], usage: Usage) -> BaseModel:
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content=out.text), finish_reason=out.finish_reason,
                              logprobs=self._logprobs(out, out.token_ids)) for i, out in enumerate(finals)]
        return ChatCompletionResponse(id=self.id, model=self.model, choices=choices, usage=usage)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, model=self.model, choices=choices, usage=usage)

    def _logprobs(self, out: RequestOutput, token_ids: list[int]) -> ChatLogprobs | None:
        if self.logprobs is None:
            return None
        entries = out.logprobs[len(out.logprobs) - len(token_ids):]

        def top(t: int, lp: float) -> TopLogprob:
            token = self.tokenizer.decode([t])
            return TopLogprob(token=token, logprob=lp, bytes=list(token.encode()))

        return ChatLogprobs(content=[TokenLogprob(**top(t, lp).model_dump(),
                                                  top_logprobs=[top(a, alp) for a, alp in alternatives.items()])
                                     for t, (lp, alternatives) in zip(token_ids, entries)])
