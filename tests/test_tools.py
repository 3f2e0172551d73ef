"""Tools (server.tools): the answer of a request with tools is one JSON object, read back into OpenAI's tool_calls or
content; through the official openai client, streamed and whole, and its errors. A tiny random model has no idea
what a tool is, so what is checked is what the constraint guarantees: calls of the given functions, with
arguments that fit their schemas, equal to the engine's own constrained answer."""
from __future__ import annotations

import json
import re
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from engine import LLM, RequestOutput, SamplingParams
from server.app import ServerConfig, create_app
from server.errors import APIError
from server.prompts import chat_prompt_ids
from server.protocol import ChatCompletionRequest, ResponsesRequest, Usage
from server.responses import ChatRenderer
from server.tools import json_answer, output_format, read_answer, response_text, system_prompt

from conftest import save_tiny_model

KEY, MODEL = "test-key", "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
USER = [{"role": "user", "content": "weather?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # a byte vocabulary spends a token per character of the tools' description: a longer context
    return save_tiny_model(tmp_path_factory.mktemp("tiny_2k"), max_position_embeddings=2048)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model_dir, num_kv_blocks=512, block_size=16, max_num_seqs=8)


@pytest.fixture(scope="module")
def oracle(model_dir) -> LLM:
    """The same model beside the served one (whose steps the server takes): the engine's own answers."""
    return LLM(model_dir, num_kv_blocks=512, block_size=16, max_num_seqs=8)


@pytest.fixture(scope="module")
def http(llm):
    app = create_app(llm, ServerConfig(model_name=MODEL, model_root="/models/tiny", api_key=KEY))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def client(http) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER, TIME], **fields})


def fits(call) -> bool:
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return args.get("city") in ("Paris", "Rome") and args.get("unit") in ("C", "F") and len(args) == 2
    return call.function.name == "get_time" and args == {"zone": args.get("zone")} and args["zone"] in ("UTC", "CET")


