"""User-facing configuration: EngineConfig (per engine) and SamplingParams (per request)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.prompt_files import check_template_variables
from models.gguf import find_gguf
from models.loader import default_dtype, default_kv_cache_dtype
from models.named import resolve_model


def available_memory(device: str) -> int | None:
    """Bytes free on `device` now: CUDA's free memory, or the host's available memory (Linux's MemAvailable, else
    its free pages); None where the OS tells neither."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # (macOS has no SC_AVPHYS_PAGES)
        return None


# host memory left free when the decode kernels lay the weights out (activations, tokenizer, server, Medusa heads)
PACKING_HEADROOM = 1 << 30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ContextLengthError(ValueError):
    """A request that cannot fit the model's context: its prompt, or its prompt plus max_tokens."""


@dataclass(frozen=True)
class ReasoningTags:
    """How a reasoning model marks its thinking: `start` opens it and `end` closes it. `opened_by_prompt`: the chat
    template ends the prompt with `start` (DeepSeek-R1), so an answer reasons first; otherwise (Qwen3) an answer
    reasons only where it opens with `start`."""

    start: str = "<think>"
    end: str = "</think>"
    opened_by_prompt: bool = False


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on every token a request samples (engine.structured), as vLLM's structured outputs: exactly one
    of a JSON schema (a dict, or its JSON text), any JSON object, a regular expression the whole output matches,
    a choice among strings, or a grammar: Lark (llguidance's dialect, with a `start:` rule) or llama.cpp's GBNF
    (`root ::= ...`). With `after_reasoning`, a reasoning model's thinking comes first, unconstrained, as vLLM
    applies structured outputs after it; a regex or grammar that writes the tags itself constrains it all."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    after_reasoning: ReasoningTags | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "json_object", "regex", "choice", "grammar")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"a structured output takes exactly one of json, json_object, regex, choice and grammar "
                             f"(got {', '.join(given) or 'none'})")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured output choices must be non-empty strings, at least one")


GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How to decode one request. temperature 0 (below 1e-5) means greedy; top_k 0 or -1 and top_p == 1 disable
    those filters; top_p 0 keeps the likeliest token alone (with any tied with it), as OpenAI's API allows.
    As in vLLM, None stands for the default of min_tokens, top_k, stop, stop_token_ids and logit_bias, and
    max_tokens None for the rest of the context."""

    max_tokens: int | None = 64
    # vLLM's: stop tokens are masked and stop strings not looked for until the output holds this many tokens
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # drop tokens whose probability is below min_p times the likeliest one's
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: times how often the token was generated
    repetition_penalty: float = 1.0  # HF's/vLLM's: logits of prompt and generated tokens divided (>0) or multiplied
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # vLLM's: the output ends with the stop string it met, not before it
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # the text leaves special tokens out (their ids stay in token_ids)
    logprobs: int | None = None  # return the sampled token's logprob and this many top alternatives
    prompt_logprobs: int | None = None  # also each prompt token's logprob and this many alternatives
    use_medusa: bool = True  # speculate with the engine's Medusa heads, if it has any
    # the output expected, as token ids (OpenAI's Predicted Outputs): where the output follows it, its next tokens
    # are drafted, with or without heads, where the engine drafts by prompt lookup (engine.medusa.ngram)
    prediction: list[int] = field(default_factory=list)
    structured: StructuredOutput | None = None  # constrain the output to a JSON schema, regex, ... (engine.structured)
    cache_salt: str | None = None  # vLLM's: prefix-cache hits only among requests with the same salt (a tenant's)
    # the final-normed hidden state that produced each output token, on the finished RequestOutput (what Medusa
    # heads learn from: engine.training.medusa); such requests decode plainly
    return_hidden_states: bool = False

    def __post_init__(self) -> None:
        for name, default in (("min_tokens", 0), ("top_k", 0), ("logit_bias", {}), ("stop", []),
                              ("stop_token_ids", [])):
            if getattr(self, name) is None:
                setattr(self, name, default)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (integers), got {list(self.stop_token_ids)[:5]}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= -1 (0 or -1 disables it), got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or below GREEDY_TEMPERATURE (as vLLM's): logits / 1e-39 overflowed to inf and NaN."""
        return self.temperature < GREEDY_TEMPERATURE


