"""Prompts as users bring them. Files, read the same way by `gorgon bench medusa --prompts` and `gorgon train-medusa
--prompts`: a .jsonl file (one record a line) or a .json file (a list of records). A record is a prompt string, or an
object holding one: "messages" (a chat in OpenAI's roles), "conversations" (a ShareGPT chat: its turns before the
model's first answer, as vLLM's benchmarks take them), "prompt" or "text". `gorgon train-medusa --data` reads the
same files' whole chats, answers included (chat_of, chat_answer_ids). And a prompt or chat as the token ids a chat
model answers (chat_prompt_ids)."""
from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

from transformers import PreTrainedTokenizerBase

RECORD_SUFFIXES = (".jsonl", ".json")
# apply_chat_template's own parameters, and the names it renders the messages under: never template variables
# (chat_template_kwargs) one may set
TEMPLATE_CALL_PARAMETERS = (set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {"kwargs"}
                            | {"messages", "conversations"})
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user"}
SHAREGPT_ANSWER_ROLES = ("gpt", "assistant", "model", "chatgpt", "bard")


def check_template_variables(variables: dict) -> None:
    """chat_template_kwargs may name the template's own variables, never the names the call itself sets."""
    taken = sorted(variables.keys() & TEMPLATE_CALL_PARAMETERS)
    if taken:
        raise ValueError(f"chat_template_kwargs: {', '.join(taken)} cannot be set there (the chat template call "
                         "sets them)")


def is_record_file(path: Path) -> bool:
    return path.suffix.lower() in RECORD_SUFFIXES


def read_prompt_records(path: Path) -> list[str | list[dict]]:
    """Each record's prompt: a string, or a chat's messages [{"role", "content"}, ...]. A record with none, or an
    empty one, is a ValueError naming the file and the record; but ShareGPT conversations with no human turn before
    the model's first answer (its dumps hold some, and empty ones) are skipped, with a warning that counts them."""
    prompts, unasked = [], 0
    for n, record in enumerate(read_records(path), 1):
        if isinstance(record, dict) and "messages" not in record and isinstance(record.get("conversations"), list):
            turns = _sharegpt_prompt(record["conversations"])
            unasked += turns is None
            prompts += [turns] if turns is not None else []
            continue
        prompt = _prompt_of(record)
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError(f"{path}: record {n} holds no prompt: expected a string, or an object with 'messages', "
                             "'conversations', 'prompt' or 'text'")
        prompts.append(prompt)
    if unasked:
        warnings.warn(f"{path}: skipped {unasked} ShareGPT conversations with no human turn before the model's "
                      "first answer", stacklevel=2)
    return prompts


def read_records(path: Path) -> list:
    """The records of a .jsonl file (one a line) or a .json file (a list); errors name the file."""
    text = path.read_text(encoding="utf-8-sig")  # (a byte-order mark is no JSON)
    try:
        if path.suffix.lower() == ".json":
            records = json.loads(text)
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a JSON list of records")
            return records
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON{'' if path.suffix.lower() == '.json' else ' lines'}: {e}") from None


def chat_of(record: object) -> list[dict] | None:
    """A record's whole chat, answers included, as OpenAI messages: its "messages", or its ShareGPT
    "conversations" (turns of unknown roles left out); None for a record that holds no chat."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return [{**m, "content": _text_of(m.get("content"))} for m in record["messages"] if isinstance(m, dict)]
    if not isinstance(record.get("conversations"), list):
        return None
    messages = []
    for turn in record["conversations"]:
        if not isinstance(turn, dict):
            continue
        role = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(role) or ("assistant" if role in SHAREGPT_ANSWER_ROLES else None)
        value = turn.get("value", turn.get("content"))
        if role is not None and isinstance(value, str):
            messages.append({"role": role, "content": value})
    return messages


def chat_answer_ids(tokenizer, messages: list[dict]) -> tuple[list[int], int] | None:
    """A chat up to its first answer, in the model's template, as token ids, and where that answer starts; None if
    it has no answer after a question. (Later turns are left out: templates write earlier turns differently once
    more follow, Mistral's moves the system text to the last question. And a template may write a turn differently
    once an answer follows it, as Qwen3's drops its empty thinking: the answer starts where the chat parts from the
    prompt as the server writes it.)"""
    first_answer = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), 0)
    if not any(m.get("role") == "user" for m in messages[:first_answer]):
        return None
    prompt = chat_prompt_ids(tokenizer, messages[:first_answer])
    ids = list(tokenizer.apply_chat_template(messages[:first_answer + 1], tokenize=True,
                                             return_dict=True)["input_ids"])
    start = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
    return (ids, start) if start < len(ids) else None


def _text_of(content: object) -> object:
    """A message's content parts joined by lines; other content as it is."""
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def _prompt_of(record: object) -> str | list[dict] | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):  # up to the first answer, as a ShareGPT record's (a fine-tuning
        return _first_question(record["messages"])  # set holds the answers too: the model is to write them)
    prompt = record.get("prompt", record.get("text"))
    return prompt if isinstance(prompt, str) else None


def _first_question(messages: list) -> list[dict]:
    """OpenAI-format messages before the first assistant turn, each text (content parts joined by lines)."""
    asked = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") == "assistant":
            break
        asked.append({**message, "content": _text_of(message.get("content"))})
    return asked


def _sharegpt_prompt(conversation: list) -> list[dict] | None:
    """A ShareGPT conversation's turns before the model's first answer, as messages; None without a human one."""
    turns = []
    for turn in conversation:
        # ("from"/"value", or as some dumps write them, "role"/"content")
        role = SHAREGPT_ROLES.get(turn.get("from", turn.get("role"))) if isinstance(turn, dict) else None
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):  # the model's first answer, or no known turn
            break
        turns.append({"role": role, "content": value})
    return turns if any(t["role"] == "user" and t["content"].strip() for t in turns) else None


def template_message(message: dict) -> dict:
    """A chat message as a chat template reads it, as vLLM's LLM.chat and the server give it: OpenAI's content
    parts (text only) joined, a line each, and OpenAI's `developer` role, which templates do not know, as `system`."""
    content = message.get("content")
    if isinstance(content, list):
        kinds = {part.get("type") if isinstance(part, dict) else type(part).__name__ for part in content} - {"text"}
        if kinds:
            raise ValueError(f"content parts of type {', '.join(map(repr, sorted(map(str, kinds))))} are not "
                             "supported: text only")
        if not all(isinstance(part.get("text"), str) for part in content):
            raise ValueError("a text content part needs its text: {\"type\": \"text\", \"text\": \"...\"}")
        content = "\n".join(part["text"] for part in content)
    role = "system" if message.get("role") == "developer" else message.get("role")
    return {**message, "role": role, "content": content}


def chat_prompt_ids(tokenizer, chat: str | list[dict], template_kwargs: dict | None = None) -> list[int]:
    """A user prompt (or a chat's messages) as token ids in the model's chat format, ready for its answer, as the
    server writes them for a model with a chat template: the template writes any BOS itself (tokenizing its text
    again would add a second one to Llama's and Mistral's). A model without one takes a prompt as it is (where
    the server, to answer any client, renders its plain fallback template)."""
    if not tokenizer.chat_template:
        if not isinstance(chat, str):
            raise ValueError("chat messages need a chat template, and the model has none")
        return tokenizer(chat)["input_ids"]
    messages = [{"role": "user", "content": chat}] if isinstance(chat, str) else list(map(template_message, chat))
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, **(template_kwargs or {}))["input_ids"])