def test_the_answer_formats():
    several = output_format(request(tool_choice="required", parallel_tool_calls=True)).json
    assert several["properties"]["tool_calls"]["minItems"] == 1 and "maxItems" not in several["properties"][
        "tool_calls"]
    required = output_format(request(tool_choice="required")).json  # one call unless asked: llama.cpp's default
    assert required["properties"]["tool_calls"]["maxItems"] == 1
    named = output_format(request(tool_choice={"type": "function", "function": {"name": "get_time"}})).json
    assert [c["properties"]["name"] for c in named["properties"]["tool_calls"]["items"]["anyOf"]] == [
        {"const": "get_time"}]
    loose = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}}, "c": {"type": "object"}}}}}
    arguments = output_format(request(tools=[loose])).json["anyOf"][0]["properties"]["tool_calls"]["items"]["anyOf"][
        0]["properties"]["arguments"]
    assert arguments["additionalProperties"] is False and arguments["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in arguments["properties"]["c"]  # no properties listed: any object
    auto = output_format(request()).json
    assert auto["anyOf"][0] == required and auto["anyOf"][1]["required"] == ["response"]
    assert output_format(request(tool_choice="none")) is None
    assert "get_weather" in system_prompt(request()) and '{"response"' in system_prompt(request())
    assert '{"response"' not in system_prompt(request(tool_choice="required"))


def test_schemas_that_refer_to_their_own_definitions_and_intersections(llm):
    """Pydantic's nested (and recursive) models refer to their own root ("#/$defs/Addr", "#"), which embedded in
    the whole answer's schema pointed at its root (a 400, or a recursive schema bound to the wrong object); zod's
    intersections (allOf of objects) were made unsatisfiable by closing each part."""
    def accepted(req: ChatCompletionRequest, text: str) -> bool:
        matcher = llm.grammars.matcher(output_format(req))
        tokens = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
        return matcher.validate_tokens(tokens) == len(tokens) and matcher.consume_tokens(tokens) \
            and matcher.is_accepting()

    addr = {"type": "object", "properties": {"city": {"enum": ["Paris"]}}, "required": ["city"]}
    book = {"type": "function", "function": {"name": "book", "parameters": {
        "$defs": {"Addr": addr}, "type": "object", "properties": {"to": {"$ref": "#/$defs/Addr"}},
        "required": ["to"]}}}
    linked = {"type": "function", "function": {"name": "chain", "parameters": {
        "type": "object",
        "properties": {"v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
        "required": ["v", "next"]}}}
    both = {"type": "function", "function": {"name": "both", "parameters": {"type": "object", "allOf": [
        {"properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}}}
    either = {"type": "function", "function": {"name": "either", "parameters": {  # a union adding properties
        "type": "object", "properties": {"kind": {"enum": ["x", "y"]}}, "required": ["kind"],
        "anyOf": [{"properties": {"x": {"type": "integer"}}, "required": ["x"]},
                  {"properties": {"y": {"type": "integer"}}, "required": ["y"]}]}}}
    one_of = {"type": "function", "function": {"name": "one_of", "parameters": {  # its parts require, add nothing
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}}}
    for choice in ("required", "auto"):
        req = request(tools=[book, linked, both, either, one_of], tool_choice=choice)
        assert accepted(req, '{"tool_calls": [{"name": "either", "arguments": {"kind": "x", "x": 1}}]}')
        assert accepted(req, '{"tool_calls": [{"name": "one_of", "arguments": {"a": 1}}]}')
        assert not accepted(req, '{"tool_calls": [{"name": "one_of", "arguments": {"a": 1, "zzz": 3}}]}')
        assert accepted(req, '{"tool_calls": [{"name": "book", "arguments": {"to": {"city": "Paris"}}}]}')
        assert not accepted(req, '{"tool_calls": [{"name": "book", "arguments": {"to": {"city": "Rome"}}}]}')
        chain = '{"tool_calls": [{"name": "chain", "arguments": {"v": 1, "next": %s}}]}'
        assert accepted(req, chain % '{"v": 2, "next": null}') and not accepted(req, chain % '{"tool_calls": []}')
        assert accepted(req, '{"tool_calls": [{"name": "both", "arguments": {"a": 1, "b": 2}}]}')
    answer = {"$defs": {"C": {"enum": ["x"]}}, "type": "object", "properties": {"c": {"$ref": "#/$defs/C"}},
              "required": ["c"]}
    shaped = request(tools=[WEATHER], response_format={"type": "json_schema", "json_schema": {"name": "o",
                                                                                              "schema": answer}})
    assert accepted(shaped, '{"response": {"c": "x"}}') and not accepted(shaped, '{"response": {"c": "y"}}')


def test_an_assistant_message_as_the_sdk_gives_it_back(llm):
    """The openai SDK's parse helpers add `parsed` and `parsed_arguments` (refused as unknown fields); text sent
    beside tool calls was dropped from the prompt."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}',
                                                             "parsed_arguments": {"city": "Rome"}}}
    messages = [*USER, {"role": "assistant", "content": "Let me look.", "parsed": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    req = ChatCompletionRequest.model_validate({"messages": messages, "tools": [WEATHER]})
    text = llm.tokenizer.decode(chat_prompt_ids(llm.tokenizer, req, {}, tools_prompt=system_prompt(req)))
    assert 'Let me look.\n{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}' in text


# The shape of Mistral's templates: the system message goes with the last user turn, turns must alternate (messages
# of calls and tool results left out), calls are written in the model's own format, and call ids have 9 characters
MISTRAL_STYLE = (
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{%- set turns = messages[1:] if system else messages %}"
    "{%- for m in turns | rejectattr('role', 'equalto', 'tool') | selectattr('tool_calls', 'undefined') %}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in turns %}"
    "{%- if m['role'] == 'user' %}[INST]{{ system + '\n\n' if loop.last and system }}{{ m['content'] }}[/INST]"
    "{%- elif m['role'] == 'assistant' and m.tool_calls is defined %}[TOOL_CALLS]["
    "{%- for c in m.tool_calls %}{%- if c.id | length != 9 %}{{ raise_exception('ids of 9') }}{%- endif %}"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments, 'id': c.id} | tojson }}{%- endfor %}]</s>"
    "{%- elif m['role'] == 'assistant' %}{{ m['content'] }}</s>"
    "{%- elif m['role'] == 'tool' %}{%- if m.tool_call_id | length != 9 %}{{ raise_exception('ids of 9') }}"
    "{%- endif %}[TOOL_RESULTS]{{ {'content': m['content'], 'call_id': m.tool_call_id} | tojson }}[/TOOL_RESULTS]"
    "{%- endif %}{%- endfor %}")


def prompt_text(llm: LLM, messages: list[dict], template: str) -> str:
    """The prompt a chat request with these messages and WEATHER gets through `template`."""
    tokenizer = llm.tokenizer
    req = ChatCompletionRequest.model_validate({"messages": messages, "tools": [WEATHER]})
    saved, tokenizer.chat_template = tokenizer.chat_template, template
    try:
        return tokenizer.decode(chat_prompt_ids(tokenizer, req, {}, tools_prompt=system_prompt(req)))
    finally:
        tokenizer.chat_template = saved


def weather_call(call_id: str, city: str = "Paris") -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": "C"})}}


def test_a_template_that_writes_calls_its_own_way_gets_them_as_transformers_passes_them(llm):
    """A template that reads `tool_calls` writes an assistant's calls in its model's own format; Mistral's also
    leave those messages out of the check that turns alternate, and take ids of 9 characters only: a conversation
    of a call, its result and a next question (with OpenAI's ids, or ours) was refused at its second turn. Ids
    that are no 9 letters and digits become 9 of their hash (two ids cut to their last 9 could meet)."""
    call, other = weather_call("call_get_weather_0"), weather_call("call_set_weather_0", "Rome")
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call, other]},
                {"role": "tool", "tool_call_id": call["id"], "content": "21"},
                {"role": "tool", "tool_call_id": other["id"], "content": "18"},
                {"role": "assistant", "content": "It is 21 degrees."}, {"role": "user", "content": "And in Rome?"}]
    text = prompt_text(llm, messages, MISTRAL_STYLE)
    assert text.startswith('[INST]weather?[/INST][TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"')
    ids = re.findall(r'"id": "([0-9a-f]{9})"', text)
    assert len(set(ids)) == 2 and re.findall(r'"call_id": "([0-9a-f]{9})"', text) == ids
    assert "[/TOOL_RESULTS]It is 21 degrees.</s>[INST]" in text and text.endswith("\n\nAnd in Rome?[/INST]")
    assert '{"tool_calls": [{"name": "get_weather"' not in text
    # the turn after a result: the template writes the system message (the tools prompt) before a last user
    # message only, so the tools prompt goes with the last user message
    tools_prompt = system_prompt(ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER]}))
    for question in ("weather?", tools_prompt.splitlines()[0]):  # (the prompt's words in a message fool no check)
        text = prompt_text(llm, [{"role": "user", "content": question}, *messages[1:4]], MISTRAL_STYLE)
        assert text.startswith(f"[INST]{tools_prompt}\n\n{question}[/INST]") and text.endswith("[/TOOL_RESULTS]")
    # text that is no Unicode in arguments the template writes: the client's error (it was a 500); in an id no
    # 9-character one could be made of, the calls come as JSON text
    arguments = {**call, "function": {**call["function"], "arguments": '{"city": "Par\ud800is"}'}}
    with pytest.raises(APIError, match="not valid Unicode"):
        prompt_text(llm, [*USER, {"role": "assistant", "content": None, "tool_calls": [arguments]}], MISTRAL_STYLE)
    text = prompt_text(llm, [*USER, {"role": "assistant", "content": None, "tool_calls": [{**call, "id": "c\ud800"}]}],
                       MISTRAL_STYLE)
    assert text.endswith('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]}</s>')


# A template that joins a call's arguments as text (DeepSeek-R1's) and one that takes a single call a message
# (Llama 3's); and one that knows no tool role (Phi-3.5's)
JOINS_ARGUMENTS = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] or '' }}{% for c in m.tool_calls or [] %}"
                   "{{ '<call>' + c.function.name + c.function.arguments + '</call>' }}{% endfor %}{% endfor %}")
ONE_CALL = ("{% for m in messages %}{% if m.tool_calls is defined and m.tool_calls | length != 1 %}"
            "{{ raise_exception('only one tool call at once') }}{% endif %}<{{ m['role'] }}>"
            "{% if m.tool_calls is defined %}{{ m.tool_calls[0].function | tojson }}{% else %}{{ m['content'] }}"
            "{% endif %}{% endfor %}")
NO_TOOL_ROLE = ("{% for m in messages %}{% if m['role'] in ('system', 'user', 'assistant') %}<{{ m['role'] }}>"
                "{{ m['content'] }}{% endif %}{% endfor %}")


def test_templates_that_refuse_calls_or_drop_results_get_them_as_any_template_takes_them(llm):
    """Where a template refuses an assistant's calls as its own `tool_calls` (a 500 for DeepSeek-R1's, which joins
    the arguments as text; a 400 for Llama 3's beside parallel calls), they come as the JSON object the tools
    prompt asks for; where it leaves tool results out without a word (Phi-3.5's), they come as user messages."""
    one = [*USER, {"role": "assistant", "content": None, "tool_calls": [weather_call("c1")]},
           {"role": "tool", "tool_call_id": "c1", "content": "21"}]
    two = [*USER, {"role": "assistant", "content": None, "tool_calls": [weather_call("c1"), weather_call("c2")]},
           {"role": "tool", "tool_call_id": "c1", "content": "21"},
           {"role": "tool", "tool_call_id": "c2", "content": "18"}]
    as_json = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
    assert as_json in prompt_text(llm, one, JOINS_ARGUMENTS)
    assert as_json not in prompt_text(llm, one, ONE_CALL) and '<assistant>{"name": "get_weather"' in prompt_text(
        llm, one, ONE_CALL)
    assert as_json in prompt_text(llm, two, ONE_CALL)
    text = prompt_text(llm, two, NO_TOOL_ROLE)
    assert text.endswith('<user>{"tool_response": {"name": "get_weather", "content": "21"}}'
                         '<user>{"tool_response": {"name": "get_weather", "content": "18"}}')
    # a template that wants a system message first: the tools prompt is one (rendered without it, as the check
    # that a template keeps it does, the turns do not fit it: no error for that)
    system_first = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message first') }}"
                    "{% endif %}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    assert prompt_text(llm, USER, system_first).startswith("<system>You have these functions")


def test_reading_an_answer():
    content, calls = read_answer('{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}')
    assert content is None and calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments) == {"zone": "UTC"} and calls[0].id.startswith("call_")
    assert read_answer('{"response": "It is sunny."}') == ("It is sunny.", [])
    assert read_answer('{"tool_calls": [{"na') == (None, [])  # cut short by max_tokens: no content, no call
    assert read_answer('{"response": "It is su') == ("It is su", [])


@pytest.mark.parametrize("text, want", [
    ('{"resp', None), ('{"tool_calls": [{"name": "f"', None), ('{\n  "response" :\n "', ""),
    ('{"response": "Hel', "Hel"), ('{"response": "a\\', "a"), ('{"response": "a\\u00e', "a"),
    ('{"response": "a\\u00e9b', "aéb"), ('{"response": "x\\"y"}', 'x"y'),
    ('{"response": "a\\ud83d', "a"), ('{"response": "a\\ud83d\\ude00', "a\U0001F600"),
])
def test_the_text_of_a_growing_response(text, want):
    assert response_text(text) == want


def test_a_text_answer_streams_as_it_grows(client):
    for seed in range(16):
        args = dict(model=MODEL, messages=USER, tools=[WEATHER, TIME], temperature=1.0, seed=seed, max_tokens=120)
        whole = client.chat.completions.create(**args).choices[0]
        if whole.finish_reason != "tool_calls":
            break
    else:
        pytest.fail("no seed answered in text")
    chunks = list(client.chat.completions.create(**args, stream=True))
    parts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(parts) == whole.message.content and len(parts) > 1
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_through_the_openai_client(client, oracle, parallel):
    got = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice="required",
                                         parallel_tool_calls=parallel, temperature=0, max_tokens=400)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls and all(fits(c) for c in choice.message.tool_calls)
    assert parallel or len(choice.message.tool_calls) == 1
    # the engine's own answer, constrained the same way, from the same prompt
    req = request(tool_choice="required", parallel_tool_calls=parallel)
    want = oracle.generate(chat_prompt_ids(oracle.tokenizer, req, {}, tools_prompt=system_prompt(req)),
                        SamplingParams(max_tokens=400, temperature=0, structured=output_format(req)))[0]
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in read_answer(want.text)[1]]


def test_a_named_tool_and_a_stream(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    whole = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice=named,
                                           temperature=0, max_tokens=400).choices[0]
    assert [c.function.name for c in whole.message.tool_calls] and all(
        c.function.name == "get_time" and fits(c) for c in whole.message.tool_calls)
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME],
                                                 tool_choice=named, temperature=0, max_tokens=400, stream=True))
    calls = [c for chunk in chunks for choice in chunk.choices for c in choice.delta.tool_calls or []]
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [
        (k, c.function.name, c.function.arguments) for k, c in enumerate(whole.message.tool_calls)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_answers_in_text_or_calls(client):
    for seed in range(4):
        choice = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], temperature=1.0,
                                                seed=seed, max_tokens=600).choices[0]
        if choice.finish_reason == "tool_calls":
            assert choice.message.tool_calls and all(fits(c) for c in choice.message.tool_calls)
        else:
            assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)


def test_tools_with_a_json_schema_answer_in_calls_or_in_that_schema(client):
    """The OpenAI Agents SDK sends an agent's tools and its output type (response_format) together: an answer calls
    functions, or answers with a value of the schema, as its JSON text."""
    schema = {"type": "object", "properties": {"city": {"enum": ["Rome", "Oslo"]}, "warm": {"type": "boolean"}},
              "required": ["city", "warm"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    kinds = set()
    for seed in range(6):
        choice = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], response_format=fmt,
                                                temperature=1.0, seed=seed, max_tokens=300).choices[0]
        if choice.finish_reason == "tool_calls":
            assert all(fits(c) for c in choice.message.tool_calls)
        else:
            value = json.loads(choice.message.content)
            assert set(value) == {"city", "warm"} and value["city"] in ("Rome", "Oslo")
        kinds.add(choice.finish_reason)
    assert kinds == {"tool_calls", "stop"}, kinds  # both ways were taken


def test_a_conversation_with_earlier_calls_and_results(client, llm):
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Rome", "unit": "C"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C, clear"}]
    got = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=600,
                                         temperature=0)
    assert got.choices[0].finish_reason in ("tool_calls", "stop", "length")
    req = ChatCompletionRequest.model_validate({"messages": messages, "tools": [WEATHER]})
    text = llm.tokenizer.decode(chat_prompt_ids(llm.tokenizer, req, {}, tools_prompt=system_prompt(req)))
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}]}' in text
    assert "21 C, clear" in text and text.index("get_weather") < text.index("weather?")  # the tools come first


