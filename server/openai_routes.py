"""OpenAI's routes (completions, chat, models) and vLLM's /tokenize and /detokenize."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.errors import ERROR_RESPONSES, APIError
from server.generation import generate
from server.guards import require_api_key
from server.prompts import (
    chat_prompt_ids,
    chat_request_ids,
    check_token_ids,
    completion_prompt_ids,
    prompt_text,
    require_tokenizer,
)
from server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from server.responses import ChatRenderer, CompletionRenderer
from server.state import ServerState, State
from server.tools import json_answer

router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


def streamed_as(chunk: type) -> dict:
    """/openapi.json: with `stream: true`, the answer is server-sent events, each `data: <chunk>`, then
    `data: [DONE]`."""
    return {200: {"content": {"text/event-stream": {"schema": {"$ref": f"#/components/schemas/{chunk.__name__}"}}},
                  "description": "the answer; with `stream: true`, SSE events `data: <chunk>`, then `data: [DONE]`"}}


def returns_token_ids(req: SamplingRequest, state: ServerState) -> bool:
    return req.return_token_ids or state.tokenizer is None  # without a tokenizer, the ids are the answer


# each OpenAI route also without its /v1 (as llama.cpp's server serves them: clients given the bare host as base URL)
@router.post("/v1/completions", response_model=CompletionResponse, responses=streamed_as(CompletionResponse))
@router.post("/completions", include_in_schema=False)
async def completions(req: CompletionRequest, request: Request, state: State) -> Response:
    prompts = [completion_prompt_ids(state.tokenizer, p) for p in req.prompts]
    echo = [prompt_text(state.tokenizer, p) for p in req.prompts] if req.echo else None
    renderer = CompletionRenderer(req.model or state.config.model_name, state.tokenizer, req.logprobs,
                                  returns_token_ids(req, state), req.n, echo)
    return await generate(request, state, req, prompts, renderer)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=streamed_as(ChatCompletionChunk))
@router.post("/chat/completions", include_in_schema=False)
async def chat_completions(req: ChatCompletionRequest, request: Request, state: State) -> Response:
    prompt_ids, calls = chat_request_ids(state.tokenizer, req, state.llm.config.chat_template_kwargs)
    renderer = ChatRenderer(req.model or state.config.model_name, state.tokenizer, req.top_alternatives,
                            returns_token_ids(req, state), calls, state.reasoning, state.llm.grammars.token_bytes,
                            json_answer(req))
    return await generate(request, state, req, [prompt_ids], renderer)


def model_cards(state: ServerState) -> list[ModelCard]:
    base, speculative = state.config.model_name, state.speculates  # adapters speculate with the base model's heads
    cards = [ModelCard(id=base, created=state.created, root=state.config.model_root,
                       max_model_len=state.context_length(None), speculative=speculative)]
    return cards + [ModelCard(id=a["name"], created=state.created, root=a["path"], parent=base,
                              max_model_len=state.context_length(a["name"]),
                              speculative=speculative) for a in state.engine.list_adapters()]


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def models(state: State) -> ModelList:
    return ModelList(data=model_cards(state))


@router.get("/v1/models/{model:path}")  # `path`: a served name may hold a slash ("org/name")
@router.get("/models/{model:path}", include_in_schema=False)
async def model(model: str, state: State) -> ModelCard:
    state.resolve_adapter(model)  # 404 unless it is served
    return next(card for card in model_cards(state) if card.id == model)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, state: State) -> TokenizeResponse:
    adapter = state.resolve_adapter(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either `prompt` or `messages`", param="prompt")
    if req.messages is not None:
        tokens = chat_prompt_ids(state.tokenizer, req, state.llm.config.chat_template_kwargs)
    else:
        tokens = completion_prompt_ids(state.tokenizer, req.prompt, req.add_special_tokens)
    token_strs = state.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=state.context_length(adapter), tokens=tokens,
                            token_strs=token_strs)


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, state: State) -> DetokenizeResponse:
    state.resolve_adapter(req.model)
    require_tokenizer(state.tokenizer, "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(check_token_ids(state.tokenizer, req.tokens, "tokens")))
