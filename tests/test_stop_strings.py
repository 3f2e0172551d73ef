"""Stop strings never reach a client: until a request ends, the engine holds back an end of its text that could
begin a stop string, in plain and Medusa steps, through LLM.stream and the HTTP server. The oracle is the plain
run's text cut at the stop string. Also: streamed text never repeats the prompt."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from bench.common import byte_tokenizer
from engine import LLM, SamplingParams
from engine.detokenizer import detokenize_new_token, start_detokenizer, token_text
from engine.sequence import Sequence
from models.medusa import MedusaConfig, MedusaHeads, save_medusa_heads
from server.app import ServerConfig, create_app
from server.responses import ChatRenderer, CompletionRenderer

PROMPT = [39, 68, 75, 75, 78, 11, 220, 86, 78, 81, 75, 67]  # "Hello, world" in the byte tokenizer
MAX_TOKENS = 48
GREEDY = dict(temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def plain_pieces(tiny_model_dir) -> list[str]:
    """The text each token of the plain greedy run added (no stop strings)."""
    outs = list(LLM(tiny_model_dir).stream(PROMPT, SamplingParams(**GREEDY)))
    assert [len(o.new_token_ids) for o in outs] == [1] * MAX_TOKENS
    return [o.new_text for o in outs]


def stop_spanning(pieces: list[str], num_tokens: int) -> str:
    """A stop string made of num_tokens consecutive tokens' text, one character each, whose first occurrence in
    the text is where those tokens are (so the match really spans num_tokens tokens)."""
    text = "".join(pieces)
    for j in range(4, len(pieces) - num_tokens):
        run = pieces[j:j + num_tokens]
        stop = "".join(run)
        if all(len(p) == 1 for p in run) and text.find(stop) == len("".join(pieces[:j])):
            return stop
    raise AssertionError(f"the plain run has no {num_tokens} one-character tokens to stop at")


def medusa_llm(model_dir, heads_dir, futures: list[int]) -> LLM:
    """A Medusa engine whose drafts are the plain run's next tokens (so trees are accepted whole and a stop
    string ends a multi-token step)."""
    llm = LLM(model_dir, medusa=str(heads_dir), medusa_tree="chain4")

    def propose(seqs, hidden, num_running):
        for seq in seqs:
            root = len(seq) - 1
            seq.draft_token_ids = ([[futures[root + d] if root + d < len(futures) else 0] for d in range(1, 5)]
                                   if llm.medusa.can_speculate(seq) else None)
            seq.draft_tree = llm.medusa.tree_for(1).verify

    llm.medusa.propose = propose
    return llm


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("random_heads")
    save_medusa_heads(MedusaHeads(MedusaConfig(num_heads=4, num_layers=1, hidden_size=64, vocab_size=256,
                                               own_lm_head=False)), folder)
    return folder


@pytest.mark.parametrize("num_tokens, include", [(2, False), (3, False), (3, True)])
@pytest.mark.parametrize("medusa", [False, True])
def test_streamed_text_equals_the_text_cut_at_the_stop(tiny_model_dir, heads_dir, plain_pieces, num_tokens, medusa,
                                                       include):
    """include: vLLM's include_stop_str_in_output, the text cut after the stop string."""
    full = "".join(plain_pieces)
    stop = stop_spanning(plain_pieces, num_tokens)
    expected = full[:full.find(stop) + len(stop) * include]
    params = SamplingParams(stop=["\x00never", stop], include_stop_str_in_output=include, **GREEDY)
    if medusa:
        futures = PROMPT + LLM(tiny_model_dir).generate(PROMPT, SamplingParams(**GREEDY))[0].token_ids
        llm = medusa_llm(tiny_model_dir, heads_dir, futures)
    else:
        llm = LLM(tiny_model_dir)
    outs = list(llm.stream(PROMPT, params))
    streamed = "".join(o.new_text for o in outs)
    final = llm.generate(PROMPT, params)[0]
    assert streamed == final.text == outs[-1].text == expected
    assert final.finish_reason == "stop"
    assert all(not o.text.endswith(stop[:1]) or o.finished for o in outs)  # never a stop's first part, mid-stream
    if medusa:
        assert max(final.accepted_lengths) > num_tokens  # the stop string ended a multi-token step
    assert llm.num_free_blocks == llm.block_manager.num_blocks


