"""The HTTP server through the official `openai` client (and raw httpx for what the client hides), against
a real uvicorn server on a loopback port. The oracle is a second engine on the same weights, run in-process."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
import torch
import uvicorn
from openai.types.responses import Response, ResponseStreamEvent
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, TypeAdapter

from engine import LLM, SamplingParams, StructuredOutput
from models.medusa import MedusaConfig, MedusaHeads, save_medusa_heads
from server.app import Server, ServerConfig, create_app
from server.async_engine import MAX_FAILED_PROMPTS, AsyncEngine, EngineError, EngineStopped, RequestStream
from server.metrics import ServerMetrics
from server.prompts import FALLBACK_CHAT_TEMPLATE

from conftest import hf_model

KEY = "test-key"
MODEL = "tiny"
PROMPTS = ["def f(x):", "import os\n", "hello", "class A:", "for i in range(3):", "x = 1"]
ENGINE_KWARGS = dict(num_kv_blocks=96, block_size=8, max_num_seqs=8)


@dataclass
class Running:
    url: str
    llm: LLM
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def serve(llm: LLM, shutdown_timeout: float = 5.0, **config) -> Running:
    """Start a uvicorn server in a thread on a free loopback port (the socket is bound first: no race)."""
    app = create_app(llm, ServerConfig(model_name=MODEL, model_root="/models/tiny", **config))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = Server(app, shutdown_timeout, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return Running(f"http://127.0.0.1:{sock.getsockname()[1]}", llm, server, thread)


def build_adapter(model_dir: Path, config, folder: Path) -> None:
    model = get_peft_model(hf_model(model_dir), config)
    torch.manual_seed(0)
    with torch.no_grad():  # PEFT's init makes LoRA a no-op; random weights make its effect visible
        for name, p in model.named_parameters():
            if "lora_" in name or "prompt_encoder" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def adapter_root(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("server_adapters")
    build_adapter(tiny_model_dir, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), root / "lora")
    build_adapter(tiny_model_dir, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), root / "prefix")
    return root


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, adapter_root) -> LLM:
    llm = LLM(tiny_model_dir, adapter_root=str(adapter_root), **ENGINE_KWARGS)
    llm.load_adapter("lora", "lora")
    llm.load_adapter("prefix", "prefix")
    return llm


@pytest.fixture(scope="module")
def running(tiny_model_dir, adapter_root):
    llm = LLM(tiny_model_dir, adapter_root=str(adapter_root), **ENGINE_KWARGS)
    running = serve(llm, api_key=KEY, max_request_bytes=4096)
    yield running
    running.stop()


@pytest.fixture
def client(running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)


def greedy(prompt: str | list[int], oracle: LLM, n: int, adapter: str | None = None):
    return oracle.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0),
                           adapter=adapter)[0]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, chat_template=FALLBACK_CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def metrics(running: Running) -> dict[str, float]:
    """Every sample as 'name{label="value",...}' -> value."""
    text = httpx.get(f"{running.url}/metrics").text
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_until_idle(running: Running, timeout: float = 20.0) -> dict[str, float]:
    """Metrics once no request is running or waiting and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(running)
        if (m["gorgon_requests_running{}"] == 0 and m["gorgon_requests_waiting{}"] == 0
                and m["gorgon_kv_blocks_free{}"] == m["gorgon_kv_blocks_total{}"]):
            return m
        assert time.monotonic() < deadline, f"the engine did not drain: {m}"
        time.sleep(0.05)


def aborted(m: dict[str, float], model: str = MODEL) -> float:
    return m.get("gorgon_requests_total" + json.dumps({"finish_reason": "abort", "model": model}, sort_keys=True), 0.0)


# ---- completions and chat ----------------------------------------------------------------------------
def test_completion_matches_the_engine_token_for_token(client, oracle):
    want = greedy("def f(x):", oracle, 10)
    got = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=10, temperature=0, logprobs=1,
                                    extra_body={"ignore_eos": True})
    choice = got.choices[0]
    assert choice.text == want.text and choice.finish_reason == "length"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids) and got.usage.completion_tokens == 10
    assert choice.logprobs.tokens == [oracle.tokenizer.decode([t]) for t in want.token_ids]
    assert max(abs(a - b) for a, (b, _) in zip(choice.logprobs.token_logprobs, want.logprobs)) < 1e-4
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs)


def test_a_request_without_sampling_takes_the_models_recommended_sampling(tiny_model_dir, oracle, tmp_path):
    """A model whose generation_config.json recommends greedy decoding: requests that say nothing of temperature
    decode greedily (vLLM's --generation-config auto), one that sets it samples; /v1/responses reports the value."""
    folder = tmp_path / "greedy_model"
    folder.mkdir()
    for file in tiny_model_dir.iterdir():
        (folder / file.name).symlink_to(file)
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.0}))
    running = serve(LLM(folder, **ENGINE_KWARGS))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
        want = greedy("def f(x):", oracle, 12).text
        texts = [client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=12, seed=seed,
                                           extra_body={"ignore_eos": True}).choices[0].text for seed in (1, 2)]
        assert texts == [want, want]
        sampled = [client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=12, temperature=1.0,
                                             seed=seed, extra_body={"ignore_eos": True}).choices[0].text
                   for seed in (1, 2, 3)]
        assert any(text != want for text in sampled)
        assert client.responses.create(model=MODEL, input="hi", max_output_tokens=2).temperature == 0.0
        assert client.responses.create(model=MODEL, input="hi", max_output_tokens=2, temperature=0.5).temperature == 0.5
    finally:
        running.stop()


