"""Streams through the server: streamed text equals the whole answer, which equals the engine's plain greedy run
(cut at the stop string, when one is given), with and without Medusa speculation; the stop string never reaches
the client, even when it spans several tokens. On the shipped model and its Medusa heads."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from engine import LLM, RequestOutput, SamplingParams
from models import DEFAULT_MODEL_DIR
from server.app import ServerConfig, create_app

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Cache:\n    def __init__(self"]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def plain() -> LLM:
    return LLM(max_num_seqs=4)


@pytest.fixture(scope="module")
def client():
    llm = LLM(medusa=str(DEFAULT_MODEL_DIR / "medusa"), max_num_seqs=4)
    with TestClient(create_app(llm, ServerConfig(model_name="default", model_root="default"))) as client:
        yield client


def greedy(llm: LLM, prompt: str) -> RequestOutput:
    return llm.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0]


def ask(client: TestClient, body: dict) -> tuple[str, str, list[str]]:
    """(whole text, its finish_reason, the streamed pieces) of one greedy completion."""
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, **body}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    return whole["text"], whole["finish_reason"], [c["choices"][0]["text"] for c in chunks]


def medusa_steps(client: TestClient) -> float:
    lines = client.get("/metrics").text.splitlines()
    return float(next(line.split()[-1] for line in lines if line.startswith("gorgon_medusa_steps_total")))


@pytest.mark.parametrize("use_medusa", [True, False])
def test_greedy_streams_equal_whole_answers_equal_plain_decoding(client, plain, use_medusa):
    steps_before = medusa_steps(client)
    for prompt in PROMPTS:
        text, reason, pieces = ask(client, {"prompt": prompt, "use_medusa": use_medusa})
        assert text == "".join(pieces) == greedy(plain, prompt).text and reason == "length"
    assert (medusa_steps(client) > steps_before) == use_medusa


@pytest.mark.parametrize("span", [2, 3])
@pytest.mark.parametrize("use_medusa", [True, False])
def test_stop_strings_spanning_tokens_never_reach_the_stream(client, plain, span, use_medusa):
    tested = 0
    for prompt in PROMPTS:
        out = greedy(plain, prompt)
        tokens = plain.tokenizer.convert_ids_to_tokens(out.token_ids)
        # a stop string made of `span` whole tokens past the first few, each of which adds text
        start = next((i for i in range(4, len(tokens) - span) if all(len(plain.tokenizer.decode([t])) > 0
                                                                     for t in out.token_ids[i:i + span])), None)
        if start is None:
            continue
        stop = plain.tokenizer.decode(out.token_ids[start:start + span])
        if len(stop) < span:
            continue
        want = out.text[:out.text.find(stop)]
        text, reason, pieces = ask(client, {"prompt": prompt, "stop": [stop], "use_medusa": use_medusa})
        assert (text, reason) == (want, "stop") and "".join(pieces) == want, (stop, pieces)
        tested += 1
    assert tested >= 2, tokens
