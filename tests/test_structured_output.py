"""Structured outputs (engine.structured): every sampled token keeps the output inside its grammar. The oracle of the
bitmask path is a brute-force one: transformers' logits, and the argmax over the tokens that a fresh llguidance
matcher, asked token by token, accepts next. The outputs are also checked with Python's own json and re."""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engine import LLM, ReasoningTags, SamplingParams, StructuredOutput
from engine.structured import GrammarError, Grammars
from models.medusa import MedusaConfig, MedusaHeads, save_medusa_heads

from conftest import VOCAB, hf_model, use_oracle_drafts

EOS = 2  # the tiny model's
SCHEMA = {"type": "object", "properties": {"verdict": {"enum": ["yes", "no", "maybe"]}, "sure": {"type": "boolean"},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"type": "string", "maxLength": 6}},
          "required": ["verdict", "sure", "score", "tag"], "additionalProperties": False}
SPECS = {
    "json schema": StructuredOutput(json=SCHEMA),
    "regex": StructuredOutput(regex=r"[a-z]{2,5}-[0-9]{2}(!|\?)"),
    "choice": StructuredOutput(choice=["red", "green", "blue (light)"]),
    "gbnf": StructuredOutput(grammar='root ::= "(" [a-c]+ ")" | "none"'),
    "lark": StructuredOutput(grammar='start: "x=" /[0-9]{1,3}/ ";"'),
}


def fits(spec: StructuredOutput, text: str) -> bool:
    """Python's own reading of whether text is a whole output of spec."""
    if spec.json is not None:
        value = json.loads(text)
        return (set(value) == set(SCHEMA["required"]) and value["verdict"] in ("yes", "no", "maybe")
                and isinstance(value["sure"], bool) and type(value["score"]) is int and 0 <= value["score"] <= 99
                and isinstance(value["tag"], str) and len(value["tag"]) <= 6)
    if spec.regex is not None:
        return re.fullmatch(spec.regex, text) is not None
    if spec.choice is not None:
        return text in spec.choice
    if spec.grammar.startswith("root"):
        return re.fullmatch(r"\([a-c]+\)|none", text) is not None
    return re.fullmatch(r"x=[0-9]{1,3};", text) is not None


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(tiny_model_dir, num_kv_blocks=64, block_size=8)


def ids(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer(text, add_special_tokens=False)["input_ids"]


def allowed_by_brute_force(grammars: Grammars, spec: StructuredOutput, generated: list[int]) -> list[int]:
    """Every token a matcher that has consumed `generated` accepts next, asked one token at a time."""
    matcher = grammars.matcher(spec)
    assert matcher.consume_tokens(generated)
    return [t for t in range(VOCAB) if matcher.validate_tokens([t]) == 1]


@pytest.mark.parametrize("name", SPECS)
def test_greedy_is_the_best_allowed_token_at_every_step(llm, tiny_model_dir, name):
    spec, prompt = SPECS[name], [1, 40, 41, 42, 43]
    out = llm.generate(prompt, SamplingParams(max_tokens=400, temperature=0, structured=spec))[0]
    assert out.finish_reason == "stop" and fits(spec, out.text), out.text
    model, tokens = hf_model(tiny_model_dir), list(prompt)
    for token in out.token_ids:
        allowed = allowed_by_brute_force(llm.grammars, spec, tokens[len(prompt):])
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, -1]
        assert token == max(allowed, key=lambda t: logits[t].item())
        tokens.append(token)


@pytest.mark.parametrize("name", SPECS)
def test_every_sampled_output_fits(llm, name):
    spec = SPECS[name]
    params = [SamplingParams(max_tokens=400, temperature=1.5, seed=seed, structured=spec) for seed in range(12)]
    outs = llm.generate([[1, 50 + i] for i in range(12)], params)
    for out in outs:
        assert out.finish_reason == "stop" and fits(spec, out.text), out.text
    assert len({out.text for out in outs}) > 1  # sampled, not forced
    assert llm.num_free_blocks == llm.block_manager.num_blocks