def test_usage_counts_the_prompt_tokens_the_prefix_cache_held(client, running):
    """OpenAI's usage.prompt_tokens_details.cached_tokens (and the Responses API's input_tokens_details), and the
    metric that sums them: a prompt asked again finds its full KV blocks cached (block_size 8 here)."""
    prompt = "a prompt long enough to fill a few blocks of the cache: " + "x = 1\n" * 6
    before = wait_until_idle(running)["gorgon_prompt_tokens_cached_total{}"]
    first, again = (client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
                    for _ in range(2))
    wait_until_idle(running)
    assert metrics(running)["gorgon_prompt_tokens_cached_total{}"] - before == (
        first.usage.prompt_tokens_details.cached_tokens + again.usage.prompt_tokens_details.cached_tokens)
    blocks = (first.usage.prompt_tokens - 1) // 8 * 8  # full blocks (the last token is computed again)
    assert first.usage.prompt_tokens_details.cached_tokens < blocks <= again.usage.prompt_tokens_details.cached_tokens
    assert again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    answers = [client.responses.create(model=MODEL, input=prompt, max_output_tokens=2, temperature=0)
               for _ in range(2)]
    assert answers[1].usage.input_tokens_details.cached_tokens >= 8


def test_a_cache_salt_shares_the_prefix_cache_only_with_the_same_salt(client):
    """vLLM's cache_salt: a tenant's requests find only their own prompts' K/V (another tenant's cached_tokens, or
    speed, showed which prompts the others had sent)."""
    prompt = "the secret record of a patient, long enough for a few cache blocks: " + "y = 2\n" * 6

    def cached(salt: str | None) -> int:
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                        extra_body={"cache_salt": salt} if salt else None)
        return got.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0 and cached(None) == 0  # neither another salt nor none finds it
    assert cached("tenant-a") >= 8


def test_stop_token_ids_end_the_answer_with_that_token(client, oracle):
    """vLLM's stop_token_ids (the way to stop a server without a tokenizer, whose stop strings cannot match)."""
    full = greedy("def f(x):", oracle, 12)
    stop = full.token_ids[5]
    got = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [stop], "return_token_ids": True})
    assert got.choices[0].token_ids == full.token_ids[:full.token_ids.index(stop) + 1]
    assert got.choices[0].finish_reason == "stop" and got.choices[0].stop_reason == stop  # (vLLM's)
    plain = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=3, temperature=0)
    assert plain.choices[0].stop_reason is None
    with pytest.raises(openai.BadRequestError, match="stop_token_ids"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"stop_token_ids": [10**6]})


def test_min_tokens_holds_back_stop_tokens_and_strings(client, oracle):
    """vLLM's min_tokens: the answer's first min_tokens tokens are never a stop token (masked: the greedy answer
    is the one whose logits bias the stop token away), and no stop string ends it before them."""
    full = greedy("def f(x):", oracle, 12)
    stop = full.token_ids[1]
    banned = oracle.generate("def f(x):", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                         logit_bias={stop: -100.0}))[0]
    got = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [stop], "min_tokens": 6,
                                                "return_token_ids": True}).choices[0]
    assert got.token_ids[:6] == banned.token_ids and stop not in got.token_ids[:6]
    assert got.finish_reason == "length" or (got.token_ids[-1] == stop and len(got.token_ids) > 6)
    first_text = oracle.tokenizer.decode(full.token_ids[:1])
    text = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=12, temperature=0, stop=[first_text],
                                     extra_body={"ignore_eos": True, "min_tokens": 3}).choices[0].text
    assert len(text) > len(first_text)  # the stop string, found in the first token's text, did not end it there
    with pytest.raises(openai.BadRequestError, match="min_tokens 9 exceeds") as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=8, extra_body={"min_tokens": 9})
    assert e.value.body["param"] == "min_tokens"


