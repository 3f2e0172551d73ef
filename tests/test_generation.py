"""Greedy generation is token-identical to transformers `generate`, alone and in mixed batches."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from engine import LLM, ContextLengthError, SamplingParams

from conftest import hf_model

NEW_TOKENS = 64
PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 20, 21], list(range(3, 40)), [1, 99] * 9, [7]]


def hf_greedy(model, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def hf_reference(tiny_model_dir):
    model = hf_model(tiny_model_dir)
    return [hf_greedy(model, p) for p in PROMPTS]


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def test_batch_of_one_matches_hf(tiny_model_dir, hf_reference):
    llm = LLM(tiny_model_dir, num_kv_blocks=64, block_size=16)
    for prompt, ref in zip(PROMPTS, hf_reference):
        out = llm.generate(prompt, GREEDY)[0]
        assert out.token_ids == ref
        assert out.finish_reason == "length"


@pytest.mark.parametrize("engine_kwargs", [
    dict(block_size=16),
    dict(block_size=1),
    dict(block_size=4, max_num_batched_tokens=8),  # prompts prefilled in chunks, mixed with decodes
])
def test_mixed_batch_matches_hf(tiny_model_dir, hf_reference, engine_kwargs):
    llm = LLM(tiny_model_dir, num_kv_blocks=2048 // engine_kwargs["block_size"], enable_prefix_caching=False,
              **engine_kwargs)
    free_at_start = llm.num_free_blocks
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == hf_reference
    assert llm.num_free_blocks == free_at_start


def test_requests_join_and_leave_the_running_batch(tiny_model_dir, hf_reference):
    llm = LLM(tiny_model_dir, num_kv_blocks=64, block_size=16)
    lengths = [5, 64, 17]
    ids = [llm.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
           for p, n in zip(PROMPTS[:3], lengths)]
    late_id, finished, step = None, {}, 0
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                finished[out.request_id] = out.token_ids
        step += 1
        if step == 10:  # joins while the others are mid-decode
            late_id = llm.add_request(PROMPTS[3], GREEDY)
    for rid, prompt_ref, n in zip(ids, hf_reference[:3], lengths):
        assert finished[rid] == prompt_ref[:n]
    assert finished[late_id] == hf_reference[3]


def test_stop_strings_and_stop_tokens(tiny_model_dir, hf_reference):
    llm = LLM(tiny_model_dir, num_kv_blocks=64, block_size=16)
    full = llm.generate(PROMPTS[0], GREEDY)[0]
    stop_token = full.token_ids[10]
    first = full.token_ids.index(stop_token)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, stop_token_ids=[stop_token]))[0]
    assert out.token_ids == full.token_ids[:first + 1] and out.finish_reason == "stop"

    stop_text = full.text[20:23]
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, stop=[stop_text],
                                                  ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.index(stop_text)]
    assert stop_text not in out.text


def test_streamed_text_concatenates_to_the_final_text(tiny_model_dir):
    llm = LLM(tiny_model_dir, num_kv_blocks=64, block_size=16)
    pieces = [o.new_text for o in llm.stream("def f(x):", GREEDY)]
    assert "".join(pieces) == llm.generate("def f(x):", GREEDY)[0].text


def test_bad_requests_are_refused_without_side_effects(tiny_model_dir):
    llm = LLM(tiny_model_dir, num_kv_blocks=64, block_size=16)
    free = llm.num_free_blocks
    with pytest.raises(ValueError, match="empty"):
        llm.add_request([], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        llm.add_request([1, 100000], GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="min_tokens must be in"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match="stop_token_ids must be in"):
        llm.add_request([1, 2], SamplingParams(stop_token_ids=[100000]))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not llm.has_unfinished() and llm.num_free_blocks == free


def test_special_tokens_text_is_left_out_unless_asked_for(tiny_model_dir, tmp_path):
    """vLLM's skip_special_tokens: a special token (token 2 made one, and forced) is in token_ids either way, in
    the text only with False."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    special = tokenizer.convert_ids_to_tokens(2)
    tokenizer.add_special_tokens({"additional_special_tokens": [special]})
    tokenizer.save_pretrained(tmp_path)
    llm = LLM(tiny_model_dir, tokenizer=str(tmp_path))
    forced = dict(max_tokens=2, temperature=0, ignore_eos=True, logit_bias={2: 100.0})
    skipped, kept = (llm.generate([5, 6, 7], SamplingParams(skip_special_tokens=skip, **forced))[0]
                     for skip in (True, False))
    assert skipped.token_ids == kept.token_ids == [2, 2]
    assert skipped.text == "" and kept.text == special * 2
    # a stop token's text stays out of the answer, as vLLM leaves it, unless include_stop_str_in_output
    stopped = dict(forced, stop_token_ids=[2], skip_special_tokens=False)
    without, with_ = (llm.generate([5, 6, 7], SamplingParams(include_stop_str_in_output=include, **stopped))[0]
                      for include in (False, True))
    assert without.token_ids == with_.token_ids == [2] and (without.text, with_.text) == ("", special)


def test_generate_leaves_nothing_behind_when_a_step_fails(tiny_model_dir):
    """A failed step (or Ctrl-C) inside generate() aborts its requests: the next call starts from an empty engine."""
    llm = LLM(tiny_model_dir, num_kv_blocks=64, block_size=16)
    forward = llm.runner.forward
    steps = iter(range(3))

    def fail_on_the_third_step(*args, **kwargs):
        if next(steps, None) == 2:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    llm.runner.forward = fail_on_the_third_step
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3], [4, 5]], GREEDY)
    assert not llm.requests and not llm.has_unfinished() and llm.num_free_blocks == 64