def responses_tool(chat_tool: dict) -> dict:
    """A chat completions tool as the Responses API gives it: the function's fields flat."""
    return {"type": "function", **chat_tool["function"]}


def test_the_responses_api_calls_tools_as_chat_completions_do(client):
    args = dict(model=MODEL, temperature=0, parallel_tool_calls=True)
    chat = client.chat.completions.create(messages=USER, tools=[WEATHER, TIME], tool_choice="required", max_tokens=400,
                                          **args).choices[0].message.tool_calls
    got = client.responses.create(input=USER, tools=[responses_tool(WEATHER), responses_tool(TIME)],
                                  tool_choice="required", max_output_tokens=400, **args)
    assert got.status == "completed" and all(item.type == "function_call" for item in got.output)
    assert [(item.name, item.arguments) for item in got.output] == [(c.function.name, c.function.arguments)
                                                                   for c in chat]
    # streamed: each call whole, after its item is announced
    events = list(client.responses.create(input=USER, tools=[responses_tool(WEATHER), responses_tool(TIME)],
                                          tool_choice="required", max_output_tokens=400, stream=True, **args))
    done = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert done == [item.arguments for item in got.output]
    assert not any(e.type == "response.output_text.delta" for e in events)
    assert [item.arguments for item in events[-1].response.output] == done

    # the calls and their outputs sent back: the chat conversation they stand for
    outputs = [{"type": "function_call_output", "call_id": item.call_id, "output": "21 C, clear"}
               for item in got.output]
    after = client.responses.create(input=[*USER, *[item.model_dump() for item in got.output], *outputs],
                                    tools=[responses_tool(WEATHER)], max_output_tokens=600, **args)
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
        for item in got.output]}, *[{"role": "tool", "tool_call_id": o["call_id"], "content": o["output"]}
                                    for o in outputs]]
    want = client.chat.completions.create(messages=messages, tools=[WEATHER], max_tokens=600, **args).choices[0]
    if want.message.tool_calls:
        assert [(i.name, i.arguments) for i in after.output] == [(c.function.name, c.function.arguments)
                                                                 for c in want.message.tool_calls]
    else:
        assert after.output_text == want.message.content