def test_a_reasoning_parser_splits_reasoning_from_content(tiny_model_dir):
    """--reasoning-parser qwen3: an answer (made to reason by a regex that writes the tags itself, so it constrains
    the reasoning too) comes as reasoning_content and content, whole and streamed alike; an answer that opens no
    <think> is all content; nothing else changes the text."""
    running = serve(LLM(tiny_model_dir, **ENGINE_KWARGS), reasoning_parser="qwen3")
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
        args = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=24, temperature=0,
                    extra_body={"structured_outputs": {"regex": "<think>[a-z]{4}</think>\n\n[a-z]{3}"}})
        message = client.chat.completions.create(**args).choices[0].message
        reasoning, content = message.model_extra["reasoning_content"], message.content
        assert len(reasoning) == 4 and len(content) == 3 and reasoning.isalpha() and content.isalpha()
        chunks = [c.choices[0].delta for c in client.chat.completions.create(stream=True, **args) if c.choices]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in chunks) == reasoning
        assert "".join(d.content or "" for d in chunks) == content
        plain = client.chat.completions.create(**{**args, "extra_body": {"structured_outputs": {"regex": "[a-z]{5}"}}})
        assert len(plain.choices[0].message.content) == 5
        assert "reasoning_content" not in plain.choices[0].message.model_dump(exclude_none=True)
        history = [{"role": "user", "content": "hi"}, message.model_dump(exclude_none=True),  # sent back as it came
                   {"role": "user", "content": "again"}]
        assert client.chat.completions.create(model=MODEL, messages=history, max_tokens=2).choices
        cut = client.chat.completions.create(**{**args, "max_tokens": 9}).choices[0].message  # reasoning alone
        assert cut.content is None and cut.model_extra["reasoning_content"]
        history[1] = cut.model_dump(exclude_none=True)
        assert client.chat.completions.create(model=MODEL, messages=history, max_tokens=2).choices
        with pytest.raises(openai.BadRequestError, match="structured output"):  # two at once: a 400, not a 500
            client.chat.completions.create(**{**args, "response_format": {"type": "json_object"}})
    finally:
        running.stop()
    # deepseek_r1: its prompt opens the reasoning, and a structured output constrains what follows it (as vLLM's);
    # the tiny model never closes it, so all of this answer is reasoning, free of the regex
    running = serve(LLM(tiny_model_dir, **ENGINE_KWARGS), reasoning_parser="deepseek_r1")
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
        choice = client.chat.completions.create(**{**args, "extra_body": {"structured_outputs": {
            "regex": "[a-z]{5}"}}}).choices[0]
        assert choice.message.content is None and choice.finish_reason == "length"
        assert not re.fullmatch("[a-z]{0,5}", choice.message.model_extra["reasoning_content"])
        # the Responses API: the reasoning is an item of its own, streamed as reasoning_text events, and sent back
        whole = client.responses.create(model=MODEL, input="hi", max_output_tokens=12, temperature=0)
        (item,) = whole.output
        assert item.type == "reasoning" and item.content[0].text and whole.output_text == ""
        assert 0 < whole.usage.output_tokens_details.reasoning_tokens <= 12
        events = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=12, temperature=0,
                                              stream=True))
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == item.content[0].text
        again = [{"role": "user", "content": "hi"}, *[i.model_dump(exclude_none=True) for i in whole.output],
                 {"role": "user", "content": "and?"}]
        assert client.responses.create(model=MODEL, input=again, max_output_tokens=2).output
    finally:
        running.stop()


def test_completion_accepts_token_ids_and_stop_strings(client, oracle):
    want = greedy([1, 40, 41, 42], oracle, 12)
    stop = want.text[3:5]
    got = client.completions.create(model=MODEL, prompt=[1, 40, 41, 42], max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].finish_reason == "stop" and got.choices[0].text == want.text[:want.text.find(stop)]


def test_chat_uses_the_fallback_template_and_reports_logprobs(client, oracle):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    want = greedy(chat_prompt_ids(oracle.tokenizer, messages), oracle, 8)
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True})
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids) and got.usage.completion_tokens == 8
    assert len(choice.logprobs.content) == 8 and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    # tokens that hold parts of characters read as U+FFFD, but their bytes are their own, and join into the text
    word = "é日😀"
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, logprobs=True,
                                         extra_body={"guided_choice": [word]}).choices[0]
    assert got.message.content == word and any(t.token == "\ufffd" for t in got.logprobs.content)
    assert b"".join(bytes(t.bytes) for t in got.logprobs.content).decode() == word