@dataclass
class EngineConfig:
    """How to run one model. `model` None means the shipped default model."""

    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None  # default (models.loader.default_dtype): bfloat16 on CUDA; on the CPU the checkpoint's
    # own when it is bfloat16, else float32
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: sized from kv_cache_memory
    # bytes for the KV pool when num_kv_blocks is not given; at most the blocks max_num_seqs sequences of the whole
    # context take
    kv_cache_memory: int = 1 << 30
    # the KV cache's dtype; "auto" (models.loader.default_kv_cache_dtype): the activations', but fp16 for GGUF files
    # and quantized weights, as llama.cpp. An fp32 model may keep its K/V in "bfloat16" or "float16", which halves
    # the cache's bytes: twice the blocks, and long-context attention, bound by reading them, faster. Attention still
    # computes in fp32.
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-step token budget; longer prompts are prefilled in chunks
    max_model_len: int | None = None  # default: the model's own limit
    attention_backend: str = "auto"
    # decode steps on CUDA replay captured graphs (engine.cuda_graphs), with the Triton attention backend; False:
    # every step runs eagerly (vLLM's --enforce-eager)
    cuda_graphs: bool = True
    cpu_kernels: bool = True  # gorgon's CPU decode kernels where they apply; False: torch's operators only
    # every row computed by the same kernels in the same order whatever shares its batch or step (the CPU
    # kernels take every size), so a request's tokens never depend on the traffic around it (README: the
    # exact guarantee). None: on where it costs at most 5% (models.kernels.decode.invariance_is_cheap)
    batch_invariant: bool | None = None
    # "int8" / "int4": quantize an HF checkpoint's linears at load (a GGUF file's float and kernel-less ones)
    quantization: str | None = None
    # a GGUF file's quantized weights dequantized into dtype at load, as off the CPU: 2-4x their memory, but large
    # batches skip dequantizing tiles of them every step (offline generation: train-medusa writes its text so)
    dequantize: bool = False
    enable_prefix_caching: bool = True
    seed: int = 0
    adapter_root: str | None = None  # adapters load only from inside this folder; default: <model>/adapters
    max_adapters: int = 8  # loaded adapters (LoRA slots); loading one more evicts the least recently used idle one
    max_lora_rank: int = 16
    tokenizer: str | None = None  # a folder to take the tokenizer from; None: the model's folder
    chat_template: str | None = None  # a Jinja chat template in place of the tokenizer's own (vLLM's --chat-template)
    # the chat template's variables where a request sets none of its own (vLLM's --default-chat-template-kwargs:
    # {"enable_thinking": false} for Qwen3)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    skip_tokenizer_init: bool = False  # no tokenizer: token-id prompts only, outputs carry token ids and no text
    # "auto": a request without sampling parameters (the HTTP API: a field left out) takes the ones the model
    # recommends (models.loader.recommended_sampling: generation_config.json, a GGUF's general.sampling.*), as vLLM
    # and llama.cpp do; "none": SamplingParams' own defaults
    generation_config: str = "auto"
    # Medusa heads folder (published format); "auto": the model's own; "lookup": no heads, prompt-lookup drafts
    # alone (medusa_ngram_tokens); "prediction": no heads, drafts only from requests' predicted outputs
    # (SamplingParams.prediction); None: no speculation
    medusa: str | None = None
    medusa_tree: str | None = None  # a shipped tree's name (engine.medusa.tree.TREES) or a JSON file; None: the
    # tree measured for the heads (engine.medusa.tree.TreeChoice), else the default
    # speculate only while at most this many sequences decode together (more: plain decoding, which is faster
    # there); None: the measured tree's own limit (TreeChoice), else no limit
    medusa_max_batch_size: int | None = None
    # how sampled requests accept drafts. "rejection": speculative rejection sampling, the output follows plain
    # sampling's distribution exactly; "typical": typical acceptance, accept when p > min(threshold, alpha *
    # exp(-entropy)), which trades that exactness for longer accepted runs (greedy requests are exact either way)
    medusa_acceptance: str = "rejection"
    medusa_posterior_threshold: float = 0.09
    medusa_posterior_alpha: float = 0.3
    # Medusa also drafts by prompt lookup (engine.medusa.ngram): where a sequence's last 3 (else 2) tokens
    # occurred in it before, the tokens that followed them are verified as a chain in place of the heads' tree: as
    # many as that tree drafts at the batch's size (a sequence alone: its nodes but the root; a batch: its depth),
    # at most this many (Medusa.chain_limit; None: 8, and 4 for prompt lookup alone); 0: the heads alone
    medusa_ngram_tokens: int | None = None
    # the heads pause where their tree steps emit fewer tokens than the steps cost (engine.medusa.payoff), judged on
    # the engine's own step times, for which it makes a plain step now and then; False: they draft at every step
    # (train-medusa times the trees so)
    medusa_guard: bool = True
    # ranks that split the model (engine.parallel): rank 0 is this process, which schedules and samples; the
    # others are started here (one host) or by torchrun (several hosts)
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in _DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto' or one of {list(_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.quantization is not None and self.device != "cpu":
            raise ValueError(f"quantization {self.quantization!r} runs on the CPU (its kernels are C++); on "
                             f"{self.device} run the checkpoint unquantized (bfloat16 by default)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_adapters", "max_lora_rank",
                     "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.medusa_max_batch_size is not None and self.medusa_max_batch_size < 1:
            raise ValueError(f"medusa_max_batch_size must be >= 1, got {self.medusa_max_batch_size}")
        if self.medusa_ngram_tokens is not None and self.medusa_ngram_tokens < 0:
            raise ValueError(f"medusa_ngram_tokens must be >= 0, got {self.medusa_ngram_tokens}")
        if self.medusa_posterior_threshold < 0 or self.medusa_posterior_alpha < 0:
            raise ValueError("medusa_posterior_threshold and medusa_posterior_alpha must be >= 0")
        check_template_variables(self.chat_template_kwargs)
        if self.generation_config not in ("auto", "none"):
            raise ValueError(f"generation_config must be 'auto' or 'none', got {self.generation_config!r}")
        if self.medusa_acceptance not in ("rejection", "typical"):
            raise ValueError(f"medusa_acceptance must be 'rejection' or 'typical', got {self.medusa_acceptance!r}")

    def resolve_model(self) -> Path:
        """The model's path (a name per models.named, a path, or None: the default model); settles dtype's
        default for that checkpoint (models.loader.default_dtype) when none was asked for, then kv_cache_dtype's
        (default_kv_cache_dtype), and checks that the KV cache can take it beside the activations."""
        path = resolve_model(self.model)
        if self.dtype is None:
            self.dtype = default_dtype(path, self.device)
        if self.kv_cache_dtype == "auto":
            self.kv_cache_dtype = default_kv_cache_dtype(path, self.dtype, self.quantization)
        self._check_kv_cache_dtype()
        return path

    @property
    def weights(self) -> str:
        """The weights as the engine runs them, in words: the checkpoint's file or folder name, the dtype and any
        load-time quantization (after resolve_model). What a step costs depends on them and on the CPU."""
        path = resolve_model(self.model)
        quantized = (f", quantized {self.quantization}" if self.quantization else
                     ", dequantized" if self.dequantize and find_gguf(path) else "")
        return f"{path.name} ({self.dtype}{quantized})"

    @property
    def packing_budget(self) -> int | None:
        """Bytes each rank's decode kernels may take for their packed copy of its weights (set_decode_kernels): what
        the host has free now, less every rank's KV cache budget and PACKING_HEADROOM, shared among the ranks (None,
        no limit, where the OS does not tell what is free)."""
        free, tp = available_memory("cpu"), self.tensor_parallel_size
        return None if free is None else (free - tp * self.kv_cache_memory - PACKING_HEADROOM) // tp

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.kv_cache_dtype]

    def _check_kv_cache_dtype(self) -> None:
        """The cache holds the activations' dtype, or a 16-bit one under fp32 activations."""
        if self.kv_cache_dtype == self.dtype:
            return
        if self.dtype != "float32" or self.kv_cache_dtype == "float32":
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} needs float32 activations and a 16-bit cache; "
                             f"the model runs in {self.dtype} (use 'auto': the cache then holds {self.dtype})")