def test_the_mask_leaves_the_other_rows_and_the_logprobs_alone(llm):
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    alone = llm.generate([1, 60, 61], free)[0]
    constrained = SamplingParams(max_tokens=12, temperature=0, logprobs=2, structured=SPECS["regex"])
    both = llm.generate([[1, 60, 61], [1, 60, 61]], [free, constrained])
    assert both[0].token_ids == alone.token_ids and both[0].logprobs == alone.logprobs
    assert fits(SPECS["regex"], both[1].text)
    # logprobs are the model's own, as vLLM reports them: the chosen token need not be the model's first choice
    assert any(lp < max(top.values()) for lp, top in both[1].logprobs)


def test_end_of_text_is_allowed_only_where_the_grammar_is_complete(llm):
    digits = StructuredOutput(regex=r"[0-9]+")
    matcher = llm.grammars.matcher(digits)
    assert EOS not in allowed_by_brute_force(llm.grammars, digits, [])
    assert matcher.consume_tokens(ids(llm, "42"))
    assert matcher.is_accepting() and not matcher.is_stopped()
    assert EOS in allowed_by_brute_force(llm.grammars, digits, ids(llm, "42"))
    # where the model would rather stop, a complete output stops there
    out = llm.generate([1, 70], SamplingParams(max_tokens=30, temperature=0, logit_bias={EOS: 30.0},
                                                  structured=digits))[0]
    digit, end = out.token_ids  # (the byte tokenizer decodes EOS as a byte too)
    assert out.finish_reason == "stop" and re.fullmatch(r"[0-9]", llm.tokenizer.decode([digit])) and end == EOS


def test_structured_requests_speculate_and_give_plain_decodings_tokens(tiny_model_dir, tmp_path):
    """A structured request's drafts are verified under each tree node's own mask: its matcher moved along the
    node's path. Drafted from the plain answers themselves (the right token at varying ranks, or missing), whole
    runs are accepted; a node masked as its root is would give other tokens. Beside them, free requests, greedy
    and sampled, speculate in the same steps."""
    save_medusa_heads(MedusaHeads(MedusaConfig(4, 1, 64, VOCAB, own_lm_head=False)), tmp_path)
    kwargs = dict(num_kv_blocks=96, block_size=8)
    prompts = [[1, 80 + i, 81] for i in range(len(SPECS) + 2)]
    params = [SamplingParams(max_tokens=400, temperature=0, structured=spec) for spec in SPECS.values()]
    params += [SamplingParams(max_tokens=400, temperature=0.9, seed=3, structured=SPECS["json schema"]),
               SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)]
    plain = LLM(tiny_model_dir, **kwargs).generate(prompts, params)
    llm = LLM(tiny_model_dir, medusa=str(tmp_path), medusa_tree="cpu12", **kwargs)
    use_oracle_drafts(llm, {f"req-{i}": p + o.token_ids for i, (p, o) in enumerate(zip(prompts, plain))})
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert [o.text for o in outs] == [o.text for o in plain] and all(o.finish_reason == "stop" for o in outs[:-1])
    assert all(max(o.accepted_lengths, default=0) >= 3 for o in outs if len(o.token_ids) > 8)
    assert llm.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.parametrize("spec, message", [
    (StructuredOutput(json={"type": "objectx"}), "Invalid type: objectx"),
    (StructuredOutput(json="{not json"), "not valid JSON"),
    (StructuredOutput(regex="(ab"), "unclosed group"),
    (StructuredOutput(grammar="root ::= ((("), "neither Lark"),
    (StructuredOutput(grammar="start: undefined_rule"), "unknown name"),
    (StructuredOutput(json={"type": "integer", "maximum": 10**30}), "not JSON serializable"),  # (not a bare error)
])
def test_bad_grammars_are_refused_and_leave_nothing_behind(llm, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.add_request([1, 2, 3], SamplingParams(structured=spec))
    assert not llm.requests and not llm.has_unfinished()
    assert llm.num_free_blocks == llm.block_manager.num_blocks


def test_a_structured_output_is_exactly_one_thing():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="at least one"):
        StructuredOutput(choice=[])
    assert StructuredOutput(json={}).json == {}  # any JSON value