def test_streams_end_with_done_and_equal_the_whole_answers(client, running):
    args = dict(model=MODEL, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt="hello", **args).choices[0].text
    chunks = list(client.completions.create(prompt="hello", stream=True, stream_options={"include_usage": True},
                                            **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"

    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(messages=messages, **args).choices[0].message.content
    options = {"include_obfuscation": False, "include_usage": True, "continuous_usage_stats": True}  # (SDK's; vLLM's)
    chunks = list(client.chat.completions.create(messages=messages, stream=True, stream_options=options, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason == "length" and not chunks[-1].choices
    counts = [c.usage.completion_tokens for c in chunks[1:]]  # every chunk after the role's: its usage so far
    assert counts == sorted(counts) and counts[-1] == 12 and len({c.created for c in chunks}) == 1

    with httpx.stream("POST", f"{running.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "hi", "max_tokens": 3, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"


class Verdict(BaseModel):
    verdict: Literal["yes", "no", "unsure"]
    sure: bool


def test_a_predicted_output_speeds_up_the_same_answer(tiny_model_dir, client, oracle):
    """OpenAI's Predicted Outputs: the answer is the same with any prediction; usage counts the prediction's tokens
    the answer repeats; on a server that drafts by lookup, the prediction's tokens are verified several a step."""
    messages = [{"role": "user", "content": "write something long"}]
    letters = oracle.tokenizer("abcdefghijklmnopqrstuvwxyz", add_special_tokens=False)["input_ids"]
    # letters only: an answer whose text tokenizes back to its tokens (the random model's bytes are no UTF-8)
    args = dict(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                logit_bias=dict.fromkeys(map(str, letters), 100), extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**args)
    answer = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details is None
    ids = oracle.tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert len(ids) == 40
    for prediction, accepted in ((answer, len(ids)), ([{"type": "text", "text": answer[:20]}], None), ("zzzz", None)):
        got = client.chat.completions.create(prediction={"type": "content", "content": prediction}, **args)
        assert got.choices[0].message.content == answer
        details = got.usage.completion_tokens_details
        predicted = len(oracle.tokenizer(prediction if isinstance(prediction, str) else prediction[0]["text"],
                                         add_special_tokens=False)["input_ids"])
        assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == predicted
        if accepted is not None:
            assert details.accepted_prediction_tokens == accepted and details.rejected_prediction_tokens == 0
    r = httpx.post(f"{client.base_url}chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={**args, "prediction": {"type": "text", "content": "x"}, "extra_body": None})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prediction"), r.text
    # a prediction no answer could repeat (its difflib count took seconds a choice on the event loop)
    with pytest.raises(openai.BadRequestError, match="the prediction has .* tokens, more than this model's context"):
        client.chat.completions.create(prediction={"type": "content", "content": answer * 60}, **args)
    lookup = serve(LLM(tiny_model_dir, medusa="lookup", **ENGINE_KWARGS))
    try:
        body = {**{k: v for k, v in args.items() if k != "extra_body"}, "ignore_eos": True, "stream": True,
                "prediction": {"type": "content", "content": answer}, "logprobs": True, "top_logprobs": 2}
        with httpx.stream("POST", f"{lookup.url}/v1/chat/completions", json=body) as response:  # the chunks' "gorgon"
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == answer
        steps = [c["gorgon"]["step_tokens"] for c in chunks if "gorgon" in c]
        assert sum(steps) == 40 and len(steps) <= 40 // 3  # chains of 4 drafts from the prediction accepted
        # logprobs speculate too: each accepted token's, as plain decoding gives them
        streamed = [t for c in chunks for t in (c["choices"][0].get("logprobs") or {}).get("content", [])]
        whole = client.chat.completions.create(logprobs=True, top_logprobs=2, **args).choices[0].logprobs.content
        assert [t["token"] for t in streamed] == [t.token for t in whole] and len(whole) == 40
        assert [t["logprob"] for t in streamed] == pytest.approx([t.logprob for t in whole], abs=1e-4)
        assert [len(t["top_logprobs"]) for t in streamed] == [2] * 40
    finally:
        lookup.stop()


def test_responses_api_answers_as_chat_completions_do(client, oracle):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    got = client.responses.create(model=MODEL, instructions="be brief", input="hi", max_output_tokens=6, temperature=0)
    assert got.output_text == chat.choices[0].message.content and got.output[0].role == "assistant"
    assert got.usage.input_tokens == chat.usage.prompt_tokens == len(chat_prompt_ids(oracle.tokenizer, messages))
    assert got.usage.output_tokens == chat.usage.completion_tokens
    cut = chat.choices[0].finish_reason == "length"
    assert got.status == ("incomplete" if cut else "completed")
    assert (got.incomplete_details.reason if cut else got.incomplete_details) == ("max_output_tokens" if cut else None)
    # input as messages, an earlier answer's output message among them
    turns = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}, got.output[0].model_dump(),
             {"role": "user", "content": "again"}]
    again = client.responses.create(model=MODEL, input=turns, max_output_tokens=6, temperature=0)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": got.output_text},
               {"role": "user", "content": "again"}]
    assert again.output_text == client.chat.completions.create(model=MODEL, messages=history, max_tokens=6,
                                                               temperature=0).choices[0].message.content
    # what an SDK sends along that cannot change the answer (nulls, OpenAI's defaults, cache hints)
    same = client.responses.create(model=MODEL, instructions="be brief", input="hi", max_output_tokens=6,
                                   temperature=0, top_p=None, text={"verbosity": "medium"}, top_logprobs=0,
                                   reasoning={"effort": None}, prompt_cache_retention="24h",
                                   include=["reasoning.encrypted_content"])
    assert same.output_text == got.output_text


def test_responses_api_streams_its_events_in_order(client):
    args = dict(model=MODEL, input="hello", max_output_tokens=10, temperature=0)
    whole = client.responses.create(**args)
    events = list(client.responses.create(stream=True, **args))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events[4:-4]) == events[-4].text == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    # (the same but for the prefix cache's hits: the second request finds the first's prompt there)
    assert events[-1].response.usage.model_dump(exclude={"input_tokens_details"}) == whole.usage.model_dump(
        exclude={"input_tokens_details"})
    # every field the SDK's types require (the SDK itself builds them unchecked), and OpenAI's ids
    Response.model_validate(whole.to_dict())
    for event in events:
        TypeAdapter(ResponseStreamEvent).validate_python(event.to_dict())
    assert whole.id.startswith("resp_") and whole.output[0].id.startswith("msg_")
    assert (whole.completed_at is None) == (whole.status == "incomplete")  # (only a completed one has it)


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),  # function tools only
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "hi", "max_output_tokens": 1 << 20}, "max_output_tokens"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "schema": []}}}, "text"),
    ({"input": []}, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),  # (nothing stored to refer to)
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, "input"),  # (answers no call)
    ({"input": [{"role": "user", "content": None}]}, "input"),
    ({"input": "hi", "truncation": "auto"}, "truncation"),
    ({"input": "hi", "stream_options": {"include_obfuscation": False}}, "stream_options"),  # (not streamed)
    ({"input": "hi", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),  # (OpenAI's limits: 16 pairs)
    ({"input": "hi", "metadata": {"k": "v" * 513}}, "metadata"),
])
def test_responses_api_refuses_what_it_does_not_serve_by_name(running, body, param):
    r = httpx.post(f"{running.url}/v1/responses", json={"model": MODEL, **body},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert not r.json()["error"]["message"].startswith("input: Input should be a valid string")  # (items only)


def test_responses_api_errors_name_its_fields_not_the_requests_values(running):
    tools = [{"type": "function", "name": "f"}]
    r = httpx.post(f"{running.url}/v1/responses", headers={"Authorization": f"Bearer {KEY}"}, json={
        "input": "hi", "tools": tools, "tool_choice": {"type": "function", "name": "send_messages"}})
    assert r.status_code == 400 and "'send_messages'" in r.json()["error"]["message"]
    r = httpx.post(f"{running.url}/v1/responses", headers={"Authorization": f"Bearer {KEY}"}, json={
        "input": "hi", "text": {"format": {"type": "json_schema", "name": "n" * 65, "schema": {}}}})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("text.format"), r.text
    for method, path in [("GET", "resp_1"), ("DELETE", "resp_1"), ("GET", "resp_1/input_items"),
                         ("POST", "resp_1/cancel")]:
        r = httpx.request(method, f"{running.url}/v1/responses/{path}", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"


def test_structured_outputs_through_the_openai_client(client, oracle):
    """The openai SDK's parse() sends response_format json_schema (strict) and reads the answer back into the
    model; streamed, the chunks join into the same JSON; vLLM's guided_choice and structured_outputs work too.
    Each answer equals the engine's own, constrained the same way."""
    messages = [{"role": "user", "content": "is it?"}]
    got = client.chat.completions.parse(model=MODEL, messages=messages, response_format=Verdict, temperature=0)
    choice = got.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Verdict)
    schema = {"type": "object", "required": ["verdict", "sure"], "additionalProperties": False,
              "properties": {"verdict": {"enum": ["yes", "no", "unsure"]}, "sure": {"type": "boolean"}}}
    want = oracle.generate(chat_prompt_ids(oracle.tokenizer, messages), SamplingParams(
        max_tokens=200, temperature=0, structured=StructuredOutput(json=schema)))[0]
    assert choice.message.content == want.text
    llama_cpp_form = {"type": "json_object", "schema": schema}  # (llama.cpp's server's)
    assert client.chat.completions.create(model=MODEL, messages=messages, response_format=llama_cpp_form,
                                          temperature=0).choices[0].message.content == want.text

    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, response_format=fmt, temperature=0.9,
                                                 seed=3, stream=True))
    assert json.loads("".join(c.choices[0].delta.content or "" for c in chunks))["verdict"] in ("yes", "no", "unsure")

    colors = ["red", "green", "dark blue"]
    got = client.completions.create(model=MODEL, prompt="color:", max_tokens=20, n=4, temperature=1.0, seed=0,
                                    extra_body={"guided_choice": colors})
    assert all(c.text in colors and c.finish_reason == "stop" for c in got.choices)
    got = client.completions.create(model=MODEL, prompt="id:", max_tokens=20, temperature=0,
                                    extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{3}"}})
    assert re.fullmatch("[A-Z]{3}-[0-9]{3}", got.choices[0].text)


def test_n_choices_with_a_seed_are_distinct_and_reproducible(client):
    def ask() -> list[str]:
        got = client.completions.create(model=MODEL, prompt="x = 1", n=3, max_tokens=8, temperature=1.0, top_p=0.9,
                                        seed=7, extra_body={"ignore_eos": True})
        assert sorted(c.index for c in got.choices) == [0, 1, 2] and got.usage.completion_tokens == 24
        return [c.text for c in got.choices]

    first = ask()
    assert ask() == first and len(set(first)) > 1


@pytest.mark.parametrize("prompts", [["def f(x):", "x = 1", "hello"], [[1, 40, 41], [1, 50], [1, 60, 61, 62]]],
                         ids=["text", "token ids"])
def test_a_batch_of_prompts_answers_each_as_if_alone(client, prompts):
    args = dict(model=MODEL, max_tokens=6, temperature=0.8, seed=5, extra_body={"ignore_eos": True})
    alone = [client.completions.create(prompt=p, n=2, echo=True, **args) for p in prompts]
    batch = client.completions.create(prompt=prompts, n=2, echo=True, **args)
    assert [c.index for c in batch.choices] == list(range(6))  # choice i answers prompt i // n
    assert [c.text for c in batch.choices] == [c.text for a in alone for c in a.choices]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)  # each prompt counted once
    assert batch.usage.completion_tokens == 6 * 6

    chunks = list(client.completions.create(prompt=prompts, n=2, echo=True, stream=True, **args))
    streamed = [""] * 6
    for chunk in chunks:
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in batch.choices]


