"""Request and response bodies of the HTTP API: the OpenAI subset we serve, vLLM's extensions (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids`, `min_tokens`, `structured_outputs` and `guided_*`, the chat
template's fields), ours (`use_medusa`), vLLM's adapter routes and /tokenize, /detokenize.

Request bodies are strict: a value of the wrong JSON type is an error (no "5" for 5), and so is a field we do
not know. OpenAI fields we do not serve are declared, so that their error names them; the few that cannot
change an answer (`user`, `store`, `metadata`, ...) are accepted and unused."""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engine import StructuredOutput
from engine.prompt_files import template_message
from engine.structured import closed

# Bounds beyond which a parameter is a mistake rather than a wish.
MAX_N = 16
MAX_PROMPTS = 64  # prompts in one completions request (each has n choices)
MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 256
MAX_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit
INT64 = 1 << 63

TokenId = Annotated[int, Field(ge=0)]  # the vocabulary's upper bound is checked per model (server.prompts)
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
PromptText = Annotated[str, Field(min_length=1)]
PromptIds = Annotated[list[TokenId], Field(min_length=1)]


def omitted_when_none() -> Any:
    """A response field of ours or vLLM's, left out of the body unless set, so OpenAI's shape stays as it is."""
    return Field(default=None, exclude_if=lambda value: value is None)


def random_id(prefix: str) -> str:
    """A unique id that starts with prefix, as OpenAI's do: "chatcmpl-...", or "resp_..." in the Responses API."""
    return prefix + uuid.uuid4().hex


def field_error(message: str) -> PydanticCustomError:
    """A validation error whose message names its field (server.errors sends it as it is)."""
    return PydanticCustomError("field_error", message)


def unsupported(field: str, detail: str = "") -> PydanticCustomError:
    return field_error(f"{field} is not supported by this server{detail}")


MAX_TEMPLATE_NESTING = 32  # lists and objects inside a chat template variable


def shallow(variables: dict[str, Any]) -> dict[str, Any]:
    """chat_template_kwargs nested no deeper than MAX_TEMPLATE_NESTING (deeper, the template's rendering ran out
    of recursion: a 500 and a traceback of thousands of lines)."""
    level, depth = list(variables.values()), 1
    while level:
        if depth > MAX_TEMPLATE_NESTING:
            raise field_error(f"chat_template_kwargs: nested more than {MAX_TEMPLATE_NESTING} deep")
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ())]
        depth += 1
    return variables


TemplateVariables = Annotated[dict[str, Any], AfterValidator(shallow)]


class RequestBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every 4xx/5xx the server sends has this shape."""

    error: ErrorInfo


class StreamOptions(RequestBody):
    include_usage: bool = False  # a last chunk with the usage of the whole answer
    continuous_usage_stats: bool = False  # vLLM's, with include_usage: every chunk with its choice's usage so far
    include_obfuscation: bool | None = None  # OpenAI's padding of chunks against side channels: none is sent


class JsonSchemaFormat(RequestBody):
    """OpenAI's `response_format.json_schema`."""

    name: str = Field(default="response", min_length=1, max_length=64)  # OpenAI requires one; it cannot change output
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {}: any JSON value
    strict: bool | None = None  # the schema is always enforced; strict also closes its objects (structured.closed)


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama.cpp's server's, with json_object

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise field_error('response_format takes json_schema with type "json_schema", and only then')
        if self.schema_ is not None and self.type != "json_object":
            raise field_error('response_format takes schema with type "json_object" (llama.cpp\'s form), and only then')
        return self