def test_formats_llguidance_does_not_know_are_annotations_and_outlines_grammars_open_with_start(llm):
    """JSON Schema makes an unknown `format` an annotation (Pydantic's bytes: "binary", SecretStr: "password"):
    the schema is used without it, not refused; Lark's `?start:` (Outlines' grammars) is taken as Lark."""
    secret = {"type": "object", "properties": {"key": {"type": "string", "format": "password"}}, "required": ["key"]}
    matcher = llm.grammars.matcher(StructuredOutput(json=secret))
    assert matcher.consume_tokens(ids(llm, '{"key": "x"}')) and matcher.is_accepting()
    dated = llm.grammars.matcher(StructuredOutput(json={"type": "string", "format": "date"}))
    assert dated.validate_tokens(ids(llm, '"hello"')) < len(ids(llm, '"hello"'))  # (a known one still binds)
    either = llm.grammars.matcher(StructuredOutput(grammar='?start: "yes" | "no"\n'))
    assert either.consume_tokens(ids(llm, "no")) and either.is_accepting()


def test_a_grammar_that_fails_mid_answer_ends_its_request_in_error(llm):
    """llguidance's lexer gives up on this pattern once the string opens (too many expressions): the request ends
    with finish_reason "error" and the reason, never a "stop" whose answer is cut."""
    spec = StructuredOutput(json={"type": "string", "pattern": "^a{1000000}$"})
    out = llm.generate([1, 2, 3], SamplingParams(max_tokens=8, structured=spec))[0]
    assert out.finish_reason == "error" and out.error.startswith("the structured output failed mid-answer: lexer")
    assert llm.num_free_blocks == llm.block_manager.num_blocks and not llm.has_unfinished()


def test_json_whitespace_is_bounded(llm):
    """A small model left to JSON's free whitespace can fill max_tokens with it; the grammar allows a space, or a
    line break or two and an indent of at most 20."""
    matcher = llm.grammars.matcher(StructuredOutput(json_object=True))
    assert matcher.validate_tokens(ids(llm, "{\n\n\n")) == 3
    assert matcher.consume_tokens(ids(llm, "{\n"))
    assert matcher.validate_tokens(ids(llm, " " * 30)) == 20


def accepts(grammars: Grammars, spec: StructuredOutput, tokens: list[int]) -> tuple[int, bool]:
    """How many of tokens a fresh matcher accepts in a row, and whether it is then complete."""
    matcher = grammars.matcher(spec)
    taken = matcher.validate_tokens(tokens)
    matcher.consume_tokens(tokens[:taken])
    return taken, matcher.is_accepting()