def test_concurrent_greedy_streams_equal_sequential_runs(client, running):
    args = dict(model=MODEL, max_tokens=16, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    sequential = [client.completions.create(prompt=p, **args).choices[0].logprobs for p in PROMPTS]

    async def stream_all() -> list[tuple[list[str], list[float]]]:
        async with openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0) as aclient:
            async def one(prompt: str) -> tuple[list[str], list[float]]:
                tokens, logprobs = [], []
                async for chunk in await aclient.completions.create(prompt=prompt, stream=True, **args):
                    tokens += chunk.choices[0].logprobs.tokens
                    logprobs += chunk.choices[0].logprobs.token_logprobs
                return tokens, logprobs
            return await asyncio.gather(*(one(p) for p in PROMPTS))

    concurrent = asyncio.run(stream_all())
    for seq, (tokens, logprobs) in zip(sequential, concurrent):
        assert tokens == seq.tokens and len(tokens) == 16
        assert max(abs(a - b) for a, b in zip(logprobs, seq.token_logprobs)) < 1e-3
    wait_until_idle(running)


# ---- models and adapters ----------------------------------------------------------------------------
def test_model_list_has_the_base_model(client):
    cards = {m.id: m for m in client.models.list().data}
    assert cards[MODEL].root == "/models/tiny" and cards[MODEL].parent is None
    card = client.models.retrieve(MODEL)
    assert (card.id, card.root, card.max_model_len) == (MODEL, "/models/tiny", cards[MODEL].max_model_len)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("name", ["lora", "prefix"])
