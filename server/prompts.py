"""A request's prompt as token ids: a completion's text or ids (checked against the vocabulary), or chat
messages through the chat template."""
from __future__ import annotations

from server.errors import APIError
from server.protocol import ChatMessage

# Used when the tokenizer has none (e.g. a base model): one "<|role|>" header line per message.
FALLBACK_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def check_token_ids(tokenizer, token_ids: list[int], param: str) -> list[int]:
    """Ids the tokenizer knows; anything else is the client's error (a 400), never the engine's."""
    vocab = len(tokenizer)
    bad = next((t for t in token_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of the vocabulary (ids are in [0, {vocab}))", param=param)
    return token_ids


def completion_prompt_ids(tokenizer, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    return check_token_ids(tokenizer, prompt, "prompt")


def chat_prompt_ids(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": m.role, "content": m.text} for m in messages],
                                         chat_template=tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE,
                                         tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