@pytest.mark.parametrize("body, message", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tool_choice": "required"}, "has no tools"),
    ({"tools": [WEATHER], "guided_regex": "a+"}, "JSON structured output"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"messages": [{"role": "tool", "tool_call_id": "1"}]}, "needs content"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "only assistant"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "use tools"),
    ({"tools": [WEATHER], "tool_choice": "auto", "functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_get_a_400(http, llm, body, message):
    response = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                         json={"messages": USER, "max_tokens": 4, **body})
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    assert llm.num_free_blocks == llm.block_manager.num_blocks


def test_an_answers_text_and_its_calls_sent_back_are_one_assistant_turn():
    """OpenAI's Responses output lists a message, then the calls: the chat they stand for has one assistant
    message with both, as chat completions answer it."""
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Rome"}'}
    request = ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": "weather?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        call, {"type": "function_call_output", "call_id": "call_1", "output": "21 C"}]})
    want = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [{
            "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]})
    assert request.chat().messages == want.messages


def test_a_json_answer_beside_tools_is_json_even_where_its_value_is_a_string():
    """Tools with a JSON structured output: the answer's content is its value's JSON text (the README's promise),
    a string schema's too ('"yes"', not 'yes'), streamed whole with the message's end, and chat completions and
    the Responses API alike."""
    schema = {"type": "string", "enum": ["yes", "no"]}
    req = ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER], "response_format": {
        "type": "json_schema", "json_schema": {"name": "v", "schema": schema}}})
    assert json_answer(req) and not json_answer(ChatCompletionRequest.model_validate(
        {"messages": USER, "tools": [WEATHER]}))
    assert read_answer('{"response": "yes"}', json_value=True) == ('"yes"', [])
    assert read_answer('{"response": "yes"}') == ("yes", [])  # (a text answer)
    renderer = ChatRenderer("m", None, None, False, tools=True, json_value=True)
    text = '{"response": "yes"}'
    growing = [RequestOutput("r", None, [1], text[:n], [], "", [], n == len(text), "stop" if n == len(text) else None,
                             0, None) for n in (14, 17, len(text))]
    deltas = [renderer.chunk(0, out).choices[0].delta.content for out in growing]
    assert deltas == [None, None, '"yes"']
    usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2, prompt_tokens_details={"cached_tokens": 0})
    assert renderer.response([growing[-1]], usage).choices[0].message.content == '"yes"'
