"""A request's prompt as token ids: a completion's text or ids (checked against the vocabulary), or chat
messages through the chat template. A server without a tokenizer takes token ids only."""
from __future__ import annotations

import hashlib
import json
import re

from jinja2 import TemplateError

from engine.prompt_files import check_template_variables
from server.errors import APIError
from server.protocol import ChatCompletionRequest, ChatMessage, SamplingRequest, TokenizeRequest
from server.tools import active_tools, call_arguments, calls_text, system_prompt

# Used when the tokenizer has none (e.g. a base model): one "<|role|>" header line per message.
FALLBACK_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


# Mistral's templates refuse call ids of another length than 9 (its own format), OpenAI's included
NINE_CHARACTER_IDS = re.compile(r"id\s*\|\s*length\s*!=\s*9")


def require_tokenizer(tokenizer, param: str) -> None:
    if tokenizer is None:
        raise APIError(400, "this server runs without a tokenizer (--skip-tokenizer-init): it takes prompts as "
                            "token ids only", param=param)


def unicode_text(text: str, param: str) -> str:
    """Text the tokenizer can take: a JSON string may escape half a surrogate pair, which is no character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param}: the text is not valid Unicode (it holds an unpaired surrogate)",
                       param=param) from None
    return text


def check_token_ids(tokenizer, token_ids: list[int], param: str) -> list[int]:
    """Ids the tokenizer knows; anything else is the client's error (a 400), never the engine's. Without a
    tokenizer, the engine checks them against the model's vocabulary."""
    vocab = len(tokenizer) if tokenizer is not None else None
    bad = next((t for t in token_ids if t < 0 or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of the vocabulary (ids are in [0, {vocab}))", param=param)
    return token_ids


def completion_prompt_ids(tokenizer, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
    if isinstance(prompt, str):
        require_tokenizer(tokenizer, "prompt")
        return tokenizer(unicode_text(prompt, "prompt"), add_special_tokens=add_special_tokens)["input_ids"]
    return check_token_ids(tokenizer, prompt, "prompt")


def prompt_text(tokenizer, prompt: str | list[int]) -> str:
    """The prompt as text (for echo); '' for token ids on a server without a tokenizer."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(prompt) if tokenizer is not None else ""


def chat_request_ids(tokenizer, req: ChatCompletionRequest, template_kwargs: dict) -> tuple[list[int], bool]:
    """A chat request's prompt, with server.tools' system prompt where its tools are in play, and whether they are
    (a tool_choice that names no tool is a 400)."""
    try:
        calls = bool(active_tools(req))
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice") from None
    try:
        tools_prompt = unicode_text(system_prompt(req), "tools") if calls else None
    except ValueError as e:  # a structured output the tools cannot go with
        raise APIError(400, str(e), param=(req.structured_output_fields or [None])[0]) from None
    return chat_prompt_ids(tokenizer, req, template_kwargs, tools_prompt=tools_prompt), calls


def chat_prompt_ids(tokenizer, req: ChatCompletionRequest | TokenizeRequest, template_kwargs: dict,
                    tools_prompt: str | None = None) -> list[int]:
    """A request's messages through the model's chat template, with `tools_prompt` (server.tools) ahead of the
    system message's text, or as one, and as vLLM takes them: the template's own variables
    (`chat_template_kwargs`, over the server's defaults `template_kwargs`), and the last assistant message
    continued rather than closed (`continue_final_message`). A template may refuse them (Llama 2's and Mistral's
    raise unless the roles alternate user / assistant): the client's error, a 400 with the template's message."""
    require_tokenizer(tokenizer, "messages")
    variables = {**template_kwargs, **(req.chat_template_kwargs or {})}
    try:
        check_template_variables(variables)
    except ValueError as e:
        raise APIError(400, str(e), param="chat_template_kwargs") from None
    if req.continue_final_message and (req.add_generation_prompt or req.messages[-1].role != "assistant"):
        raise APIError(400, "continue_final_message continues the last message, which must be the assistant's, "
                            "and needs add_generation_prompt: false", param="continue_final_message")
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    template = template if isinstance(template, str) else template.get("default", "")

    def render(turns: list[dict]) -> str:
        try:
            return tokenizer.apply_chat_template(
                turns, chat_template=None if tokenizer.chat_template else FALLBACK_CHAT_TEMPLATE, tokenize=False,
                add_generation_prompt=req.add_generation_prompt, continue_final_message=req.continue_final_message,
                **variables)
        # (ValueError: continue_final_message's text not found rendered; TypeError: a template's own arithmetic on
        # what a message holds)
        except (TemplateError, ValueError, TypeError) as e:
            raise APIError(400, f"the model's chat template refuses these messages: {e}", param="messages") from None

    text = render_messages(render, req.messages, tools_prompt, native_calls="tool_calls" in template,
                           nine_character_ids=bool(NINE_CHARACTER_IDS.search(template)))
    # (a template may write what no message held as text: a call's arguments decoded from their JSON)
    return tokenizer(unicode_text(text, "messages"), add_special_tokens=False)["input_ids"]


def render_messages(render, messages: list[ChatMessage], tools_prompt: str | None, native_calls: bool,
                    nine_character_ids: bool) -> str:
    """The messages through `render` (the chat template), `tools_prompt` ahead of the system message's text or as
    one. Where the template refuses or leaves out what a tool conversation holds, in forms any template takes:
    earlier calls as the template's own `tool_calls` (template_turn), or, where it refuses them so (DeepSeek-R1's
    joins a call's arguments as text; Llama 3's takes one call a message), as the JSON object server.tools asks
    for; tool results a template leaves out (Phi-3.5's knows no tool role) as user messages; and the tools
    prompt, where the template leaves the system message out (Mistral's write it only before a last user
    message), at the start of the last user message."""
    names = {c.id: c.function.name for m in messages for c in m.tool_calls or ()}
    native = native_calls and bool(names)

    def turns(results_as_user: bool = False, prompt_with_user: bool = False, prompt: bool = True) -> list[dict]:
        out = [template_turn(m, native, nine_character_ids) for m in messages]
        if results_as_user:
            out = [result_as_user(t, names.get(m.tool_call_id)) if m.role == "tool" else t
                   for m, t in zip(messages, out)]
        return with_tools_prompt(out, tools_prompt if prompt else None, prompt_with_user)

    try:
        text = render(turns())
    except APIError:
        if not native:
            raise
        native = False
        text = render(turns())
    results_as_user = (any(m.role == "tool" for m in messages)
                       and leaves_out(render, turns(), text, lambda t: t["role"] == "tool"))
    if results_as_user:
        text = render(turns(results_as_user))
    if tools_prompt is not None and tools_prompt not in text:
        text = render(turns(results_as_user, prompt_with_user=True))
    return text


def leaves_out(render, turns: list[dict], text: str, which) -> bool:
    """Does the template write the same text without the turns `which` picks (so leaving them out)?"""
    try:
        return render([t for t in turns if not which(t)]) == text
    except APIError:  # (it reads them: without them, the turns no longer fit it)
        return False


def result_as_user(turn: dict, name: str | None) -> dict:
    """A tool's result as a user message, for a template that knows no tool role (as llama.cpp writes them)."""
    return {"role": "user", "content": json.dumps({"tool_response": {"name": name, "content": turn["content"]}},
                                                  ensure_ascii=False)}


def with_tools_prompt(turns: list[dict], tools_prompt: str | None, with_last_user: bool) -> list[dict]:
    """The turns with the tools prompt ahead of the system message's text, or as one; `with_last_user`: ahead of
    the last user message's text instead."""
    if tools_prompt is None:
        return turns
    if with_last_user:
        last = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
        if last is not None:
            return [*turns[:last], {**turns[last], "content": f"{tools_prompt}\n\n{turns[last]['content']}"},
                    *turns[last + 1:]]
    if turns and turns[0]["role"] == "system":
        return [{**turns[0], "content": f"{tools_prompt}\n\n{turns[0]['content']}"}, *turns[1:]]
    return [{"role": "system", "content": tools_prompt}, *turns]


def template_turn(m: ChatMessage, native_calls: bool, nine_character_ids: bool) -> dict:
    """A message as the chat template reads it. An assistant's calls: as the template's own `tool_calls` where it
    reads them (transformers' form, arguments as an object, content None where the calls came alone: the
    template writes its model's own format, and a template that checks the turns' order, as Mistral's do, leaves
    messages of calls out of it); else the JSON object server.tools asks the model for, after any text that came
    with them. Ids of 9 letters and digits for a template that takes no others (Mistral's): an id that is not one
    becomes 9 hex digits of its hash, the same on both ends, so calls and results stay paired."""
    def call_id(text: str) -> str:
        unicode_text(text, "messages")
        if not nine_character_ids or re.fullmatch(r"[A-Za-z0-9]{9}", text):
            return text
        return hashlib.sha256(text.encode()).hexdigest()[:9]

    text = m.text
    if m.tool_calls and not native_calls:
        text = "\n".join(filter(None, [text, calls_text(m.tool_calls)]))
    turn = m.for_template(unicode_text(text, "messages"))
    if m.tool_calls and native_calls:
        turn["tool_calls"] = [{"id": call_id(c.id), "type": "function",
                               "function": {"name": c.function.name, "arguments": call_arguments(c.function.arguments)}}
                              for c in m.tool_calls]
        turn["content"] = turn["content"] or None
    if m.tool_call_id is not None:
        turn["tool_call_id"] = call_id(m.tool_call_id)
    return turn


def prediction_ids(tokenizer, req: SamplingRequest) -> list[int]:
    """A chat request's predicted output as token ids ([] without one)."""
    if not isinstance(req, ChatCompletionRequest) or req.prediction is None:
        return []
    require_tokenizer(tokenizer, "prediction")
    return tokenizer(unicode_text(req.prediction.text, "prediction"), add_special_tokens=False)["input_ids"]