def test_text_held_back_is_released_when_it_is_no_stop(tiny_model_dir, plain_pieces):
    """An end that could begin a stop string waits for the next tokens, then goes out once they rule the
    stop out; at the end of the request (length), whatever is still held goes out too."""
    full = "".join(plain_pieces)
    first_chars = [p for p in plain_pieces if len(p) == 1]
    stops = [c + "\x00" for c in dict.fromkeys(first_chars)]  # every one-character token begins a stop string
    llm = LLM(tiny_model_dir)
    outs = list(llm.stream(PROMPT, SamplingParams(stop=stops, **GREEDY)))
    assert "".join(o.new_text for o in outs) == outs[-1].text == full
    assert outs[-1].finish_reason == "length"
    held = [o for o in outs[:-1] if len(o.text) < len("".join(plain_pieces[:len(o.token_ids)]))]
    assert held  # text was held back at some steps


def test_abort_releases_what_was_held(tiny_model_dir, plain_pieces):
    stop = stop_spanning(plain_pieces, 3)
    llm = LLM(tiny_model_dir)
    request_id = llm.add_request(PROMPT, SamplingParams(stop=[stop], **GREEDY))
    streamed = ""
    while True:  # step until the stop string's first character has been generated (and is held back)
        (out,) = llm.step()
        streamed += out.new_text
        if llm.requests[request_id].output_text.endswith(stop[0]) and len(out.token_ids) > 4:
            break
    assert not streamed.endswith(stop[0])
    last = llm.abort(request_id)
    assert last.finished and last.finish_reason == "abort"
    assert streamed + last.new_text == last.text == "".join(plain_pieces[:len(last.token_ids)])
    assert llm.abort(request_id) is None
    assert llm.num_free_blocks == llm.block_manager.num_blocks


def sse_events(body: str) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("medusa", [False, True])
def test_stop_strings_through_the_server(tiny_model_dir, heads_dir, plain_pieces, medusa):
    full = "".join(plain_pieces)
    stop = stop_spanning(plain_pieces, 3)
    if medusa:
        futures = PROMPT + LLM(tiny_model_dir).generate(PROMPT, SamplingParams(**GREEDY))[0].token_ids
        llm = medusa_llm(tiny_model_dir, heads_dir, futures)
    else:
        llm = LLM(tiny_model_dir)
    app = create_app(llm, ServerConfig(model_name="tiny", model_root=str(tiny_model_dir)))
    body = dict(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, stop=[stop])
    with TestClient(app) as client:
        whole = client.post("/v1/completions", json=body)
        assert whole.status_code == 200, whole.text
        streamed = client.post("/v1/completions", json=body | {"stream": True})
        assert streamed.status_code == 200, streamed.text
    choice = whole.json()["choices"][0]
    events = sse_events(streamed.text)
    assert choice["text"] == "".join(e["choices"][0]["text"] for e in events if e["choices"]) == full[:full.find(stop)]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop  # (vLLM's: the string matched)
    assert [e["choices"][0]["stop_reason"] for e in events if e["choices"]][-1] == stop


def test_a_prompt_ending_inside_a_character_is_not_streamed():
    """The first output token completes the prompt's last character: the text it adds is that character, never
    the prompt before it."""
    tokenizer = byte_tokenizer()
    euro, ok = tokenizer("€")["input_ids"], tokenizer(" ok")["input_ids"]
    assert len(euro) == 3
    seq = Sequence("r", tokenizer("Hello, world")["input_ids"] + euro[:1], SamplingParams())
    start_detokenizer(tokenizer, seq)
    pieces = []
    for token in euro[1:] + ok:
        seq.token_ids.append(token)
        pieces.append(detokenize_new_token(tokenizer, seq))
    assert pieces == ["", "€", " ", "o", "k"]


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style SentencePiece BPE with byte fallback (as transformers converts one): characters outside its
    vocabulary are <0xNN> tokens, one per byte."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "a", "b", "x", "y", "▁a", "▁b", "▁x"]:
        vocab.setdefault(piece, len(vocab))
    model = models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁", "b"), ("▁", "x")], byte_fallback=True,
                       unk_token="<unk>", fuse_unk=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def decoded(tokenizer, prompt: list[int], output: list[int]) -> list[str]:
    seq = Sequence("r", list(prompt), SamplingParams())
    start_detokenizer(tokenizer, seq)
    pieces = []
    for token in output:
        seq.token_ids.append(token)
        pieces.append(detokenize_new_token(tokenizer, seq))
    return pieces


