"""Hostile and malformed requests: each gets a 4xx with OpenAI's error body, never a 5xx, and the server stays
up with every KV block free. Also the contract around them: /openapi.json, the waiting-queue limit, CORS,
/tokenize and /detokenize, echo, and the model card's context length."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pytest
import torch
from fastapi.testclient import TestClient

from engine import LLM, SamplingParams
from server.app import ServerConfig, create_app
from server.guards import is_loopback
from server.prompts import chat_prompt_ids
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
)

KEY = "test-key"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENGINE_KWARGS = dict(num_kv_blocks=96, block_size=8, max_num_seqs=8)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm(tiny_model_dir, tmp_path_factory) -> LLM:
    return LLM(tiny_model_dir, adapter_root=str(tmp_path_factory.mktemp("adapter_root")), **ENGINE_KWARGS)


def make_client(llm: LLM, **config) -> TestClient:
    app = create_app(llm, ServerConfig(model_name=MODEL, model_root="/models/tiny", api_key=KEY,
                                       max_request_bytes=4096, **config))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def oracle(tiny_model_dir) -> LLM:
    """The same model beside the served one (a server takes its LLM's steps): the engine's own answers."""
    return LLM(tiny_model_dir, **ENGINE_KWARGS)


@pytest.fixture
def client(llm):
    with make_client(llm) as client:
        yield client


@dataclass
class Bad:
    """A hostile request: JSON (or raw bytes) to `route`, the status it must get and the `param` it must name."""

    route: str
    body: object
    status: int = 400
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    method: str = "POST"


def completion(param: str | None, **fields) -> Bad:
    return Bad("/v1/completions", {"prompt": "hi", "max_tokens": 2, **fields}, param=param)


def chat(param: str | None, **fields) -> Bad:
    return Bad("/v1/chat/completions", {"messages": USER, "max_tokens": 2, **fields}, param=param)


HOSTILE = {
    # the body itself
    "bad json": Bad("/v1/completions", b'{"prompt": "hi", "max_tokens": '),
    "json array": Bad("/v1/completions", b"[1, 2]"),
    "json string": Bad("/v1/completions", b'"hi"'),
    "empty body": Bad("/v1/completions", b""),
    "NaN": Bad("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', param="temperature"),
    "Infinity": Bad("/v1/completions", b'{"prompt": "hi", "top_p": Infinity}', param="top_p"),
    "invalid UTF-8": Bad("/v1/completions", b'{"prompt": "\xff\xfe"}'),
    "deep nesting": Bad("/v1/completions", b'{"prompt": ' + b"[" * 1500 + b"]" * 1500 + b"}"),
    "huge body": Bad("/v1/completions", {"prompt": "x" * 5000}, status=413, code="request_too_large"),
    "text/plain": Bad("/v1/completions", b'{"prompt": "hi"}', status=415, code="unsupported_media_type",
                      headers={"Content-Type": "text/plain"}),
    "form encoded": Bad("/v1/completions", b"prompt=hi", status=415, code="unsupported_media_type",
                        headers={"Content-Type": "application/x-www-form-urlencoded"}),
    "no content type, no JSON": Bad("/v1/completions", b"prompt=hi", status=415, code="unsupported_media_type",
                                    headers={}),
    "no content type, nested past Python's recursion": Bad("/v1/completions", b"[" * 2000 + b"]" * 2000,
                                                           status=415, code="unsupported_media_type", headers={}),
    # a web page of another site posting JSON with no content type (no CORS preflight): a CSRF on a keyless server
    "a page of another site": Bad("/v1/completions", b'{"prompt": "hi", "max_tokens": 2}', status=403,
                                  code="cross_origin", headers={"Origin": "https://evil.example",
                                                                "Sec-Fetch-Site": "cross-site"}),
    "a page of another port": Bad("/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "x"}', status=403,
                                  code="cross_origin", headers={"Origin": "http://localhost:3000",
                                                                "Sec-Fetch-Site": "same-site"}),
    "chat_template_kwargs nested too deep": chat("chat_template_kwargs", chat_template_kwargs={"x": json.loads(
        "[" * 40 + "]" * 40)}),
    "tool description unpaired surrogate": Bad(
        "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
                                b'"tools": [{"type": "function", "function": {"name": "f", '
                                b'"description": "a\\ud800"}}]}',
        param="tools"),
    "unknown field": completion("frobnicate", frobnicate=1),
    # prompts and token ids
    "prompt missing": Bad("/v1/completions", {"max_tokens": 2}, param="prompt"),
    "prompt number": completion("prompt", prompt=5),
    "prompt object": completion("prompt", prompt={"text": "hi"}),
    "prompt empty": completion("prompt", prompt=""),
    "prompt ids empty": completion("prompt", prompt=[]),
    "prompt ids floats": completion("prompt", prompt=[1.5, 2]),
    "prompt ids mixed with text": completion("prompt", prompt=[1, "2"]),
    "prompt ids nested twice": completion("prompt", prompt=[[[1, 2]]]),
    "prompts mixing text and ids": completion("prompt", prompt=["hi", [1, 2]]),
    "prompts with an empty one": completion("prompt", prompt=["hi", ""]),
    "prompts with an empty id list": completion("prompt", prompt=[[1], []]),
    "prompts too many": completion("prompt", prompt=["x"] * 65),
    "prompts with an id out of vocabulary": completion("prompt", prompt=[[1], [1, 256]]),
    "prompts with one over the context": Bad("/v1/completions", {"prompt": [[5], [5] * 600]}, param="prompt",
                                             code="context_length_exceeded"),
    "prompt id negative": completion("prompt", prompt=[1, -1]),
    "prompt id out of vocabulary": completion("prompt", prompt=[1, 256]),
    "prompt id 2**70": completion("prompt", prompt=[1, 2 ** 70]),
    "prompt unpaired surrogate": Bad("/v1/completions", b'{"prompt": "a\\ud800b"}', param="prompt"),
    "max_tokens of 3000 digits": Bad("/v1/completions", b'{"prompt": "hi", "max_tokens": ' + b"9" * 3000 + b"}",
                                     param="max_tokens", code="context_length_exceeded"),
    "max_tokens over the context": Bad("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, param="max_tokens",
                                       code="context_length_exceeded"),
    "prompt over the context": Bad("/v1/completions", {"prompt": [5] * 600}, param="prompt",
                                   code="context_length_exceeded"),
    "prompt + max_tokens over the context": Bad("/v1/completions", {"prompt": [5] * 500, "max_tokens": 100},
                                                param="max_tokens", code="context_length_exceeded"),
    # sampling fields: wrong types and out-of-range values
    "max_tokens negative": completion("max_tokens", max_tokens=-1),
    "max_tokens zero": completion("max_tokens", max_tokens=0),
    "max_tokens string": completion("max_tokens", max_tokens="16"),
    "max_tokens fraction": completion("max_tokens", max_tokens=1.5),
    "max_tokens 2**70": Bad("/v1/completions", {"prompt": "hi", "max_tokens": 2 ** 70}, param="max_tokens",
                            code="context_length_exceeded"),
    "temperature negative": completion("temperature", temperature=-1),
    "temperature string": completion("temperature", temperature="hot"),
    "top_p negative": completion("top_p", top_p=-0.1),
    "top_p above one": completion("top_p", top_p=1.5),
    "top_k below -1": completion("top_k", top_k=-2),
    "top_k 2**70": completion("top_k", top_k=2 ** 70),
    "min_p above one": completion("min_p", min_p=1.5),
    "min_tokens negative": completion("min_tokens", min_tokens=-1),
    "min_tokens beyond the context": completion("min_tokens", min_tokens=2 ** 70),
    "presence_penalty too big": completion("presence_penalty", presence_penalty=3),
    "frequency_penalty too small": completion("frequency_penalty", frequency_penalty=-2.5),
    "repetition_penalty zero": completion("repetition_penalty", repetition_penalty=0),
    "logit_bias key not an id": completion("logit_bias", logit_bias={"abc": 1}),
    "logit_bias id out of vocabulary": completion("logit_bias", logit_bias={"100000": 1}),
    "logit_bias negative id": completion("logit_bias", logit_bias={"-1": 1}),
    "logit_bias value too big": completion("logit_bias", logit_bias={"5": 1000}),
    "logit_bias too many entries": completion("logit_bias", logit_bias={str(i): 1 for i in range(301)}),
    "logit_bias a list": completion("logit_bias", logit_bias=[5, 1]),
    "seed 2**70": completion("seed", seed=2 ** 70),
    "seed string": completion("seed", seed="x"),
    "n zero": completion("n", n=0),
    "n too many": completion("n", n=1000),
    "stop list too long": completion("stop", stop=[str(i) for i in range(100)]),
    "stop empty string": completion("stop", stop=[""]),
    "stop number": completion("stop", stop=5),
    "stream not a bool": completion("stream", stream="yes"),
    "stream_options unknown key": completion("stream_options", stream=True, stream_options={"everything": True}),
    "stream_options without stream": completion("stream_options", stream_options={"include_usage": True}),
    "logprobs too many": completion("logprobs", logprobs=50),
    "echo not a bool": completion("echo", echo=1),
    "best_of above n": completion("best_of", best_of=3),
    "suffix": completion("suffix", suffix="}"),
    "model unknown": Bad("/v1/completions", {"prompt": "hi", "model": "no-such-model"}, status=404, param="model",
                         code="model_not_found"),
    "model not a string": completion("model", model=5),
    # chat
    "messages empty": chat("messages", messages=[]),
    "messages missing": Bad("/v1/chat/completions", {"max_tokens": 2}, param="messages"),
    "messages a string": chat("messages", messages="hi"),
    "role unknown": chat("messages", messages=[{"role": "wizard", "content": "hi"}]),
    "role function": chat("messages", messages=[{"role": "function", "content": "hi", "name": "f"}]),
    "tool message without content": chat("messages", messages=[{"role": "tool", "tool_call_id": "1"}]),
    "content missing": chat("messages", messages=[{"role": "user"}]),
    "content a number": chat("messages", messages=[{"role": "user", "content": 5}]),
    "content an image": chat("messages", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
    "content unpaired surrogate": Bad("/v1/chat/completions",
                                      b'{"messages": [{"role": "user", "content": "\\udfff"}]}', param="messages"),
    "message unknown field": chat("messages", messages=[{"role": "user", "content": "hi", "mood": "grim"}]),
    "message name a number": chat("messages", messages=[{"role": "user", "content": "hi", "name": 5}]),
    "user tool calls": chat("messages", messages=[{"role": "user", "content": "hi", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]),
    "tool name invalid": chat("tools", tools=[{"type": "function", "function": {"name": "f g"}}]),
    "tool_choice unknown tool": chat("tool_choice", tools=[{"type": "function", "function": {"name": "f"}}],
                                     tool_choice={"type": "function", "function": {"name": "g"}}),
    "tool_choice required without tools": chat("tool_choice", tool_choice="required"),
    "functions": chat("functions", functions=[{"name": "f"}]),
    "response_format type unknown": chat("response_format", response_format={"type": "yaml"}),
    "response_format json_schema missing": chat("response_format", response_format={"type": "json_schema"}),
    "response_format schema not an object": chat("response_format", response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
    "json schema invalid": chat("response_format", response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectx"}}}),
    "two structured outputs": chat("guided_regex", response_format={"type": "json_object"}, guided_regex="a+"),
    "guided_regex invalid": completion("guided_regex", guided_regex="(ab"),
    "guided_choice empty": completion("guided_choice", guided_choice=[]),
    "structured_outputs empty": completion("structured_outputs", structured_outputs={}),
    "grammar invalid": completion("structured_outputs", structured_outputs={"grammar": "root ::= ((("}),
    "schema with json_schema": chat("response_format", response_format={
        "type": "json_schema", "json_schema": {"name": "x"}, "schema": {}}),
    "tools and a regex": chat("guided_regex", guided_regex="a+",
                              tools=[{"type": "function", "function": {"name": "f"}}]),
    "audio": chat("audio", audio={"voice": "alloy", "format": "wav"}),
    "modalities audio": chat("modalities", modalities=["text", "audio"]),
    "chat logprobs not a bool": chat("logprobs", logprobs="yes"),
    "top_logprobs too many": chat("top_logprobs", logprobs=True, top_logprobs=100),
    "top_logprobs without logprobs": chat("top_logprobs", top_logprobs=2),
    "max_completion_tokens negative": chat("max_completion_tokens", max_completion_tokens=-1),
    "chat over the context": Bad("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 600}]},
                                 param="messages", code="context_length_exceeded"),
    # adapter routes
    "adapter path traversal": Bad("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": "../../etc"},
                                  param="lora_path"),
    "adapter absolute path": Bad("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": "/etc"},
                                 param="lora_path"),
    "adapter missing folder": Bad("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": "missing"},
                                  status=404, param="lora_path"),
    "adapter name traversal": Bad("/v1/load_lora_adapter", {"lora_name": "../../etc", "lora_path": "x"},
                                  param="lora_name"),
    "adapter name empty": Bad("/v1/load_lora_adapter", {"lora_name": "", "lora_path": "x"}, param="lora_name"),
    "adapter name of the base model": Bad("/v1/load_lora_adapter", {"lora_name": MODEL, "lora_path": "x"},
                                          param="lora_name"),
    "adapter path missing": Bad("/v1/load_lora_adapter", {"lora_name": "evil"}, param="lora_path"),
    "adapter path not a string": Bad("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": ["x"]},
                                     param="lora_path"),
    "unload unknown adapter": Bad("/v1/unload_lora_adapter", {"lora_name": "never-loaded"}, status=404,
                                    param="lora_name"),
    "unload name not a string": Bad("/v1/unload_lora_adapter", {"lora_name": 5}, param="lora_name"),
    # tokenize / detokenize
    "tokenize nothing": Bad("/tokenize", {}, param="prompt"),
    "tokenize unpaired surrogate": Bad("/tokenize", b'{"prompt": "\\ud800"}', param="prompt"),
    "tokenize prompt and messages": Bad("/tokenize", {"prompt": "hi", "messages": USER}, param="prompt"),
    "detokenize negative id": Bad("/detokenize", {"tokens": [-1]}, param="tokens"),
    "detokenize id 2**70": Bad("/detokenize", {"tokens": [2 ** 70]}, param="tokens"),
    "detokenize id out of vocabulary": Bad("/detokenize", {"tokens": [256]}, param="tokens"),
    "detokenize strings": Bad("/detokenize", {"tokens": ["a"]}, param="tokens"),
    # routes, methods, auth
    "no API key": Bad("/v1/completions", {"prompt": "hi"}, status=401, code="invalid_api_key",
                      headers={"Content-Type": "application/json", "Authorization": ""}),
    "wrong API key": Bad("/v1/models", None, status=401, code="invalid_api_key", method="GET",
                         headers={"Authorization": "Bearer nope"}),
    "wrong method": Bad("/v1/completions", None, status=405, method="GET"),
    "unknown route": Bad("/v1/nothing-here", None, status=404, method="GET"),
}


def send(client: TestClient, bad: Bad):
    headers = {**AUTH, **bad.headers}
    if headers.get("Authorization") == "":
        del headers["Authorization"]
    content = bad.body if isinstance(bad.body, bytes) or bad.body is None else json.dumps(bad.body).encode()
    return client.request(bad.method, bad.route, content=content, headers=headers)


def test_the_hostile_list_is_long():
    assert len(HOSTILE) >= 40


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_requests_get_a_4xx_with_openai_error_body(client, name):
    bad = HOSTILE[name]
    response = send(client, bad)
    assert response.status_code == bad.status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == bad.param and error["code"] == bad.code, error


ODD_VALUES = [None, True, False, -1, 0, 1, 2, 255, 2 ** 70, -2 ** 70, 2 ** 63, -2 ** 63 - 1, 1.5, -0.5, 1e308, "",
              "x", "\ud800", "a" * 300, "none", [], [1], [-1], [""], ["x"] * 3, [[1]], {}, {"a": 1}, {"1": 1},
              {"type": "text"}, [{"type": "text", "text": "x"}], ["text"]]
VALID_BODIES = {"/v1/completions": ({"prompt": "hi", "max_tokens": 2}, CompletionRequest),
                "/v1/chat/completions": ({"messages": USER, "max_tokens": 2}, ChatCompletionRequest),
                "/tokenize": ({"prompt": "hi"}, TokenizeRequest), "/detokenize": ({"tokens": [1]}, DetokenizeRequest),
                "/v1/load_lora_adapter": ({"lora_name": "x", "lora_path": "y"}, LoadLoraAdapterRequest)}


@pytest.mark.parametrize("route", VALID_BODIES)
def test_every_field_with_odd_values_never_gets_a_5xx(client, route):
    """Each field of a valid body set, in turn, to each of a list of odd JSON values: 200 or a 4xx, never a 5xx."""
    body, schema = VALID_BODIES[route]
    for name in schema.model_fields:
        for value in ODD_VALUES:
            response = client.post(route, headers={**AUTH, "Content-Type": "application/json"},
                                   content=json.dumps({**body, name: value}).encode())  # ASCII: escapes "\ud800"
            assert response.status_code < 500, (name, value, response.text)
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_after_the_hostile_list_the_server_serves_and_holds_no_kv_block(client, llm):
    for bad in HOSTILE.values():
        assert send(client, bad).status_code < 500
    response = client.post("/v1/completions", headers=AUTH,
                           json={"prompt": "hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    deadline = time.monotonic() + 10
    while llm.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = llm.stats()
    assert stats.num_running == stats.num_waiting == 0 and llm.num_free_blocks == stats.num_blocks


# ---- the contract ------------------------------------------------------------------------------------
def test_openapi_documents_every_route_body(client):
    assert client.get("/openapi.json").status_code == 401  # behind the key, as the routes it describes
    assert client.get("/docs").status_code == client.get("/redoc").status_code == 404
    doc = client.get("/openapi.json", headers=AUTH).json()
    schemas = doc["components"]["schemas"]

    def resolve(schema: dict) -> dict:
        ref = schema.get("$ref")
        if ref is None:
            return schema
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in schemas, ref
        return schemas[ref.split("/")[-1]]

    refs = [value for value in _walk(doc) if isinstance(value, str) and value.startswith("#/")]
    assert refs and all(ref.split("/")[-1] in schemas for ref in refs)  # no dangling reference
    routes = {("post", "/v1/completions"): "CompletionRequest", ("post", "/v1/chat/completions"):
              "ChatCompletionRequest", ("post", "/v1/load_lora_adapter"): "LoadLoraAdapterRequest",
              ("post", "/v1/unload_lora_adapter"): "UnloadLoraAdapterRequest",
              ("post", "/tokenize"): "TokenizeRequest", ("post", "/detokenize"): "DetokenizeRequest",
              ("get", "/v1/models"): None, ("get", "/health"): None, ("get", "/metrics"): None}
    for (method, path), request_schema in routes.items():
        operation = doc["paths"][path][method]
        if request_schema:
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert body["$ref"].endswith("/" + request_schema)
            assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
                "/ErrorResponse")
        assert all(resolve(c["schema"]) for c in operation["responses"]["200"]["content"].values())
    assert {"logit_bias", "min_p", "repetition_penalty", "echo", "seed"} <= set(schemas["CompletionRequest"]
                                                                               ["properties"])
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    assert all("422" not in op["responses"] for path in doc["paths"].values() for op in path.values())
    chat_200 = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat_200["text/event-stream"]["schema"]["$ref"].endswith("/ChatCompletionChunk")


def _walk(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
    else:
        yield node


def test_a_logprob_of_minus_infinity_is_openais_very_unlikely(llm, monkeypatch):
    """A token the model's logits rule out (-inf) has no JSON number: OpenAI's -9999.0, not a 500."""
    logits = llm.runner.logits
    monkeypatch.setattr(llm.runner, "logits", lambda *args, **kwargs: logits(*args, **kwargs).index_fill(
        -1, torch.tensor([200]), float("-inf")))
    body = {"prompt": [5, 6, 200], "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1}
    with make_client(llm) as client:
        whole = client.post("/v1/completions", headers=AUTH, json=body)
        assert whole.status_code == 200 and whole.json()["choices"][0]["logprobs"]["token_logprobs"][2] == -9999.0
        streamed = client.post("/v1/completions", headers=AUTH, json={**body, "stream": True}).text
        first = json.loads(next(line for line in streamed.splitlines() if line.startswith("data: {"))[6:])
        assert first["choices"][0]["logprobs"]["token_logprobs"][2] == -9999.0


def test_a_full_waiting_queue_gets_429_with_retry_after(llm, monkeypatch):
    body = {"prompt": "hi", "max_tokens": 2}
    with make_client(llm, max_waiting_requests=0) as client:  # an idle server takes what it can run at once
        assert client.post("/v1/completions", headers=AUTH, json=body).status_code == 200
    with make_client(llm, max_waiting_requests=2) as client:
        stats, full = llm.stats, llm.config.max_num_seqs

        def load(waiting: int, running: int) -> None:
            monkeypatch.setattr(llm, "stats", lambda: type(stats())(**{**vars(stats()), "num_waiting": waiting,
                                                                       "num_running": running}))

        load(waiting=2, running=full)
        response = client.post("/v1/completions", headers=AUTH, json=body)
        assert response.status_code == 429 and response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        load(waiting=2, running=0)  # slots free, yet two wait: the KV cache holds no more (the scheduler took what fit)
        assert client.post("/v1/completions", headers=AUTH, json=body).status_code == 429
        load(waiting=1, running=full)
        aborted = _aborted(client)
        assert client.post("/v1/completions", headers=AUTH, json={**body, "n": 2}).status_code == 429  # (room: one)
        assert _aborted(client) == aborted  # (the choice it took before it was full was never counted)
        assert client.post("/v1/completions", headers=AUTH, json=body).status_code == 200
        monkeypatch.setattr(llm, "stats", stats)
        # n choices an idle server can run and queue together are taken, at once; more are a 400, not a retry
        assert client.post("/v1/completions", headers=AUTH, json={**body, "n": full + 2}).status_code == 200
        response = client.post("/v1/completions", headers=AUTH, json={**body, "n": full + 3})
        assert response.status_code == 400 and "could never run or wait together" in response.json()["error"]["message"]


def _aborted(client: TestClient) -> float:
    metrics = client.get("/metrics").text
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("gorgon_requests_total{") and 'finish_reason="abort"' in line)


def test_messages_the_chat_template_refuses_get_a_400(client, llm, monkeypatch):
    """Llama 2's and Mistral's templates raise unless the roles alternate: the client gets the template's reason."""
    template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% endif %}{{ m['content'] }}{% endfor %}")
    monkeypatch.setattr(llm.tokenizer, "chat_template", template)
    body = {"model": MODEL, "max_tokens": 2, "messages": [*USER, *USER]}
    response = client.post("/v1/chat/completions", headers=AUTH, json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages" and "must alternate" in error["message"]
    assert client.post("/v1/chat/completions", headers=AUTH, json={**body, "messages": USER}).status_code == 200
    assert llm.num_free_blocks == llm.block_manager.num_blocks


def test_a_model_with_named_chat_templates_chats_with_its_default(client, llm, monkeypatch):
    """Hermes-style tokenizers ship several named templates ("default", "tool_use"): transformers picks the
    default one."""
    templates = {"default": "{% for m in messages %}<{{ m['content'] }}>{% endfor %}",
                 "tool_use": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"}
    monkeypatch.setattr(llm.tokenizer, "chat_template", templates)
    r = client.post("/tokenize", headers=AUTH, json={"messages": USER, "add_generation_prompt": False})
    assert r.status_code == 200 and r.json()["tokens"] == llm.tokenizer("<hi>", add_special_tokens=False)["input_ids"]
    chat = client.post("/v1/chat/completions", headers=AUTH, json={"messages": USER, "max_tokens": 2})
    assert chat.status_code == 200


def test_cors_origins_are_allowed(llm):
    with make_client(llm, cors_origins=["https://app.example"]) as client:
        preflight = client.options("/v1/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        other = client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_chat_template_variables_and_a_continued_answer(client, llm, oracle, monkeypatch):
    """vLLM's chat_template_kwargs (Qwen3's enable_thinking is one) reach the template; continue_final_message
    writes the last assistant message without closing it, so the answer continues it; both checked."""
    template = ("{% if think %}<think>{% endif %}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                "{% if not (continue_final_message and loop.last) %}</{{ m['role'] }}>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    monkeypatch.setattr(llm.tokenizer, "chat_template", template)

    def tokens(**fields) -> list[int]:
        response = client.post("/tokenize", headers=AUTH, json={"messages": USER, **fields})
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    assert llm.tokenizer.decode(tokens(chat_template_kwargs={"think": True})) == "<think><user>hi</user><assistant>"
    monkeypatch.setattr(llm.config, "chat_template_kwargs", {"think": True})  # --default-chat-template-kwargs
    assert llm.tokenizer.decode(tokens()) == "<think><user>hi</user><assistant>"
    assert llm.tokenizer.decode(tokens(chat_template_kwargs={"think": False})) == "<user>hi</user><assistant>"
    monkeypatch.setattr(llm.config, "chat_template_kwargs", {})
    prefill = [*USER, {"role": "assistant", "content": "Sure, "}]
    assert llm.tokenizer.decode(tokens(messages=prefill, add_generation_prompt=False,
                                       continue_final_message=True)) == "<user>hi</user><assistant>Sure, "
    body = {"model": MODEL, "messages": prefill, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "add_generation_prompt": False, "continue_final_message": True, "return_token_ids": True}
    answer = client.post("/v1/chat/completions", headers=AUTH, json=body).json()
    want = oracle.generate(llm.tokenizer("<user>hi</user><assistant>Sure, ", add_special_tokens=False)["input_ids"],
                        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert answer["choices"][0]["token_ids"] == want.token_ids
    for fields, param in [({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
                          ({"chat_template_kwargs": {"messages": 1}}, "chat_template_kwargs"),
                          ({"continue_final_message": True}, "continue_final_message"),
                          ({"messages": prefill, "continue_final_message": True}, "continue_final_message")]:
        response = client.post("/v1/chat/completions", headers=AUTH, json={**body, "add_generation_prompt": True,
                                                                           "continue_final_message": False,
                                                                           "messages": USER, **fields})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    # a template that drops the assistant's text leaves continue_final_message nothing to continue
    monkeypatch.setattr(llm.tokenizer, "chat_template", "{% for m in messages %}{% if m['role'] == 'user' %}"
                                                        "{{ m['content'] }}{% endif %}{% endfor %}")
    response = client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages", response.text


def test_tokenize_and_detokenize_round_trip(client, llm):
    response = client.post("/tokenize", headers=AUTH, json={"prompt": "def f(x):", "return_token_strs": True})
    assert response.status_code == 200, response.text
    got = response.json()
    want = llm.tokenizer("def f(x):")["input_ids"]
    assert got["tokens"] == want and got["count"] == len(want) and got["max_model_len"] == llm.max_model_len
    assert len(got["token_strs"]) == len(want)
    chat_tokens = client.post("/tokenize", headers=AUTH, json={"messages": USER}).json()["tokens"]
    assert chat_tokens == chat_prompt_ids(llm.tokenizer, ChatCompletionRequest(messages=USER), {})
    text = client.post("/detokenize", headers=AUTH, json={"tokens": want}).json()["prompt"]
    assert text == llm.tokenizer.decode(want)


def test_models_report_the_context_length(client, llm):
    card = client.get("/v1/models", headers=AUTH).json()["data"][0]
    assert card["id"] == MODEL and card["max_model_len"] == llm.max_model_len


def test_echo_prepends_the_prompt(client, llm):
    body = {"prompt": "def f(x):", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = client.post("/v1/completions", headers=AUTH, json=body).json()["choices"][0]["text"]
    echoed = client.post("/v1/completions", headers=AUTH, json={**body, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "def f(x):" + plain
    ids = llm.tokenizer("def f(x):")["input_ids"]
    by_ids = client.post("/v1/completions", headers=AUTH, json={**body, "prompt": ids, "echo": True}).json()
    assert by_ids["choices"][0]["text"] == llm.tokenizer.decode(ids) + plain
    with client.stream("POST", "/v1/completions", headers=AUTH, json={**body, "echo": True, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"].startswith("def f(x):")
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_reports_the_prompt_tokens_first(client, llm, oracle, stream):
    ids = llm.tokenizer("def f(x):")["input_ids"]
    want = oracle.generate(ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2,
                                            prompt_logprobs=2))[0]
    body = {"prompt": ids, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "echo": True, "logprobs": 2}
    if stream:
        with client.stream("POST", "/v1/completions", headers=AUTH, json={**body, "stream": True}) as r:
            chunks = [json.loads(line[6:])["choices"][0] for line in r.iter_lines() if line.startswith("data: {")]
        got = {key: sum((c["logprobs"][key] for c in chunks), []) for key in ("tokens", "token_logprobs",
                                                                             "top_logprobs", "text_offset")}
        text = "".join(c["text"] for c in chunks)
    else:
        choice = client.post("/v1/completions", headers=AUTH, json=body).json()["choices"][0]
        got, text = choice["logprobs"], choice["text"]
    all_ids = ids + want.token_ids
    assert got["tokens"] == [llm.tokenizer.decode([t]) for t in all_ids]
    assert text == llm.tokenizer.decode(ids) + want.text
    assert got["text_offset"] == [len("".join(got["tokens"][:i])) for i in range(len(all_ids))]
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    entries = want.prompt_logprobs[1:] + want.logprobs
    assert got["token_logprobs"][1:] == pytest.approx([lp for lp, _ in entries], abs=1e-4)
    for top, (_, alternatives) in zip(got["top_logprobs"][1:], entries, strict=True):
        want_top = {llm.tokenizer.decode([t]): v for t, v in alternatives.items()}
        assert top == pytest.approx(want_top, abs=1e-4)


@pytest.mark.parametrize("strict", [True, False, None])
def test_a_strict_json_schema_admits_no_keys_it_does_not_list(strict):
    """As OpenAI's strict mode: an object that lists its properties and says nothing of others is closed (a small
    model otherwise adds keys of its own); without strict the schema is taken as written (JSON Schema: open)."""
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": strict}}
    spec = ChatCompletionRequest.model_validate({"messages": USER, "response_format": fmt}).structured_output
    closed = {"additionalProperties": False} if strict else {}
    assert spec.json == {**schema, **closed, "properties": {"a": {**schema["properties"]["a"], **closed}}}


def test_a_structured_output_that_fails_mid_answer_is_a_400(client):
    """Whole: a 400 in OpenAI's format; streamed: the error in-band, then [DONE] (it was a "stop" with a cut answer)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^a{1000000}$"}}}
    body = {"messages": USER, "max_tokens": 8, "response_format": fmt}
    whole = client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert whole.status_code == 400 and whole.json()["error"]["code"] == "structured_output_failed"
    streamed = client.post("/v1/chat/completions", headers=AUTH, json={**body, "stream": True}).text
    events = [line[6:] for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "structured_output_failed"
    assert not any("finish_reason" in event and '"stop"' in event for event in events)


def test_accepted_unused_openai_fields(client):
    body = {"messages": USER, "max_tokens": 2, "user": "u-1", "store": False, "metadata": {"k": "v"},
            "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"],
            "parallel_tool_calls": False, "stop": "\n\n", "prompt_cache_key": "k", "safety_identifier": "s",
            "prompt_cache_retention": "24h", "verbosity": "medium",
            "spaces_between_special_tokens": False}  # (vLLM's: fast tokenizers decode with no spaces anyway)
    assert client.post("/v1/chat/completions", headers=AUTH, json=body).status_code == 200
    refused = client.post("/v1/chat/completions", headers=AUTH, json={"messages": USER, "verbosity": "low"})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "verbosity is not supported by this server"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}],
             "max_tokens": 2}
    assert client.post("/v1/chat/completions", headers=AUTH, json=parts).status_code == 200


def test_what_real_clients_send_is_accepted(client):
    """Nulls for "the default" (an SDK passes its callers' None), an answer sent back as the SDK dumps it (empty
    refusal, annotations, audio; calls rebuilt from a stream, with their index), a JSON body without a content type
    (not form-encoded), and several text parts of a message, on lines of their own (as vLLM joins them)."""
    nulls = {"messages": USER, "max_tokens": 2, "temperature": None, "top_p": None, "n": None, "stream": None,
             "presence_penalty": None, "logprobs": None, "parallel_tool_calls": None, "seed": None}
    assert client.post("/v1/chat/completions", headers=AUTH, json=nulls).status_code == 200
    dumped = {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
              "function_call": None, "tool_calls": [{"id": "c1", "type": "function", "index": 0,
                                                     "function": {"name": "f", "arguments": "{}"}}]}
    history = [*USER, dumped, {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    r = client.post("/v1/chat/completions", headers=AUTH, json={"messages": history, "max_tokens": 2})
    assert r.status_code == 200, r.text
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    assert client.post("/v1/completions", headers=AUTH, content=body).status_code == 200
    form = client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
                       content=body)  # (a browser posts these cross-site without a preflight)
    assert form.status_code == 415

    def tokens(content: object) -> list[int]:
        return client.post("/tokenize", headers=AUTH, json={"messages": [{"role": "user", "content": content}]}
                           ).json()["tokens"]

    assert tokens([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == tokens("a\nb")
    # the OpenAI routes without /v1 (a client given the bare host, as llama.cpp's server takes it)
    assert client.post("/chat/completions", headers=AUTH, json={"messages": USER, "max_tokens": 2}).status_code == 200
    assert client.get("/models", headers=AUTH).json()["data"] == client.get("/v1/models", headers=AUTH).json()["data"]


def test_unsupported_fields_are_named_in_the_message(client):
    error = send(client, HOSTILE["functions"]).json()["error"]
    assert error["message"] == "functions is not supported by this server"
    error = send(client, HOSTILE["json schema invalid"]).json()["error"]
    assert error["message"] == "the structured output cannot be used: Invalid type: objectx"
    error = send(client, HOSTILE["two structured outputs"]).json()["error"]
    assert error["message"] == "give one structured output, not guided_regex and response_format"
    error = send(client, HOSTILE["unknown field"]).json()["error"]
    assert "frobnicate" in error["message"]
    error = send(client, HOSTILE["content an image"]).json()["error"]
    assert error["message"] == ("messages: content parts of type 'image_url' are not supported by this server: "
                                "it takes text only")
    error = send(client, HOSTILE["role function"]).json()["error"]
    assert error["message"] == ("messages: function messages and calls (OpenAI's deprecated functions) are not "
                                "supported by this server: use tools")


def test_a_developer_message_is_a_system_message_and_names_are_accepted(client):
    def tokens(messages: list[dict]) -> list[int]:
        r = client.post("/tokenize", headers=AUTH, json={"messages": messages})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    system = tokens([{"role": "system", "content": "be brief"}, *USER])
    assert tokens([{"role": "developer", "content": "be brief"}, *USER]) == system
    assert tokens([{"role": "system", "content": "be brief", "name": "rules"}, {**USER[0], "name": "ann"}]) == system
    body = {"messages": [{"role": "developer", "content": "be brief"}, {**USER[0], "name": "ann"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", headers=AUTH, json=body).status_code == 200


def test_return_token_ids(client, llm, oracle):
    body = {"prompt": [1, 40, 41], "max_tokens": 5, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    want = oracle.generate([1, 40, 41], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    got = client.post("/v1/completions", headers=AUTH, json=body).json()
    choice = got["choices"][0]  # a completion's prompt ids are per choice, as vLLM has them
    assert choice["prompt_token_ids"] == [1, 40, 41] and choice["token_ids"] == want.token_ids
    with client.stream("POST", "/v1/completions", headers=AUTH, json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == [1, 40, 41]
    assert "prompt_token_ids" not in chunks[1]["choices"][0]
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == want.token_ids
    plain = client.post("/v1/completions", headers=AUTH, json={**body, "return_token_ids": False}).json()
    assert "prompt_token_ids" not in plain["choices"][0] and "token_ids" not in plain["choices"][0]  # OpenAI's
    chat = client.post("/v1/chat/completions", headers=AUTH,
                       json={"messages": USER, "max_tokens": 3, "return_token_ids": True}).json()
    assert chat["prompt_token_ids"] == chat_prompt_ids(llm.tokenizer, ChatCompletionRequest(messages=USER), {})
    assert len(chat["choices"][0]["token_ids"]) == chat["usage"]["completion_tokens"]


def test_a_server_without_tokenizer_takes_token_ids(tiny_model_dir, llm):
    bare = LLM(tiny_model_dir, skip_tokenizer_init=True, **ENGINE_KWARGS)
    want = llm.generate([1, 40, 41], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=1))[0]
    with make_client(bare) as client:
        got = client.post("/v1/completions", headers=AUTH, json={
            "prompt": [1, 40, 41], "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 1}).json()
        choice = got["choices"][0]
        assert choice["token_ids"] == want.token_ids and choice["text"] == ""
        assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in want.token_ids]
        for body, route, param in [({"prompt": "hi"}, "/v1/completions", "prompt"),
                                   ({"messages": USER}, "/v1/chat/completions", "messages"),
                                   ({"prompt": "hi"}, "/tokenize", "prompt"),
                                   ({"tokens": [1]}, "/detokenize", "tokens"),
                                   ({"prompt": [1, 256]}, "/v1/completions", None),
                                   ({"prompt": [1], "logit_bias": {"256": 1}}, "/v1/completions", None)]:
            response = client.post(route, headers=AUTH, json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_a_local_server_answers_only_requests_to_a_loopback_name(llm):
    """DNS rebinding: a web page whose domain now resolves to 127.0.0.1 is of this server's origin to the browser,
    but its requests name its own domain."""
    with make_client(llm, loopback_hosts_only=True) as client:
        for host in ("localhost:8000", "127.0.0.1:8000", "127.0.0.2", "[::1]:8000", "app.localhost", "LOCALHOST"):
            assert client.get("/v1/models", headers={**AUTH, "Host": host}).status_code == 200, host
        for host in ("attacker.example:8000", "localhost.attacker.example", "10.0.0.1", "[::2]:80", ""):
            for route in ("/v1/models", "/"):
                response = client.get(route, headers={**AUTH, "Host": host})
                assert response.status_code == 403 and response.json()["error"]["code"] == "host_not_allowed", host
        response = client.post("/v1/completions", headers={**AUTH, "Host": "attacker.example"}, json={"prompt": "hi"})
        assert response.status_code == 403
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


def test_pages_of_this_server_and_of_the_origins_it_allows_may_post(llm, oracle):
    """The cross-site check leaves the playground (same origin), clients that are no browser, and the origins
    --cors-origins names."""
    body = b'{"prompt": "hi", "max_tokens": 2}'
    page = {**AUTH, "Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site"}
    with make_client(llm, cors_origins=["http://localhost:3000"]) as allowing, make_client(oracle) as own:
        assert allowing.post("/v1/completions", content=body, headers=page).status_code == 200
        assert own.post("/v1/completions", content=body, headers=page).status_code == 403
        for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {}):
            assert own.post("/v1/completions", content=body, headers={**AUTH, **headers}).status_code == 200


def test_an_unexpected_failure_is_a_500_in_openai_format_that_keeps_its_details_in_the_log(client, monkeypatch,
                                                                                         caplog):
    """A bug behind a route: OpenAI's error body, status 500; the exception's text (here a path of the server's)
    goes to the log only; the server goes on answering."""
    def broken(*args):
        raise RuntimeError("cannot read /srv/private/weights.bin")

    monkeypatch.setattr("server.openai_routes.model_cards", broken)
    with caplog.at_level("ERROR", logger="gorgon"):
        r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "internal_error" and "RuntimeError" in error["message"]
    assert "/srv/private" not in r.text and "/srv/private" in caplog.text
    # once a stream's status line is sent, the failure comes in-band, as plain
    monkeypatch.setattr("server.generation.step_info", broken)
    r = client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "hi", "max_tokens": 4,
                                                            "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.status_code == 200 and events[-1]["error"]["type"] == "internal_error"
    assert "RuntimeError" in events[-1]["error"]["message"] and "/srv/private" not in r.text
    monkeypatch.setattr("server.responses_api.checked", broken)  # the Responses API's stream, the same
    caplog.clear()
    with caplog.at_level("WARNING", logger="gorgon"):
        r = client.post("/v1/responses", headers=AUTH, json={"model": MODEL, "input": "hi", "max_output_tokens": 4,
                                                              "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["type"] == "error" and "RuntimeError" in events[-1]["message"]
    assert "/srv/private" not in r.text and "/srv/private" in caplog.text
    monkeypatch.undo()
    assert client.get("/v1/models", headers=AUTH).status_code == 200