class StructuredOutputs(RequestBody):
    """vLLM's `structured_outputs`: one of these constrains the output (engine.config.StructuredOutput)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


def joined_text(content: str | list) -> str:
    """Text given whole or in parts (each with a .text): the parts on lines of their own, as vLLM joins them."""
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


# OpenAI's limits on a request's metadata: 16 pairs, keys of up to 64 characters, values of up to 512
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=16)]


def options_of_a_stream(value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
    """A validator of `stream_options`, which only a streamed request may give."""
    if value is not None and not info.data.get("stream"):
        raise field_error("stream_options is only allowed with stream: true")
    return value


def nulls_left_out(data: Any) -> Any:
    """A body's top-level fields sent as null, as left out: OpenAI's API takes null for "the default" (an SDK
    passes its callers' None), and a sampling field left out takes the model's recommended value."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class SamplingRequest(RequestBody):
    """Fields that completions and chat share."""

    _nulls = model_validator(mode="before")(nulls_left_out)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # token id (a decimal string, as OpenAI's clients send it) -> added to that token's logit
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS_ENTRIES)] | None = None
    user: str | None = None  # accepted and unused: an end-user id for OpenAI's abuse monitoring
    # vLLM's extensions
    top_k: int = Field(default=0, ge=-1, lt=1 << 31)  # 0 or -1: off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)  # no stop token or string ends the answer before this many tokens
    include_stop_str_in_output: bool = False  # the answer ends with the stop string it met
    skip_special_tokens: bool = True  # False: special tokens' text is in the answer
    spaces_between_special_tokens: bool = True  # vLLM's: accepted, unused (fast tokenizers' decoding has no spaces)
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_STRINGS)] | None = None  # the answer ends at any
    return_token_ids: bool = False  # choices carry their token ids, and the answer its prompt's
    # the prefix cache shares K/V only among requests with the same salt (a tenant's: none can tell, from how
    # fast it is answered or its cached_tokens, what another tenant's prompts held)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs or its older guided_* fields (one)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # ours
    use_medusa: bool = True  # False: decode without Medusa speculation even when the server has heads

    _options_of_a_stream = field_validator("stream_options")(options_of_a_stream)

    @property
    def structured_output_fields(self) -> list[str]:
        """The fields that constrain the output (one at most is valid)."""
        given = [name for name in ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                                   "guided_grammar") if getattr(self, name) is not None]
        fmt = self.response_format
        return given + ["response_format"] * (fmt is not None and fmt.type != "text")

    @property
    def structured_output(self) -> StructuredOutput | None:
        """The constraint on the output, as the engine takes it (None: free text). Raises ValueError when the
        request gives more than one, or one that names nothing (structured_outputs: {})."""
        given, fmt = self.structured_output_fields, self.response_format
        if len(given) > 1:
            raise ValueError(f"give one structured output, not {' and '.join(given)}")
        if fmt is not None and fmt.type == "json_object":  # (with a schema: llama.cpp's server's form of json_schema)
            return StructuredOutput(json_object=True) if fmt.schema_ is None else StructuredOutput(json=fmt.schema_)
        if fmt is not None and fmt.type == "json_schema":  # (strict: no keys the schema does not list, as OpenAI's)
            schema = fmt.json_schema.schema_ or {}
            return StructuredOutput(json=closed(schema) if fmt.json_schema.strict else schema)
        so = self.structured_outputs
        if so is not None:
            return StructuredOutput(json=so.json_, json_object=bool(so.json_object), regex=so.regex, choice=so.choice,
                                    grammar=so.grammar)
        if any(v is not None for v in (self.guided_json, self.guided_regex, self.guided_choice, self.guided_grammar)):
            return StructuredOutput(json=self.guided_json, regex=self.guided_regex, choice=self.guided_choice,
                                    grammar=self.guided_grammar)
        return None

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def token_limit(self) -> int | None:
        """The most tokens to generate (None: up to the context's end)."""
        return self.max_tokens

    @property
    def top_alternatives(self) -> int | None:
        """How many top alternatives to report with each sampled token's logprob (None: no logprobs)."""
        return None

    @property
    def prompt_alternatives(self) -> int | None:
        """The same for each prompt token (None: no prompt logprobs)."""
        return None


