"""Tools (function calling) for any model, the way llama.cpp's server calls tools through models whose chat template
has no tool syntax of its own: a system message describes the functions, and the answer is constrained (the
engine's structured outputs) to one JSON object, {"tool_calls": [{"name": ..., "arguments": {...}}, ...]} to call
functions, or {"response": "..."} to answer in text (with a JSON structured output too, {"response": <a value of
its schema>}, given back as that value's JSON text). tool_choice "required" or a named function leaves the calls
only; several calls only with parallel_tool_calls true (as llama.cpp's server: one call by default). The answer
is read back into OpenAI's `tool_calls` (finish_reason "tool_calls") or `content` (a stream sends the response's
text as it grows, calls once whole). One format for every model: a model trained on a syntax of its own (Qwen's
<tool_call>, Llama 3's) still calls validly, though not in the words it was trained on.

Earlier turns (server.prompts.render_messages): an assistant's tool calls reach a template that reads `tool_calls`
as transformers passes them, others as the JSON object the model would have written; tool results are messages of
role "tool", or user messages for a template that leaves those out."""
from __future__ import annotations

import json
import re
import uuid

from engine import StructuredOutput
from engine.structured import closed
from server.protocol import ChatCompletionRequest, FunctionCall, ToolCall, ToolDefinition

DATA_KEYWORDS = ("const", "enum", "default", "examples")  # whose values are data, not schemas


def active_tools(req: ChatCompletionRequest) -> list[ToolDefinition]:
    """The tools the answer may call: none with tool_choice "none" or without tools; a named one alone."""
    if not req.tools or req.tool_choice == "none":
        return []
    if isinstance(req.tool_choice, str) or req.tool_choice is None:
        return req.tools
    named = [t for t in req.tools if t.function.name == req.tool_choice.function.name]
    if not named:
        raise ValueError(f"tool_choice names {req.tool_choice.function.name!r}, which is not among the tools")
    return named


def answer_schema(req: ChatCompletionRequest) -> dict | None:
    """The JSON schema a text answer takes where the request gives tools and a JSON structured output together
    (None: none, the answer is free text). ValueError for another kind of structured output."""
    structured = req.structured_output
    if structured is None:
        return None
    if structured.json_object:
        return {"type": "object"}
    if structured.json is None:
        raise ValueError("tools go with a JSON structured output (a schema, or json_object) only")
    return json.loads(structured.json) if isinstance(structured.json, str) else dict(structured.json)


def output_format(req: ChatCompletionRequest) -> StructuredOutput | None:
    """The constraint on an answer that may call tools (None: no tools in play): with a JSON structured output
    too, its text answer is a value of that schema (as the OpenAI Agents SDK asks for an agent's output type)."""
    tools = active_tools(req)
    if not tools:
        if req.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice asks for a tool call, but the request has no tools")
        return None
    schema = answer_schema(req)
    only_calls = req.tool_choice not in (None, "auto")
    calling_at = "" if only_calls else "/anyOf/0"  # where the calls' schema sits in the whole one
    call = [{"type": "object", "properties": {
                "name": {"const": t.function.name},
                "arguments": moved(closed(t.function.parameters or {"type": "object"}),
                                   f"{calling_at}/properties/tool_calls/items/anyOf/{i}/properties/arguments")},
             "required": ["name", "arguments"], "additionalProperties": False} for i, t in enumerate(tools)]
    calls = {"type": "array", "items": {"anyOf": call}, "minItems": 1} | ({} if req.parallel_tool_calls else
                                                                          {"maxItems": 1})
    calling = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
               "additionalProperties": False}
    if only_calls:
        return StructuredOutput(json=calling)
    answering = {"type": "object", "properties": {"response": moved(schema or {"type": "string"},
                                                                    "/anyOf/1/properties/response")},
                 "required": ["response"], "additionalProperties": False}
    return StructuredOutput(json={"anyOf": [calling, answering]})