def test_a_prompt_ending_in_byte_fallback_characters_leaves_the_answer_alone():
    """The stream's context starts at a whole character: a window starting inside the emoji's bytes decoded as
    U+FFFD, which the first output token carried into the answer."""
    tokenizer = byte_fallback_tokenizer()
    prompt = tokenizer("a b 👍🏽")["input_ids"]
    assert sum(tokenizer.convert_ids_to_tokens(prompt)[i].startswith("<0x") for i in range(len(prompt))) == 8
    assert decoded(tokenizer, prompt, tokenizer.convert_tokens_to_ids(["▁x", "y"])) == [" x", "y"]


def test_bytes_that_are_no_utf8_do_not_break_the_stream():
    """A sampled <0x41> <0xE2> x: the stream's state broke ("Invalid prefix"), and the step of every request in
    the batch failed with it; a new stream goes on."""
    tokenizer = byte_fallback_tokenizer()
    output = tokenizer.convert_tokens_to_ids(["<0x41>", "<0xE2>", "x", "y"])
    assert "".join(decoded(tokenizer, tokenizer("a b")["input_ids"], output)) == "Axy"


def test_logprobs_tokens_read_as_the_answer_does():
    """A SentencePiece token decoded alone loses its space ("▁x" gives "x"), so logprobs' tokens did not join
    into the answer (" x y b"); each token's text is now read as inside a text, as the stream decodes it. A part of a
    character stays U+FFFD (its bytes are in `bytes`); byte-level BPE tokens read as before."""
    tokenizer = byte_fallback_tokenizer()
    output = tokenizer.convert_tokens_to_ids(["▁x", "y", "▁b"])
    assert tokenizer.decode(output[:1]) == "x"  # (what the logprobs said)
    answer = "".join(decoded(tokenizer, tokenizer("a b")["input_ids"], output))
    assert answer == " xy b" and "".join(token_text(tokenizer, t) for t in output) == answer
    assert token_text(tokenizer, tokenizer.convert_tokens_to_ids("<0xE2>")) == "\ufffd"
    out = SimpleNamespace(logprobs=[(-0.5, {t: -0.5}) for t in output], prompt_token_ids=[], prompt_logprobs=[])
    completion = CompletionRenderer("m", tokenizer, logprobs=1, token_ids=False, n=1)._logprobs(out, output, 0, False)
    assert "".join(completion.tokens) == answer and completion.text_offset == [0, 2, 3]
    assert list(completion.top_logprobs[0]) == [" x"]
    chat = ChatRenderer("m", tokenizer, logprobs=1, token_ids=False)._logprobs(out, output)
    assert [entry.token for entry in chat.content] == [" x", "y", " b"]
    assert [entry.bytes for entry in chat.content][0] == list(b" x")
    byte_level = byte_tokenizer()
    ids = byte_level(" ok, €")["input_ids"]
    assert [token_text(byte_level, t) for t in ids] == [byte_level.decode([t]) for t in ids]


def test_a_stop_string_made_while_min_tokens_held_the_rules_back_does_not_stop_later(tiny_model_dir):
    """As vLLM: once min_tokens is reached, only stop strings that end in the new text count (a short one wholly
    in earlier text, already streamed, cut the answer back to nothing)."""
    llm = LLM(tiny_model_dir)
    letters = llm.tokenizer("abcdefgh", add_special_tokens=False)["input_ids"]
    assert len(letters) == 8
    params = SamplingParams(max_tokens=8, min_tokens=2, stop=["a", "zzzzzzzz"], ignore_eos=True)
    seq = llm.requests[llm.add_request(PROMPT, params)]
    released = []
    for token in letters:
        llm._append_token(seq, token, None)
        released.append(llm._release_text(seq))
        if seq.is_finished:
            break
    assert seq.output_text == "".join(released) == "abcdefgh" and seq.finish_reason == "length"