class CompletionRequest(SamplingRequest):
    """One prompt (text or token ids) or a batch of them, as OpenAI takes it; each prompt gets n choices, and
    choice i answers prompt i // n."""

    prompt: (PromptText | PromptIds | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[PromptIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the answer's text starts with the prompt's
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:  # one message for the four shapes, not one per shape
            raise field_error(f"prompt must be a non-empty string, a non-empty list of token ids (integers >= 0), "
                              f"or a list of up to {MAX_PROMPTS} of either kind") from None

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise unsupported("best_of", " other than n (each choice is one sample)")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise unsupported("suffix")
        return value

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        batch = isinstance(self.prompt, list) and not isinstance(self.prompt[0], int)
        return self.prompt if batch else [self.prompt]

    @property
    def top_alternatives(self) -> int | None:
        return self.logprobs

    @property
    def prompt_alternatives(self) -> int | None:
        return self.logprobs if self.echo else None


class FunctionCall(RequestBody):
    name: str = Field(min_length=1, max_length=64)
    arguments: str  # JSON text, as OpenAI sends and returns it

    @model_validator(mode="before")
    @classmethod
    def _sdk_parse(cls, data: Any) -> Any:
        """A call the openai SDK's parse helpers return holds `parsed_arguments`, its arguments parsed: sent back,
        the arguments say it."""
        return {k: v for k, v in data.items() if k != "parsed_arguments"} if isinstance(data, dict) else data


class ToolCall(RequestBody):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    # a call rebuilt from a stream's deltas carries their index: accepted, unused (the list's order says it)
    index: int | None = Field(default=None, exclude=True)


class FunctionDefinition(RequestBody):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments (None: any object)
    strict: bool | None = None  # the arguments always follow the schema


class ToolDefinition(RequestBody):
    type: Literal["function"]
    function: FunctionDefinition


class ToolName(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: ToolName


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class Prediction(RequestBody):
    """OpenAI's Predicted Outputs: text the answer is expected to repeat much of (a file to edit). Where the
    answer follows it, its next tokens are drafted and verified in one step; the answer is the same with or
    without it."""

    type: Literal["content"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


ANSWER_EXTRAS = ("refusal", "annotations", "audio", "function_call")


class ChatMessage(RequestBody):
    """A message of text. OpenAI's `developer` role is the system role of newer models: a chat template, which
    knows `system` only, gets it as `system`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only in an assistant message of tool calls
    name: str | None = None  # passed on to the chat template, which may use it
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls (server.tools)
    tool_call_id: str | None = None  # a tool message: the call it answers
    reasoning_content: str | None = None  # an assistant's earlier reasoning, sent back (templates may read it)

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        """Name what a text-only server without tools cannot take, rather than list how it failed to parse."""
        if not isinstance(data, dict):
            return data
        # what an SDK's message object holds besides (model_dump() of an answer sent back), empty in ours; and
        # `parsed`, the SDK parse helpers' reading of the content, which the content says
        data = {k: v for k, v in data.items() if (k not in ANSWER_EXTRAS or v) and k != "parsed"}
        reasoning = data.pop("reasoning", None)  # (vLLM's newer name of reasoning_content)
        if reasoning is not None and data.get("reasoning_content") is None:
            data["reasoning_content"] = reasoning
        if data.get("role") == "function" or data.get("function_call"):
            raise field_error("messages: function messages and calls (OpenAI's deprecated functions) are not "
                              "supported by this server: use tools")
        parts = data.get("content") if isinstance(data.get("content"), list) else []
        kinds = {part.get("type") for part in parts if isinstance(part, dict)} - {"text"}
        if kinds:
            raise field_error(f"messages: content parts of type {', '.join(map(repr, sorted(map(str, kinds))))} "
                              "are not supported by this server: it takes text only")
        return data

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.reasoning_content)):
            raise field_error("messages: a message needs content (only an assistant's tool calls or reasoning may "
                              "come without)")
        if self.tool_calls and self.role != "assistant":
            raise field_error("messages: only assistant messages carry tool_calls")
        return self

    @property
    def text(self) -> str:
        """The content; parts on lines of their own (as vLLM joins them)."""
        if self.content is None:
            return ""
        return joined_text(self.content)

    def for_template(self, text: str) -> dict[str, str]:
        """The message as a chat template reads it, with its content as `text`."""
        optional = {"name": self.name, "tool_call_id": self.tool_call_id, "reasoning_content": self.reasoning_content}
        return template_message({"role": self.role, "content": text}
                                | {k: v for k, v in optional.items() if v is not None})


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # accepted and unused: they cannot change an answer (prompt caching: the prefix cache needs no key or hints)
    store: bool | None = None
    metadata: Metadata | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    # tools (server.tools): the answer is either text or calls of these functions
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    # True: several calls in an answer. OpenAI's default is True; llama.cpp's server's, and ours, False: small models
    # given the choice repeat a call until max_tokens
    parallel_tool_calls: bool = False
    prediction: Prediction | None = None
    # vLLM's extensions for the chat template (server.prompts.chat_prompt_ids)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message is the answer's start, continued
    chat_template_kwargs: TemplateVariables | None = None  # the template's own variables (Qwen3's enable_thinking)
    # not served: any value but null (or an empty list, or "none", or OpenAI's default) is an error that names it
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None

    @field_validator("functions", "function_call", "audio", "reasoning_effort", "verbosity",
                     "web_search_options", "moderation")
    @classmethod
    def _not_served(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, [], "none") and not (info.field_name == "verbosity" and value == "medium"):
            raise unsupported(info.field_name)
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise field_error("top_logprobs needs logprobs: true")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value not in (None, ["text"]):
            raise unsupported("modalities", ' other than ["text"]')
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionTokensDetails(BaseModel):
    """With a prediction: how many of its tokens the answers repeat (in order), and how many not."""

    accepted_prediction_tokens: int
    rejected_prediction_tokens: int


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV the prefix cache held (each prompt's first choice)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | None = None  # requests with a prediction


class CompletionLogprobs(BaseModel):
    """Per token; with `echo`, the prompt's tokens come first, and the first of them has no logprob (null)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string matched, or the stop_token_ids token
    token_ids: list[int] | None = omitted_when_none()  # with return_token_ids
    prompt_token_ids: list[int] | None = omitted_when_none()  # with return_token_ids (in a stream: its first chunk)


class Timings(BaseModel):
    """Ours, on a streamed choice's last chunk: its speed as the engine timed it, in llama.cpp's names (a client
    timing the chunks as they arrive would time the network's and its own buffering). Decoding is timed from the
    first step's tokens to the last token, so `predicted_n` counts the tokens after the first step, whose time is
    `prompt_ms`."""

    prompt_ms: float  # from the request's arrival to its first step's tokens: queueing, prefill, the first step
    predicted_n: int  # the tokens after the first step
    predicted_ms: float  # from the first step's tokens to the last token
    predicted_per_second: float | None  # predicted_n over predicted_ms (None: no time to measure, one step)


class StepInfo(BaseModel):
    """Ours, on each streamed chunk of an answer (OpenAI's clients ignore it): the engine step behind the chunk.
    In a Medusa step, all its tokens but the last are drafts that verification accepted, and the last is the token
    the verify step added; a plain step adds one token. `LLM.stream` yields the same steps (a RequestOutput each,
    its `new_token_ids`)."""

    step_tokens: int  # tokens the step added (0: none, e.g. a last chunk releasing text held back for a stop string)
    tokens: list[str] | None = omitted_when_none()  # each one's text
    timings: Timings | None = omitted_when_none()  # on each choice's last chunk


class CompletionResponse(BaseModel):
    """A whole answer, or (with `stream`) one SSE chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    gorgon: StepInfo | None = omitted_when_none()  # ours, on streamed chunks (StepInfo)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = omitted_when_none()  # --reasoning-parser (server.reasoning)
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string matched, or the stop_token_ids token
    token_ids: list[int] | None = omitted_when_none()  # with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = omitted_when_none()  # with return_token_ids


class ToolCallDelta(ToolCall):
    index: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = omitted_when_none()
    tool_calls: list[ToolCallDelta] | None = omitted_when_none()


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string matched, or the stop_token_ids token
    token_ids: list[int] | None = omitted_when_none()  # with return_token_ids


class ChatCompletionChunk(BaseModel):
    """One SSE chunk of a streamed chat answer."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = omitted_when_none()  # with return_token_ids, in the first chunks
    gorgon: StepInfo | None = omitted_when_none()  # ours, on streamed chunks (StepInfo)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "gorgon"
    root: str
    parent: str | None = None
    max_model_len: int
    speculative: bool  # ours: whether `use_medusa` speculates on this server (Medusa heads or prompt lookup)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


AdapterName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]


class LoadLoraAdapterRequest(RequestBody):
    """vLLM's body; the folder may hold a LoRA or a prefix-tuning adapter (told apart by its peft_type). A name
    already loaded is replaced (hot-swapped: its requests in flight finish on the old version), unless load_inplace
    is false, as vLLM refuses it then."""

    lora_name: AdapterName
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool | None = None


class UnloadLoraAdapterRequest(RequestBody):
    lora_name: AdapterName
    lora_int_id: int | None = None  # (vLLM's: accepted, unused; the name says which)


class TokenizeRequest(RequestBody):
    """vLLM's /tokenize: a `prompt`, or chat `messages` (through the chat template)."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True  # prompts only: a chat template writes its own
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: TemplateVariables | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


# --- OpenAI's Responses API (server.responses_api): text in, text out, nothing stored --------------------------

class ResponsesInputItem(BaseModel):
    """An input item. Clients send an earlier answer's output items back as they got them, with whatever fields
    their SDK's version has (ids, statuses, annotations, ...): those are ignored, not refused."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class ResponsesInputPart(ResponsesInputItem):
    type: Literal["input_text", "output_text"]  # output_text: an earlier answer's text, sent back as input
    text: str


class ResponsesInputMessage(ResponsesInputItem):
    """A message of text (an earlier answer's output message among them)."""

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ResponsesInputPart]

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        parts = data.get("content") if isinstance(data, dict) and isinstance(data.get("content"), list) else []
        kinds = {part.get("type") for part in parts if isinstance(part, dict)} - {"input_text", "output_text"}
        if kinds:
            raise field_error(f"input: content parts of type {', '.join(map(repr, sorted(map(str, kinds))))} are "
                              "not supported by this server: it takes text only")
        return data

    def chat_message(self) -> dict[str, str]:
        text = joined_text(self.content)
        return {"role": self.role, "content": text}


class ResponsesFunctionCall(ResponsesInputItem):
    """An earlier answer's call of a function."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class ResponsesFunctionCallOutput(ResponsesInputItem):
    """What a call returned: text, or parts of text (on lines of their own)."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ResponsesInputPart]

    @property
    def text(self) -> str:
        return joined_text(self.output)


class ResponsesReasoningPart(ResponsesInputItem):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ResponsesReasoning(ResponsesInputItem):
    """An earlier answer's reasoning (server.reasoning), sent back: given to the chat template with the assistant
    message after it, as chat's `reasoning_content`."""

    type: Literal["reasoning"]
    content: list[ResponsesReasoningPart] | None = None
    summary: list[ResponsesReasoningPart] = Field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.content or [])


def input_item_type(item: Any) -> str:
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")


INPUT_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")

ResponsesInput = Annotated[Annotated[ResponsesInputMessage, Tag("message")]
                               | Annotated[ResponsesFunctionCall, Tag("function_call")]
                               | Annotated[ResponsesFunctionCallOutput, Tag("function_call_output")]
                               | Annotated[ResponsesReasoning, Tag("reasoning")],
                               Discriminator(input_item_type)]


class ResponsesFunctionTool(RequestBody):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedTool(RequestBody):
    type: Literal["function"]
    name: str


class ResponsesTextFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponsesText(RequestBody):
    format: ResponsesTextFormat | None = None
    verbosity: Literal["medium"] | None = None  # (OpenAI's default; another is not served)


class ResponsesRequest(RequestBody):
    """/v1/responses: `instructions` (a system message) and `input` (a user message, or messages and earlier
    calls of functions with their outputs) go through the model's chat template, and the answer is sampled as a
    chat completion's, tools included (ChatCompletionRequest validates it). Stateless: no stored responses to go
    on from, no background runs. A reasoning model's reasoning (--reasoning-parser) is an output item of its own,
    whole (`reasoning` options, such as an effort, are not served)."""

    _nulls = model_validator(mode="before")(nulls_left_out)

    model: str | None = None
    input: list[ResponsesInput]  # (a string: one user message)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    stream: bool = False
    text: ResponsesText | None = None
    # accepted and unused: they cannot change an answer
    store: bool | None = None
    metadata: Metadata | None = None
    user: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    stream_options: StreamOptions | None = None  # (include_obfuscation: no padding is sent)
    truncation: Literal["disabled"] | None = None  # ("auto", dropping the input's start to fit, is not served)
    tools: list[ResponsesFunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedTool | None = None
    parallel_tool_calls: bool = False  # (as chat completions: see ChatCompletionRequest)
    # not served: any value but null (or an empty list, or false) is an error that names the field
    previous_response_id: Any = None
    conversation: Any = None
    reasoning: Any = None
    background: Any = None
    include: Any = None
    prompt: Any = None
    top_logprobs: Any = None
    max_tool_calls: Any = None
    moderation: Any = None

    @field_validator("input", mode="before", json_schema_input_type=str | list[ResponsesInput])
    @classmethod
    def _items(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"type": "message", "role": "user", "content": value}]
        if isinstance(value, list):
            if not value:
                raise field_error("input must hold at least one item")
            kinds = {str(input_item_type(item)) for item in value} - set(INPUT_ITEM_TYPES)
            if kinds:
                raise field_error(f"input: items of type {', '.join(map(repr, sorted(kinds)))} are not supported by "
                                  f"this server (it stores nothing to refer to): {', '.join(INPUT_ITEM_TYPES)} only")
            answered = set()
            for item in value:
                if isinstance(item, dict) and item.get("type") == "function_call":
                    answered.add(item.get("call_id"))
                elif isinstance(item, dict) and item.get("type") == "function_call_output" \
                        and item.get("call_id") not in answered:
                    raise field_error(f"input: no function_call with call_id {item.get('call_id')!r} comes before "
                                      "its function_call_output")
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, value: Any) -> Any:
        kinds = {str(t.get("type")) for t in value if isinstance(t, dict)} - {"function"} if isinstance(
            value, list) else set()
        if kinds:
            raise field_error(f"tools of type {', '.join(map(repr, sorted(kinds)))} are not supported by this "
                              "server: function tools only")
        return value

    @field_validator("truncation", mode="before")
    @classmethod
    def _no_truncation(cls, value: Any) -> Any:
        if value == "auto":
            raise field_error("truncation 'auto' (dropping the input's start to fit the context) is not supported "
                              "by this server")
        return value

    _options_of_a_stream = field_validator("stream_options")(options_of_a_stream)

    @field_validator("previous_response_id", "conversation", "reasoning", "background", "include", "prompt",
                     "top_logprobs", "max_tool_calls", "moderation")
    @classmethod
    def _not_served(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        # (reasoning items come whole, unencrypted: nothing to include for them; `reasoning: {"effort": null}` is none)
        if value in (None, [], False, 0) or (name == "include" and value == ["reasoning.encrypted_content"]) \
                or (name == "reasoning" and isinstance(value, dict) and all(v is None for v in value.values())):
            return value
        raise unsupported(info.field_name, " on /v1/responses")

    def chat(self) -> ChatCompletionRequest:
        """The same answer asked as a chat completion (raises pydantic's ValidationError where it is not valid)."""
        messages: list[dict[str, Any]] = ([{"role": "system", "content": self.instructions}]
                                          if self.instructions is not None else [])
        reasoning = ""  # an earlier answer's, for its assistant message next
        for item in self.input:
            if isinstance(item, ResponsesReasoning):
                reasoning += item.text
            elif isinstance(item, ResponsesInputMessage):
                messages.append(item.chat_message())
            elif isinstance(item, ResponsesFunctionCall):  # an answer's text, then its calls: one assistant message
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if messages and messages[-1]["role"] == "assistant":
                    messages[-1]["tool_calls"] = [*(messages[-1].get("tool_calls") or []), call]
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
            if reasoning and not isinstance(item, ResponsesReasoning) and messages[-1]["role"] == "assistant":
                messages[-1]["reasoning_content"], reasoning = reasoning, ""
        body: dict[str, Any] = {"messages": messages, "model": self.model, "max_tokens": self.max_output_tokens,
                                "parallel_tool_calls": self.parallel_tool_calls}
        # left out where the request leaves them out: the model's recommended values apply then
        body |= {name: getattr(self, name) for name in ("temperature", "top_p") if name in self.model_fields_set}
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if isinstance(self.tool_choice, ResponsesNamedTool):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_schema":
            schema = {"name": fmt.name or "response", "schema": fmt.schema_ or {}, "strict": fmt.strict,
                      "description": fmt.description}
            body["response_format"] = {"type": "json_schema", "json_schema": {k: v for k, v in schema.items()
                                                                              if v is not None}}
        elif fmt is not None:
            body["response_format"] = {"type": fmt.type}
        return ChatCompletionRequest.model_validate(body)


class ResponseOutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class ResponseOutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[ResponseOutputText]


class ResponseReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ResponseReasoningItem(BaseModel):
    """A reasoning model's reasoning (--reasoning-parser), in full: no summary."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ResponseReasoningText]
    status: Literal["in_progress", "completed", "incomplete"]


class ResponseFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int]  # cached_tokens: input tokens whose KV the prefix cache held
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[ResponseReasoningItem | ResponseOutputMessage | ResponseFunctionCall]
    incomplete_details: dict[str, str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float
    top_p: float
    text: dict[str, Any]
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool = False
    tool_choice: str | dict[str, str] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    truncation: str = "disabled"
    store: bool = False
    error: ErrorInfo | None = None
    usage: ResponseUsage | None = None