def moved(schema: object, to: str) -> object:
    """schema with its own references ("#/$defs/X", "#") pointing where it sits in the whole schema: at the JSON
    pointer `to` (Pydantic's nested models, recursive ones, and MCP tools all refer to their own root)."""
    if isinstance(schema, list):
        return [moved(s, to) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in DATA_KEYWORDS else moved(v, to) for k, v in schema.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = "#" + to + ref[1:]
    return out


def system_prompt(req: ChatCompletionRequest) -> str:
    """What the model is told of the tools it may call, and of the shape of its answer."""
    tools = active_tools(req)
    described = "\n".join(json.dumps(t.function.model_dump(exclude={"strict"}, exclude_none=True), ensure_ascii=False)
                          for t in tools)
    calling = '{"tool_calls": [{"name": "<function name>", "arguments": {<its arguments>}}]}'
    if req.tool_choice not in (None, "auto"):
        how = f"Answer by calling {'this function' if len(tools) == 1 else 'these functions'}, with one JSON object: "
        return f"You have these functions:\n{described}\n\n{how}{calling}"
    schema = answer_schema(req)
    answering = ('{"response": "<your answer>"}' if schema is None else
                 f'{{"response": <your answer, JSON of this schema: {json.dumps(schema, ensure_ascii=False)}>}}')
    return (f"You have these functions:\n{described}\n\nAnswer with one JSON object: {calling} to call functions, or "
            f"{answering} to answer directly.")


def call_arguments(text: str) -> object:
    """A call's arguments as the object they encode (arguments that are no JSON stay text)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def calls_text(calls: list[ToolCall]) -> str:
    """An assistant's earlier calls as the JSON object it writes."""
    return json.dumps({"tool_calls": [{"name": c.function.name, "arguments": call_arguments(c.function.arguments)}
                                      for c in calls]}, ensure_ascii=False)


RESPONSE_START = re.compile(r'\{\s*"response"\s*:\s*"')
VALUE_START = re.compile(r'\{\s*"response"\s*:\s*')


def response_text(text: str) -> str | None:
    """The text of a {"response": "..."} answer, whole or still growing (a stream sends it as it comes; an escape
    not yet whole waits for the next token); None for an answer of calls."""
    start = RESPONSE_START.match(text)
    if start is None:
        return None
    body, i = text[start.end():], 0
    while i < len(body) and body[i] != '"':  # the string ends at the first quote not escaped
        i += 2 if body[i] == "\\" else 1
    body = body[:i]
    for end in range(len(body), max(len(body) - 6, 0) - 1, -1):  # "\u00e9" is the longest escape
        try:
            text = json.loads(f'"{body[:end]}"')
        except json.JSONDecodeError:
            continue
        # the first half of a surrogate pair ("\ud83d") waits for its second
        return text[:-1] if text and "\ud800" <= text[-1] <= "\udbff" else text
    return ""


def json_answer(req: ChatCompletionRequest) -> bool:
    """Whether an answer that may call tools answers, where it calls none, with a value of the request's JSON
    structured output (its content that value's JSON text), rather than text."""
    return bool(active_tools(req)) and answer_schema(req) is not None


def read_answer(text: str, json_value: bool = False) -> tuple[str | None, list[ToolCall]]:
    """An answer's (content, tool calls); json_value: its response is a JSON value (json_answer), given as its JSON
    text even where it is a string. An answer cut short (max_tokens) is no whole JSON: its content is the response
    so far; calls cut short are none (no content either: the JSON the model wrote is ours, not an answer, and a
    call with half its arguments must not run)."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        if json_value:
            start = VALUE_START.match(text)
            return (text[start.end():] if start else None), []
        return response_text(text), []
    if "tool_calls" in answer:
        return None, [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(
            name=c["name"], arguments=json.dumps(c["arguments"], ensure_ascii=False))) for c in answer["tool_calls"]]
    response = answer["response"]  # (text, or a value of the request's JSON schema, given as its JSON text)
    return response if isinstance(response, str) and not json_value else json.dumps(response, ensure_ascii=False), []