def test_adapter_load_use_unload(client, running, oracle, name):
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(f"{running.url}/v1/load_lora_adapter", headers=headers,
                          json={"lora_name": name, "lora_path": name})
    assert response.status_code == 200 and response.text == f"Success: LoRA adapter '{name}' added successfully."
    again = {"lora_name": name, "lora_path": name, "load_inplace": False}  # (vLLM's: no replacing then)
    assert httpx.post(f"{running.url}/v1/load_lora_adapter", headers=headers, json=again).status_code == 400
    card = next(m for m in client.models.list().data if m.id == name)
    assert card.parent == MODEL and card.root.endswith(name) and client.models.retrieve(name).root == card.root
    context = running.llm.max_model_len - (5 if name == "prefix" else 0)  # the prefix's virtual tokens take 5
    assert card.max_model_len == context
    tokenized = httpx.post(f"{running.url}/tokenize", headers=headers, json={"model": name, "prompt": "hi"}).json()
    assert tokenized["max_model_len"] == context
    fits = {"model": name, "prompt": [5] * 500, "max_tokens": context - 500, "ignore_eos": True}
    assert httpx.post(f"{running.url}/v1/completions", headers=headers, json=fits).status_code == 200
    too_long = httpx.post(f"{running.url}/v1/completions", headers=headers,
                          json={**fits, "max_tokens": context - 499})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"

    want, base = greedy("def f(x):", oracle, 10, adapter=name), greedy("def f(x):", oracle, 10)
    got = client.completions.create(model=name, prompt="def f(x):", max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text != base.text
    assert metrics(running)["gorgon_requests_total" + json.dumps({"finish_reason": "length", "model": name},
                                                                 sort_keys=True)] >= 1

    response = httpx.post(f"{running.url}/v1/unload_lora_adapter", headers=headers, json={"lora_name": name})
    assert response.status_code == 200, response.text
    assert name not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=name, prompt="hi", max_tokens=2)
    wait_until_idle(running)


def test_a_load_that_unloads_another_adapter_says_so(tiny_model_dir, adapter_root):
    running = serve(LLM(tiny_model_dir, adapter_root=str(adapter_root), max_adapters=1, **ENGINE_KWARGS))
    try:
        for name in ("lora", "prefix"):
            response = httpx.post(f"{running.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})
            assert response.status_code == 200
        assert response.text.endswith("the least recently used idle adapter was unloaded: lora.")
        assert [a["name"] for a in running.llm.list_adapters()] == ["prefix"]
    finally:
        running.stop()


@pytest.mark.parametrize("route, body, status", [
    ("load_lora_adapter", {"lora_name": "bad", "lora_path": "../outside"}, 400),
    ("load_lora_adapter", {"lora_name": "bad", "lora_path": "missing"}, 404),  # (vLLM's statuses)
    ("load_lora_adapter", {"lora_name": MODEL, "lora_path": "lora"}, 400),
    ("unload_lora_adapter", {"lora_name": "never-loaded", "lora_int_id": 3}, 404),
])
def test_bad_adapter_requests_are_4xx_and_the_server_keeps_serving(client, running, route, body, status):
    response = httpx.post(f"{running.url}/v1/{route}", headers={"Authorization": f"Bearer {KEY}"}, json=body)
    assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].finish_reason