def test_prompts_and_params_as_vllm_users_give_them(tiny_model_dir):
    """vLLM's prompt dicts, token ids as arrays, a tuple of params, and its None defaults (max_tokens None: up to
    the end of the context; top_k -1: off), where gorgon failed with KeyError, TypeError or AttributeError."""
    import numpy as np

    llm = LLM(tiny_model_dir, num_kv_blocks=64, block_size=16)
    ids = [5, 6, 7, 8]
    want = llm.generate(ids, GREEDY)[0].token_ids
    for prompt in ({"prompt_token_ids": ids}, [{"prompt_token_ids": ids}], np.array(ids), torch.tensor([ids]),
                   [np.int64(i) for i in ids]):
        assert [o.token_ids for o in llm.generate(prompt, (GREEDY,))] == [want]
    text = llm.tokenizer.decode(ids)
    assert llm.generate({"prompt": text}, GREEDY)[0].token_ids == llm.generate(text, GREEDY)[0].token_ids
    for bad in ({"text": "x"}, [[1.5, 2]], [object()]):
        with pytest.raises(TypeError, match="a prompt is text|'prompt' \\(its text\\) or 'prompt_token_ids'"):
            llm.generate(bad, GREEDY)
    with pytest.raises(TypeError, match="params must be a SamplingParams"):
        llm.generate(ids, [{"temperature": 0}])
    nones = SamplingParams(max_tokens=None, min_tokens=None, top_k=None, stop=None, stop_token_ids=None,
                           logit_bias=None, temperature=0, ignore_eos=True)
    out = llm.generate([1] * 500, nones)[0]
    assert len(out.token_ids) == llm.max_model_len - 500 and out.finish_reason == "length"
    assert SamplingParams(top_k=-1).top_k == -1 and llm.generate(ids, SamplingParams(top_k=-1, seed=1))[0].token_ids
    with pytest.raises(ValueError, match="stop_token_ids must be token ids"):
        SamplingParams(stop_token_ids=["5"])
    with pytest.raises(ContextLengthError, match="min_tokens 100 do not fit the 12 tokens the model's context leaves"):
        llm.generate([1] * (llm.max_model_len - 12), SamplingParams(max_tokens=None, min_tokens=100))
    assert not llm.requests and llm.num_free_blocks == 64


def test_generate_returns_its_own_outputs_and_runs_one_at_a_time(tiny_model_dir):
    """A request queued with add_request finishing inside generate() made it fail with a KeyError (and two threads'
    generate() took each other's outputs: one failed, the other waited for ever)."""
    llm = LLM(tiny_model_dir, num_kv_blocks=64, block_size=16)
    llm.add_request([9, 9], SamplingParams(max_tokens=2, ignore_eos=True))
    assert [len(o.token_ids) for o in llm.generate([[1, 2, 3]], GREEDY)] == [GREEDY.max_tokens]
    stream = llm.stream([1, 2, 3], GREEDY)
    next(stream)
    with pytest.raises(RuntimeError, match="already taken by generate\\(\\), chat\\(\\) or stream\\(\\)"):
        llm.generate([4, 5], GREEDY)
    stream.close()
    assert llm.generate([4, 5], GREEDY)[0].finish_reason == "length"
    assert not llm.requests and llm.num_free_blocks == 64


def test_chat_writes_each_conversation_in_the_template(tiny_model_dir, tmp_path):
    """vLLM's LLM.chat: one conversation or several, in the model's chat template, answered as generate() would."""
    from engine.prompt_files import chat_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant:' + (extra or '') }}{% endif %}")
    tokenizer.save_pretrained(tmp_path)
    llm = LLM(tiny_model_dir, tokenizer=str(tmp_path), num_kv_blocks=64, block_size=16)
    chats = [[{"role": "user", "content": "def f(x):"}], [{"role": "user", "content": "hi"}]]
    want = [o.token_ids for o in llm.generate([chat_prompt_ids(llm.tokenizer, c) for c in chats], GREEDY)]
    assert [o.token_ids for o in llm.chat(chats, GREEDY)] == want
    assert [o.token_ids for o in llm.chat(chats[1], GREEDY)] == want[1:]
    extra = llm.chat(chats[1], GREEDY, chat_template_kwargs={"extra": " sure"})[0]
    assert extra.prompt_token_ids == chat_prompt_ids(llm.tokenizer, chats[1], {"extra": " sure"})


def test_decode_benchmark_writes_its_summary(tmp_path):
    """`gorgon bench decode` end to end on the small shape, tiny settings."""
    from bench import decode

    out = tmp_path / "decode.json"
    decode.main(["--config", "small", "--new-tokens", "4", "--repeats", "1", "--batch-sizes", "2",
                 "--out", str(out)])
    data = json.loads(out.read_text())
    summary = data["summary"]
    # the summary's ratios are those of the figures it reports
    assert summary["speedup_vs_hf_bs1"] == pytest.approx(data["gorgon_tok_s_bs1"] / data["hf_tok_s_bs1"])
    assert summary["roofline_fraction_bs1"] == pytest.approx(
        data["weight_bytes_per_token"] * data["gorgon_decode_tok_s_bs1"] / data["read_bandwidth_bytes_s"])
    assert set(summary) == {"speedup_vs_hf_bs1", "roofline_fraction_bs1", "throughput_bs2_tok_s"}