@pytest.mark.parametrize("tags_are_tokens", [False, True])
def test_a_constraint_after_reasoning_leaves_the_reasoning_free(llm, tags_are_tokens):
    """StructuredOutput.after_reasoning (vLLM's structured outputs under a reasoning parser): any text up to the end
    tag, then the constraint. The tags are text (the tiny vocabulary spells them), or single added tokens, which
    llguidance reads as special tokens and which are matched as such."""
    tokenizer = llm.tokenizer
    if tags_are_tokens:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(["<think>", "</think>"])
        assert len(tokenizer("</think>", add_special_tokens=False)["input_ids"]) == 1
    grammars = Grammars(tokenizer, len(tokenizer), {EOS})

    def tokens(*parts: str) -> list[int]:
        return [t for part in parts for t in tokenizer(part, add_special_tokens=False)["input_ids"]]

    regex = r"[a-z]{3}"
    qwen3 = StructuredOutput(regex=regex, after_reasoning=ReasoningTags())
    deepseek = StructuredOutput(regex=regex, after_reasoning=ReasoningTags(opened_by_prompt=True))
    reasoned = tokens("<think>", "So {x} <b> </thin", "</think>", "\n\n", "abc")
    assert accepts(grammars, qwen3, reasoned) == (len(reasoned), True)
    assert accepts(grammars, qwen3, tokens("abc")) == (len(tokens("abc")), True)  # it may answer at once
    assert accepts(grammars, qwen3, tokens("\n", "abc"))[0] == 0  # (the whitespace after reasoning goes with it)
    assert accepts(grammars, qwen3, tokens("Abc"))[0] == 0
    refused = tokens("<think>", "x", "</think>", "\n")
    assert accepts(grammars, qwen3, refused + tokens("Hi")) == (len(refused), False)  # the regex, after </think>
    # the prompt opened the reasoning: an answer is reasoning (its own <think> allowed) until </think>
    assert accepts(grammars, deepseek, reasoned) == (len(reasoned), True)
    unopened = reasoned[len(tokens("<think>")):]
    assert accepts(grammars, deepseek, unopened) == (len(unopened), True)
    assert accepts(grammars, deepseek, tokens("abc")) == (len(tokens("abc")), False)  # still reasoning
    for other in (StructuredOutput(choice=["abc", "xyz"]), StructuredOutput(grammar='root ::= [a-z] [a-z] [a-z]'),
                  StructuredOutput(grammar='start: /[a-z]{3}/'), StructuredOutput(json={"type": "integer"})):
        answer = "42" if other.json else "abc"
        spec = dataclasses.replace(other, after_reasoning=ReasoningTags())
        assert accepts(grammars, spec, tokens("<think>", "x", "</think>", answer)) == (
            len(tokens("<think>", "x", "</think>", answer)), True), other
    if not tags_are_tokens:  # (a regex is text: it cannot write an added token)
        # a regex that writes the tags itself constrains it all
        own = StructuredOutput(regex="<think>[a-z]{2}</think>[0-9]", after_reasoning=ReasoningTags())
        assert accepts(grammars, own, tokens("<think>ab</think>7")) == (len(tokens("<think>ab</think>7")), True)
        assert accepts(grammars, own, tokens("<think>abc"))[0] == len(tokens("<think>ab"))


def test_a_grammar_compiles_once_for_every_request_that_gives_it(llm, monkeypatch):
    """A request's n choices, and an agent's tools sent with every request, compiled their grammar each (seconds
    for a large one, on the step thread); each still gets a matcher of its own."""
    grammars = Grammars(llm.tokenizer, llm.model.config.vocab_size, llm.eos_token_ids)
    compiled = []
    compile_ = grammars._compile
    monkeypatch.setattr(grammars, "_compile", lambda grammar: compiled.append(grammar) or compile_(grammar))
    spec = StructuredOutput(choice=["yes", "no"])
    first, second = grammars.matcher(spec), grammars.matcher(spec)
    assert len(compiled) == 1 and first is not second
    assert first.consume_tokens(ids(llm, "yes")) and first.is_accepting()
    assert not second.is_accepting() and second.consume_tokens(ids(llm, "no")) and second.is_accepting()
    grammars.matcher(StructuredOutput(choice=["maybe"]))
    assert len(compiled) == 2
    # many requests at once with a grammar not yet compiled (a fleet of agents starting): one compile, and each
    # request its own matcher
    slow = StructuredOutput(choice=["slow"])
    monkeypatch.setattr(grammars, "_compile", lambda grammar: time.sleep(0.2) or compiled.append(grammar)
                        or compile_(grammar))
    with ThreadPoolExecutor(4) as pool:
        matchers = list(pool.map(lambda _: grammars.matcher(slow), range(4)))
    assert len(compiled) == 3 and len({id(m) for m in matchers}) == 4
    with pytest.raises(GrammarError):  # a grammar that fails fails each request that gives it, compiled each time
        grammars.matcher(StructuredOutput(regex="("))