# ---- auth and errors --------------------------------------------------------------------------------
def test_api_key_is_required_on_v1_only(running):
    bad = openai.OpenAI(base_url=f"{running.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    response = httpx.post(f"{running.url}/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{running.url}/health").json() == {"status": "ok"}
    assert httpx.head(f"{running.url}/health").status_code == 200  # (load balancers' probes)
    assert httpx.get(f"{running.url}/ping").json() == httpx.post(f"{running.url}/ping").json() == {"status": "ok"}
    assert httpx.get(f"{running.url}/version").json() == {"version": version("gorgon")}
    assert httpx.get(f"{running.url}/metrics").status_code == 200


@pytest.mark.parametrize("body, status, param, code", [
    (b'{"prompt": "hi", "max_tokens": ', 400, None, None),  # malformed JSON
    ({"prompt": "hi", "model": "no-such-model"}, 404, "model", "model_not_found"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", None),
    ({"prompt": "hi", "max_tokens": 10 ** 9}, 400, "max_tokens", "context_length_exceeded"),
    ({"prompt": "hi", "temperature": 7}, 400, "temperature", None),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    ({"prompt": "hi", "n": 1000}, 400, "n", None),
    ({"prompt": "hi", "logprobs": 50}, 400, "logprobs", None),
    ({"prompt": "hi", "echo": "yes"}, 400, "echo", None),
    ({"prompt": ""}, 400, "prompt", None),
    ({"prompt": [1, 999]}, 400, "prompt", None),  # a token id outside the vocabulary
    ({"prompt": [5] * 600}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": "x" * 5000}, 413, None, "request_too_large"),
    ({"messages": []}, 400, "messages", None),
])
def test_bad_requests_get_openai_error_bodies(running, body, status, param, code):
    route = "chat/completions" if isinstance(body, dict) and "messages" in body else "completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{running.url}/v1/{route}", content=content,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code


def test_unknown_route_gets_an_openai_error_body(running):
    response = httpx.get(f"{running.url}/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404 and response.json()["error"]["message"]


# ---- failure and disconnects -----------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_aborts_its_request_and_frees_its_blocks(running, stream, monkeypatch):
    before = aborted(wait_until_idle(running))
    forward = running.llm.runner.forward

    def slow_forward(*args, **kwargs):  # so the request is surely still running when the client leaves
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(running.llm.runner, "forward", slow_forward)
    body = {"prompt": "hello", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": stream}
    headers = {"Authorization": f"Bearer {KEY}"}
    if stream:
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, headers=headers) as response:
            next(response.iter_lines())  # the request is running; now hang up
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{running.url}/v1/completions", json=body, headers=headers, timeout=0.5)
    assert aborted(wait_until_idle(running)) == before + 1


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_failure_fails_only_its_request(client, running, stream):
    forward = running.llm.runner.forward

    def fail_once(*args, **kwargs):
        running.llm.runner.forward = forward
        raise RuntimeError("injected fault")

    running.llm.runner.forward = fail_once
    if stream:  # the status line is already sent: the error comes in-band, then [DONE]
        with httpx.stream("POST", f"{running.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"prompt": "hi", "max_tokens": 4, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line]
        assert "injected fault" in json.loads(lines[-2][6:])["error"]["message"] and lines[-1] == "data: [DONE]"
    else:
        with pytest.raises(openai.InternalServerError, match="injected fault"):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=4)
    wait_until_idle(running)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 4


def test_a_request_that_a_failing_step_had_finished_still_ends(tiny_model_dir):
    """A step that fails after it finished a request (its last output lost) ends that request with the error, not a
    stream that waits for ever; steps that fail one after another on several prompts put the engine down (/health then
    says so), but not one prompt retried."""
    llm = LLM(tiny_model_dir, **ENGINE_KWARGS)
    append = llm._append_token

    def fail_after_the_first(seq, token_id, logprob):
        if seq.params.max_tokens == 5:  # (the second request of the batch: the first has finished by then)
            raise RuntimeError("injected fault")
        append(seq, token_id, logprob)

    async def last_item(stream: RequestStream) -> object:
        try:
            async for out in stream:
                if out.finished:
                    return out.finish_reason
        except (EngineError, EngineStopped) as e:
            return e

    async def main() -> None:
        engine = AsyncEngine(llm)
        engine.start()
        llm._append_token = fail_after_the_first
        both_added = threading.Event()
        engine._post(both_added.wait)  # the step thread waits: the two requests take the same first step
        adds = asyncio.gather(*(engine.add_request([5, 6, 7], SamplingParams(max_tokens=n, ignore_eos=True))
                                for n in (1, 5)))
        asyncio.get_running_loop().call_later(0.2, both_added.set)
        streams = await adds
        ends = await asyncio.wait_for(asyncio.gather(*map(last_item, streams)), timeout=10)
        assert all(isinstance(end, EngineError) and "injected fault" in str(end) for end in ends)
        assert engine.is_running and llm.num_free_blocks == llm.block_manager.num_blocks
        llm._append_token = append
        served = await engine.add_request([5, 6], SamplingParams(max_tokens=2, ignore_eos=True))
        assert await asyncio.wait_for(last_item(served), timeout=10) == "length"  # (and the failures in a row: 0)
        llm.runner.forward = lambda *args, **kwargs: 1 / 0
        for _ in range(MAX_FAILED_PROMPTS + 1):  # one prompt, retried (as the openai SDK retries a 500): still up
            stream = await engine.add_request([5, 6], SamplingParams(max_tokens=2))
            assert isinstance(await asyncio.wait_for(last_item(stream), timeout=10), EngineError)
        assert engine.is_running
        for i in range(MAX_FAILED_PROMPTS - 1):  # failures on other prompts, one after another: down
            stream = await engine.add_request([5, 7 + i], SamplingParams(max_tokens=2))
            assert isinstance(await asyncio.wait_for(last_item(stream), timeout=10), (EngineError, EngineStopped))
        assert not engine.is_running and "steps failed one after another on 3 prompts" in engine.failure
        with pytest.raises(EngineStopped, match="division by zero"):
            await engine.add_request([5, 6], SamplingParams(max_tokens=2))
        await engine.stop()

    asyncio.run(main())


def test_one_failed_step_of_a_batch_of_several_prompts_leaves_the_engine_up(tiny_model_dir):
    """A transient fault (one step's out-of-memory, say) fails its batch, however many prompts it holds; only steps
    failing one after another with no prompt common to all of them put the engine down."""
    llm = LLM(tiny_model_dir, **ENGINE_KWARGS)
    forward, faults = llm.runner.forward, [1]

    def fail_once(*args, **kwargs):
        if faults:
            faults.pop()
            raise RuntimeError("injected fault")
        return forward(*args, **kwargs)

    async def main() -> None:
        engine = AsyncEngine(llm)
        engine.start()
        all_added = threading.Event()
        engine._post(all_added.wait)  # the step thread waits: the requests take the same first step
        llm.runner.forward = fail_once
        adds = asyncio.gather(*(engine.add_request([5, 6 + i], SamplingParams(max_tokens=2))
                                for i in range(MAX_FAILED_PROMPTS + 1)))
        asyncio.get_running_loop().call_later(0.2, all_added.set)
        for stream in await adds:
            with pytest.raises(EngineError, match="injected fault"):
                async for _ in stream:
                    pass
        assert engine.is_running
        served = await engine.add_request([5, 6], SamplingParams(max_tokens=2, ignore_eos=True))
        assert [out.finish_reason async for out in served][-1] == "length"
        await engine.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_a_generate_beside_a_server_of_the_same_llm_is_refused(oracle):
    """A server's step thread takes every step's outputs: a generate() of its LLM from another thread could lose its
    answer to that thread and wait for ever (a test did, now and then), and so could a second server of it. Both
    are refused while it runs; the LLM is free again once it stops."""
    async def main() -> None:
        engine = AsyncEngine(oracle)
        engine.start()
        try:
            with pytest.raises(RuntimeError, match="by a server of it"):
                await asyncio.to_thread(oracle.generate, [5, 6, 7], SamplingParams(max_tokens=2))
            with pytest.raises(RuntimeError, match="by a server of it"):
                AsyncEngine(oracle).start()
            stream = await engine.add_request([5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))
            assert len([out async for out in stream][-1].token_ids) == 2
        finally:
            await engine.stop()

    asyncio.run(main())
    assert len(oracle.generate([5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))[0].token_ids) == 2


def test_time_to_first_token_counts_from_arrival_at_the_server(tiny_model_dir):
    """A request that arrives during a step waits for it: that wait is part of its time to first token (and
    latency), as its client sees it."""
    llm = LLM(tiny_model_dir, **ENGINE_KWARGS)

    async def main() -> None:
        engine = AsyncEngine(llm)
        engine.start()
        engine._post(lambda: time.sleep(0.3))  # a long step
        stream = await engine.add_request([5, 6], SamplingParams(max_tokens=2, ignore_eos=True))
        outputs = [out async for out in stream]
        assert outputs[-1].ttft_s >= 0.3 and outputs[-1].latency_s >= 0.3
        await engine.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_metrics_count_preemptions_and_request_times_of_minutes(tiny_model_dir):
    llm = LLM(tiny_model_dir, **ENGINE_KWARGS)
    server_metrics = ServerMetrics(llm)
    llm.scheduler.num_preemptions = 3
    server_metrics.e2e.observe(100.0)  # a long answer on a CPU
    families = {f.name: f for f in text_string_to_metric_families(server_metrics.render().decode())}
    assert [s.value for s in families["gorgon_preemptions"].samples] == [3]
    buckets = {s.labels["le"]: s.value for s in families["gorgon_request_latency_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets["81.92"] == 0 and buckets["163.84"] == 1  # (not all in +Inf)


def test_metrics_count_queue_time_and_drafted_tokens(tiny_model_dir, tmp_path):
    """vLLM's queue time and speculation counts: a step verifies its tree's drafts (accepted ones: the tokens it
    emits less one), whether or not they are accepted."""
    from test_stop_strings import PROMPT, medusa_llm

    save_medusa_heads(MedusaHeads(MedusaConfig(num_heads=4, num_layers=1, hidden_size=64, vocab_size=256,
                                               own_lm_head=False)), tmp_path)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    futures = PROMPT + LLM(tiny_model_dir).generate(PROMPT, greedy)[0].token_ids
    llm = medusa_llm(tiny_model_dir, tmp_path, futures)  # (the chain4 tree: four drafts a step)
    out = llm.generate(PROMPT, greedy)[0]
    steps = len(out.accepted_lengths)
    assert steps and out.num_draft_tokens == 4 * steps and 0 <= out.queue_s <= out.latency_s
    server_metrics = ServerMetrics(llm)
    server_metrics.request_tracker("m").finish(out, "length")
    samples = {s.name: s.value for family in text_string_to_metric_families(server_metrics.render().decode())
               for s in family.samples}
    assert samples["gorgon_medusa_draft_tokens_total"] == 4 * steps
    assert samples["gorgon_request_queue_time_seconds_count"] == 1


# ---- shutdown ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shutdown_timeout, finish_reason", [(20.0, "length"), (0.2, None)])
def test_shutdown_finishes_or_ends_in_flight_requests(tiny_model_dir, shutdown_timeout, finish_reason):
    """With time enough, an in-flight stream finishes; without, it ends with the API's error, in-band, then [DONE]
    (not cut off), a request that waits whole gets a 503 body, and their blocks come back."""
    running = serve(LLM(tiny_model_dir, **ENGINE_KWARGS), shutdown_timeout=shutdown_timeout)
    max_tokens = 24 if finish_reason else 480
    if not finish_reason:  # slow enough that 480 tokens surely outlast the shutdown, however fast the kernels
        forward = running.llm.runner.forward
        running.llm.runner.forward = lambda *args, **kwargs: (time.sleep(0.005), forward(*args, **kwargs))[1]
    body = {"prompt": "hello", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    whole = []
    waiting = threading.Thread(target=lambda: whole.append(httpx.post(f"{running.url}/v1/completions", json=body,
                                                                      timeout=30)))
    with httpx.stream("POST", f"{running.url}/v1/completions", json={**body, "stream": True}, timeout=30) as response:
        lines = response.iter_lines()
        next(lines)
        waiting.start()
        time.sleep(0.2)  # (the whole request in flight too)
        threading.Thread(target=running.stop).start()
        events = [line for line in lines if line]
    waiting.join(timeout=30)
    running.thread.join(timeout=30)
    assert not running.thread.is_alive() and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    if finish_reason:
        assert last["choices"][0]["finish_reason"] == finish_reason and whole[0].status_code == 200
    else:
        assert "the server is shutting down" in last["error"]["message"]
        assert whole[0].status_code == 503 and "shutting down" in whole[0].json()["error"]["message"]
        assert last["error"]["type"] == whole[0].json()["error"]["type"] == "service_unavailable"  # (both alike)
    assert running.llm.num_free_blocks == running.llm.block_manager.num_blocks and not running.llm.has_unfinished()
