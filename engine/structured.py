"""Structured outputs: a request's StructuredOutput (a JSON schema, any JSON object, a regex, a choice of strings, or
a grammar in Lark or llama.cpp's GBNF) constrains every token it samples. llguidance, the grammar engine behind
vLLM's `guidance` backend and llama.cpp's, does the work: a matcher per request says which tokens of the vocabulary
may come next (a bitmask the sampler applies to the request's logits row) and follows the tokens it samples.
Medusa verifies their drafts under the same masks, each tree node's from the matcher moved along the node's path.

A reasoning model's constraint may come after its thinking (StructuredOutput.after_reasoning): the grammar then
lets the answer reason freely up to the end tag (a single token's where the tokenizer has one), then constrains
the rest.

Where the grammar is complete the mask also allows the engine's end-of-generation tokens, so the model decides
whether to stop there (a regex `\\d+` after "42"); where nothing may follow (a JSON object's closing brace), the
request finishes at once."""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from functools import cache, cached_property

import llguidance
import llguidance.hf
import torch
from llguidance.gbnf_to_lark import any_to_lark

from engine.config import ReasoningTags, StructuredOutput

logger = logging.getLogger("gorgon.engine")

COMPILED_GRAMMARS = 64  # compiled matchers kept, the least recently used dropped
# JSON whitespace as llama.cpp's JSON-schema grammars allow it: a space, or a line break or two and an indent of up
# to 20 spaces or tabs. llguidance's default allows any run of whitespace, and small models fill max_tokens with it.
JSON_WHITESPACE = r"(?: |\n{1,2}[ \t]{0,20})?"


COMBINATIONS = ("allOf", "anyOf", "oneOf")  # JSON Schema's keywords that combine schemas


def closed(schema: object, part: bool = False) -> object:
    """schema with `"additionalProperties": false` in every object that lists its properties and says nothing of
    others (as OpenAI's strict function schemas and vLLM's guidance backend take them): a small model otherwise
    goes on inventing arguments. Not in a part of an allOf / anyOf / oneOf, nor in an object whose parts list
    properties of their own (zod's intersections and unions): closing either would refuse the other's."""
    if isinstance(schema, list):
        return [closed(s, part) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v, part=k in COMBINATIONS) for k, v in schema.items()}
    parts = [p for k in COMBINATIONS if isinstance(out.get(k), list) for p in out[k] if isinstance(p, dict)]
    parts_add = any("properties" in p or "$ref" in p for p in parts)
    if "properties" in out and "additionalProperties" not in out and not part and not parts_add:
        out["additionalProperties"] = False
    return out


class GrammarError(ValueError):
    """A structured output that cannot be compiled (its message says why)."""


def grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar for spec (not yet checked: `Grammars.matcher` validates it)."""
    if spec.json is not None or spec.json_object:
        try:
            schema = {"type": "object"} if spec.json_object else (
                json.loads(spec.json) if isinstance(spec.json, str) else dict(spec.json))
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be a JSON object")
        schema = without_unknown_formats(schema)
        schema.setdefault("x-guidance", {"whitespace_pattern": JSON_WHITESPACE})
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema)
        except (ValueError, TypeError) as e:  # (a number beyond 64 bits: "Value is not JSON serializable")
            raise GrammarError(f"the JSON schema cannot be used: {e}") from None
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in spec.choice))
    try:  # (Outlines' grammars open with `?start:`, which llguidance's Lark takes and its converter does not know)
        lark = spec.grammar if LARK_START.search(spec.grammar) else any_to_lark(spec.grammar)
    except Exception as e:  # noqa: BLE001 - llguidance's GBNF converter raises plain Exceptions too
        raise GrammarError(f"the grammar is neither Lark (with a `start:` rule) nor valid GBNF: {e}") from None
    # (llguidance's JSON form, as the others: its Lark text alone cannot be composed with other grammars)
    return json.dumps({"grammars": [{"lark_grammar": llguidance.LLMatcher.grammar_from_lark(lark)}]})


LARK_START = re.compile(r"(?m)^\s*\?start\s*:")


def without_unknown_formats(schema: object) -> object:
    """schema without the `format`s llguidance does not know (Pydantic's bytes: "binary", SecretStr: "password"),
    which JSON Schema makes annotations: they constrain nothing (llguidance refused the whole schema)."""
    if isinstance(schema, list):
        return [without_unknown_formats(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("const", "enum", "default", "examples") else without_unknown_formats(v)
           for k, v in schema.items()}
    if isinstance(out.get("format"), str) and not known_format(out["format"]):
        del out["format"]
    return out


@cache
def known_format(name: str) -> bool:
    grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "string", "format": name})
    return not llguidance.LLMatcher.validate_grammar(grammar)


class Grammars:
    """Compiles StructuredOutputs into matchers for one tokenizer (`mask_` applies them to logits rows). Invariant: a
    matcher has consumed exactly its request's output tokens."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, sorted(eos_token_ids)
        # grammar text -> its compiled matcher, fresh (a Future while it compiles): a request's n choices, and an
        # agent's tools sent with every request, even by many requests at once, compile once (a large grammar takes
        # seconds)
        self._compiled: OrderedDict[str, Future[llguidance.LLMatcher]] = OrderedDict()
        self._lock = threading.Lock()

    @cached_property
    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary (about a second for a large one: built on the first request)."""
        return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids)

    def matcher(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher for spec; a GrammarError that says what is wrong with it."""
        if self.tokenizer is None:
            raise GrammarError("structured outputs need a tokenizer, and this engine has none (skip_tokenizer_init)")
        grammar = grammar_text(spec)
        tags = spec.after_reasoning
        if tags is not None and not any(tags.end in (text or "") for text in (spec.regex, spec.grammar)):
            grammar = self._after_reasoning(grammar, tags)
        with self._lock:
            compiled, first = self._compiled.pop(grammar, None), False
            if compiled is None:
                compiled, first = Future(), True
            self._compiled[grammar] = compiled  # (the most recently used last)
            while len(self._compiled) > COMPILED_GRAMMARS:
                self._compiled.popitem(last=False)
        if first:
            try:
                compiled.set_result(self._compile(grammar))
            except BaseException as e:
                with self._lock:
                    self._compiled.pop(grammar, None)
                compiled.set_exception(e)
        return compiled.result().deep_copy()

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        error = llguidance.LLMatcher.validate_grammar(grammar, self._ll_tokenizer)
        if error:
            raise GrammarError(f"the structured output cannot be used: {shortened(error)}")
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar)
        # the first mask builds the lexer, which a grammar too complex for it fails (LexerTooComplex): then, not
        # at the first step, where the request would end with unconstrained text
        _fill(matcher, _bitmask(1, self.vocab_size)[0])
        if matcher.is_error():
            raise GrammarError(f"the structured output cannot be used: {shortened(matcher.get_error())}")
        return matcher

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes (where it holds part of a character, its text cannot say them)."""
        return self._ll_tokenizer.decode_bytes([token_id])

    def _after_reasoning(self, grammar: str, tags: ReasoningTags) -> str:
        """grammar (llguidance's JSON) after free reasoning text closed by tags.end, opened by tags.start (optional
        where the prompt opened it; else the answer may skip reasoning), and a little whitespace. A tag that is one
        token of the vocabulary (llguidance reads added tokens as special, never as text) is matched as that token."""
        def tag(text: str) -> str | None:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            return f"<[{ids[0]}]>" if len(ids) == 1 else None

        start = tag(tags.start) or json.dumps(tags.start)
        end = tag(tags.end)
        # free text up to the end tag: any text, then the tag's token; or the shortest text that ends with the tag
        end_text = re.escape(tags.end).replace("/", "\\/")
        thinking, rules = (f"/(.|\\n)*/ {end}", "") if end else (
            "thinking", f"thinking[lazy]: /(.|\\n)*{end_text}/\n")
        # (a little whitespace after the reasoning, none where there is none: a model left free fills it)
        after = "/[ \\t\\n]{0,4}/"
        reasoning = f"{start}? {thinking} {after}" if tags.opened_by_prompt else f"({start} {thinking} {after})?"
        top = json.loads(grammar)
        top["grammars"][0]["name"] = "answer"
        lark = f"start: {reasoning} @answer\n{rules}"
        return json.dumps({"grammars": [{"lark_grammar": lark}, *top["grammars"]]})


def mask_(logits: torch.Tensor, matchers: list[llguidance.LLMatcher | None]) -> None:
    """Set to -inf, in place, the logits [rows, vocab] of every token row i's matcher (None: no constraint) does not
    allow next. (llguidance.torch is not imported: its apply runs through torch.compile, seconds of compiling on the
    first request and a C++ toolchain, and importing it loads torch's compiler, 2.5 s of every start.)"""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    bitmask = _bitmask(len(rows), logits.shape[-1])
    for k, i in enumerate(rows):
        _fill(matchers[i], bitmask[k])
    _apply(logits, rows, bitmask)


def mask_tree_(logits: torch.Tensor, matcher: llguidance.LLMatcher, paths: list[list[int]]) -> None:
    """Medusa verification: set to -inf, in place, the logits [nodes, vocab] of the tokens the matcher does not allow
    after node i's path (paths[i]: the node's tokens below the tree's root, whose token the matcher has consumed). A
    row whose path the grammar refuses, or ends, stays as it is: no walk takes its token (its parent's row refuses
    it), or the request ends there. The matcher is left as it was."""
    bitmask = torch.full((len(paths), _words(logits.shape[-1])), -1, dtype=torch.int32)
    for k, path in enumerate(paths):
        consumed = matcher.try_consume_tokens(path)
        if consumed == len(path) and not matcher.is_stopped():
            _fill(matcher, bitmask[k])
        matcher.rollback(consumed)
    _apply(logits, list(range(len(paths))), bitmask)


def shortened(error: str, limit: int = 500) -> str:
    """llguidance's error, which may quote the whole grammar (a client's, up to a request's size), cut for a
    message or a log line."""
    return error if len(error) <= limit else f"{error[:limit]}... ({len(error) - limit} more characters)"


def _words(vocab: int) -> int:
    return (vocab + 31) // 32


def _bitmask(rows: int, vocab: int) -> torch.Tensor:
    return torch.empty(rows, _words(vocab), dtype=torch.int32)  # bit j of word w: token 32 w + j


def _fill(matcher: llguidance.LLMatcher, row: torch.Tensor) -> None:
    """The tokens the matcher allows next, as bits of row (int32 words)."""
    matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)


def _apply(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    vocab = logits.shape[-1]
    bits = (bitmask.to(logits.device)[:, :, None] >> torch.arange(32, dtype=torch.int32, device=logits.device)) & 1
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(bits.view(len(rows), -1)[:, :vocab] == 0, float("-inf"))


def advance(matcher: llguidance.LLMatcher, token_id: int) -> str | None:
    """Feed the matcher the token just sampled: "stop" when the output is complete (nothing more may follow),
    "error" when the grammar failed (a parser that outgrew llguidance's limits mid-answer: an ambiguous grammar,
    a lexer too complex), None while it goes on."""
    matcher.consume_token(token_id)
    if matcher.is_error():
        logger.warning("structured output failed at token %d: %s", token_id, shortened(matcher.get_error()))
        return "error"
    return "stop" if matcher.is_stopped() else None
