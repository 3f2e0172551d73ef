"""LLM: the engine's public face. Owns the tokenizer, scheduler and runner; one `step()` is one forward."""
from __future__ import annotations

import itertools
import numbers
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from jinja2 import TemplateError
from tqdm import tqdm
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from engine.adapters.manager import AdapterManager, LoadedAdapter
from engine.attention.cpu import load_extension
from engine.config import ContextLengthError, EngineConfig, SamplingParams
from engine.detokenizer import detokenize_new_token, start_detokenizer
from engine.kv_cache import BlockManager, KVCache
from engine.medusa import Medusa
from engine.medusa.acceptance import TreeRows
from engine.medusa.speculator import LOOKUP_ONLY, PREDICTION_ONLY
from engine.outputs import RequestOutput
from engine.parallel import Driver, ShardedKVCache
from engine.prompt_files import chat_prompt_ids
from engine.runner import ModelRunner, StepInputs
from engine.sampler import Sampler, seeded_generator
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence
from engine.structured import Grammars, advance, shortened
from models.gguf import END_OF_TURN_TOKENS, find_gguf, load_tokenizer
from models.kernels.decode import load_decode_kernels, set_decode_kernels
from models.loader import load_model, recommended_sampling
from models.medusa import head_kind
from models.named import medusa_heads_for


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load (for metrics and admission control)."""

    num_running: int  # requests being decoded
    num_waiting: int  # requests queued for admission
    num_free_blocks: int  # KV blocks no request holds (cached prefix blocks included: they are reclaimable)
    num_blocks: int  # KV blocks in the pool
    running_request_ids: tuple[str, ...]  # the requests being decoded
    num_preemptions: int  # sequences preempted since the engine started (their KV freed, to be computed again)


# files that hold a tokenizer for AutoTokenizer: fast (tokenizers), SentencePiece, BPE / WordPiece vocabularies
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


# text, token ids (a list, or anything with .tolist(): an array, a tensor), or vLLM's {"prompt": text} /
# {"prompt_token_ids": ids}
Prompt = str | list[int] | dict


def prompt_of(prompt: Prompt) -> str | list[int]:
    """A prompt as its text or a list of token ids (given as a list, a tuple, an array or a tensor of integers)."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" not in prompt and not isinstance(prompt.get("prompt"), str):
            raise TypeError("a prompt given as a dict holds 'prompt' (its text) or 'prompt_token_ids'")
        prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
    if isinstance(prompt, str):
        return prompt
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                          for t in prompt):
        raise TypeError(f"a prompt is text, a list of token ids, or a dict with 'prompt' or 'prompt_token_ids'; "
                        f"got {type(prompt).__name__}")
    return [int(t) for t in prompt]


def _stop_string_start_len(text: str, stop: list[str]) -> int:
    """Length of the longest end of text that is the beginning of a stop string (0: none)."""
    longest = min(len(text), max((len(s) for s in stop), default=1) - 1)
    return next((k for k in range(longest, 0, -1) if any(s.startswith(text[-k:]) for s in stop)), 0)


class LLM:
    """A model ready to generate. `LLM()` loads the shipped default model; keyword arguments are
    EngineConfig fields.

    Invariant: `requests` holds exactly the requests added and not yet finished or aborted, each in the
    scheduler's waiting or running queue and holding KV blocks only there; a request leaves it in the step
    that finishes it (or in `abort`), and its blocks go back to the pool with it."""

    def __init__(self, model: str | Path | None = None, **engine_kwargs) -> None:
        self.config = EngineConfig(model=str(model) if model is not None else None, **engine_kwargs)
        path = self.config.resolve_model()
        if self.config.medusa == "auto":  # the heads that belong to the model
            self.config.medusa = str(medusa_heads_for(self.config.model))
        self.device = torch.device(self.config.device)
        if self.device.type == "cpu" and self.config.attention_backend in ("auto", "cpu"):
            # the attention kernel compiles (a first run: a minute or two) while the model loads and the decode
            # kernels compile; the runner's later load waits for it, then finds it built. Not a daemon: a process
            # that fails to load exits only once the build is done, rather than leave its compiler running unlocked
            threading.Thread(target=load_extension).start()
        tp = self.config.tensor_parallel_size
        # under tensor parallelism the model is rank 0's share, and every forward a call of all ranks
        self.parallel = Driver.start(self.config, path) if tp > 1 else None
        try:
            self._init(path)
        except BaseException:
            self.close()
            raise

    def _init(self, path: Path) -> None:
        tp = self.config.tensor_parallel_size
        if self.parallel is not None:
            self.model, self.kernels = self.parallel.shard.model, self.parallel.shard.kernels
        else:
            self.model = load_model(path, self.config.torch_dtype, self.device, self.config.quantization,
                                    self.config.dequantize)
            # the kernel policy, decided once: layers holding None run torch's operators
            self.kernels = (load_decode_kernels(self.model, self.config.batch_invariant) if self.config.cpu_kernels
                            else None)
            set_decode_kernels(self.model, self.kernels, self.config.packing_budget if self.kernels else None)
        model_config = self.model.config
        self.tokenizer = None if self.config.skip_tokenizer_init else self._load_tokenizer(
            Path(self.config.tokenizer) if self.config.tokenizer else path)
        if self.config.chat_template is not None:
            self._set_chat_template(self.config.chat_template)
        self.eos_token_ids = self._eos_token_ids(path, model_config.eos_token_ids, self.tokenizer,
                                                 model_config.vocab_size)
        self.sampling_defaults = recommended_sampling(path) if self.config.generation_config == "auto" else {}
        try:
            self.default_sampling_params()
        except (TypeError, ValueError) as e:
            raise ValueError(f"the model's recommended sampling {self.sampling_defaults} is not valid ({e}); "
                             "generation_config='none' leaves it out") from None
        if self.config.max_model_len and self.config.max_model_len > model_config.max_model_len:  # (as vLLM refuses it)
            raise ValueError(f"max_model_len {self.config.max_model_len} exceeds this model's context of "
                             f"{model_config.max_model_len} tokens (its max_position_embeddings and RoPE scaling)")
        self.max_model_len = self.config.max_model_len or model_config.max_model_len

        kv_dtype = self.config.kv_cache_torch_dtype
        # kv_cache_memory is each rank's: a rank holds num_kv_heads / tp heads of every block
        bytes_per_block = KVCache.bytes_per_block(model_config.num_layers, self.config.block_size,
                                                  model_config.num_kv_heads // tp, model_config.head_dim,
                                                  kv_dtype)
        blocks_per_seq = -(-self.max_model_len // self.config.block_size)
        num_blocks = self.config.num_kv_blocks or min(self.config.kv_cache_memory // bytes_per_block,
                                                      self.config.max_num_seqs * blocks_per_seq)
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget fits no block (one block takes {bytes_per_block} bytes)")
        # a request must fit on its own, or preemption could never make room for it: a context asked for must fit
        # the cache (as vLLM refuses it); the model's own is lowered to what it holds (the server logs it)
        if self.config.max_model_len and self.config.max_model_len > num_blocks * self.config.block_size:
            raise ValueError(f"max_model_len {self.config.max_model_len} does not fit the KV cache, which holds "
                             f"{num_blocks * self.config.block_size} tokens: give it more memory (kv_cache_memory) "
                             "or lower max_model_len")
        self.max_model_len = min(self.max_model_len, num_blocks * self.config.block_size)
        if self.parallel is not None:
            kv_cache = ShardedKVCache(self.parallel, num_blocks)
            # Medusa drafts on rank 0 from the base model's config, its whole LM head and (Hydra heads, which read
            # the drafted tokens) its whole embedding
            heads = self.config.medusa not in (None, LOOKUP_ONLY, PREDICTION_ONLY)
            hydra = heads and head_kind(self.config.medusa) == "hydra"
            medusa_base = SimpleNamespace(
                config=model_config, lm_head=self.parallel.call("gather_lm_head") if heads else None,
                model=SimpleNamespace(embed_tokens=self.parallel.call("gather_embedding") if hydra else None))
        else:
            kv_cache = KVCache(model_config.num_layers, num_blocks, self.config.block_size, model_config.num_kv_heads,
                               model_config.head_dim, kv_dtype, self.device)
            medusa_base = self.model
        self.block_manager = BlockManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.medusa = (Medusa.from_config(self.config, medusa_base, kv_cache, self.max_model_len, self.kernels)
                       if self.config.medusa else None)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, kv_cache, self.config.attention_backend, self.device, self.parallel)
        if self.config.cuda_graphs:
            self.runner.capture_graphs(self.config.max_num_seqs, self.max_model_len)
        self.sampler = Sampler(self.kernels)
        self.grammars = Grammars(self.tokenizer, model_config.vocab_size, self.eos_token_ids)
        self.requests: dict[str, Sequence] = {}
        adapter_root = (Path(self.config.adapter_root) if self.config.adapter_root else
                        (path.parent if path.is_file() else path) / "adapters")  # (a .gguf file's: beside it)
        self.adapters = AdapterManager(self.model, kv_cache, self.block_manager, self.requests, self.config,
                                       adapter_root, self.max_model_len,
                                       partial(self.parallel.call, "write_lora") if self.parallel else None)
        self._ids = itertools.count()
        self._loop_lock = threading.Lock()  # held by the loop taking the steps' outputs (claim_steps)
        self._rng = torch.Generator(device=self.device).manual_seed(self.config.seed)

    # ---- lifetime --------------------------------------------------------------------------------
    @property
    def failure(self) -> str | None:
        """Why this engine cannot step any more (a tensor-parallel worker died), or None."""
        return None if self.parallel is None else self.parallel.check()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; at exit, they stop anyway)."""
        if self.parallel is not None:
            self.parallel.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _load_tokenizer(path: Path):
        gguf_file = find_gguf(path)  # a GGUF file carries its tokenizer in its metadata
        if gguf_file:
            return load_tokenizer(gguf_file)
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{path} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there. Take one from another "
                "folder (tokenizer=...), or run without one (skip_tokenizer_init=True: token-id prompts only)")
        if (path / "tokenizer.json").is_file():
            # the file's own pipeline: a model's class may rebuild its own (transformers 5's LlamaTokenizer drops
            # Llama 2's normalizer for a Metaspace pre-tokenizer, which splits "[INST]" and leading spaces otherwise)
            return PreTrainedTokenizerFast.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path)

    def _set_chat_template(self, template: str) -> None:
        """The tokenizer's chat template replaced, once it renders a user's message (a broken template is the
        caller's error at load, not every chat request's later)."""
        if self.tokenizer is None:
            raise ValueError("a chat template needs a tokenizer (skip_tokenizer_init leaves it out)")
        self.tokenizer.chat_template = template
        message = "a user's message"
        try:
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                          add_generation_prompt=True)
        except TemplateError as e:
            raise ValueError(f"the chat template does not render a user's message: {e}") from None
        if message not in rendered:
            raise ValueError(f"the chat template leaves a user's message out (it renders {rendered[:80]!r})")

    def default_sampling_params(self) -> SamplingParams:
        """A request's sampling when it gives none: SamplingParams' defaults, but for the parameters the model
        recommends (sampling_defaults: models.loader.recommended_sampling)."""
        return SamplingParams(**self.sampling_defaults)

    @staticmethod
    def _eos_token_ids(path: Path, from_config: list[int], tokenizer, vocab_size: int) -> set[int]:
        """The ids that end generation: the model's EOS (config.json, generation_config.json), and its tokenizer's
        EOS and end-of-turn special tokens (vLLM stops at the tokenizer's EOS, and llama.cpp at a GGUF file's
        end-of-turn tokens: a ChatML fine-tune whose config names </s> still ends its turns)."""
        eos = set(from_config)
        if (path / "generation_config.json").is_file():
            gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
            eos.update(gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos])
        if tokenizer is not None:
            eos.update([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
            eos.update(i for i, token in tokenizer.added_tokens_decoder.items()
                       if token.special and token.content in END_OF_TURN_TOKENS)
        return {i for i in eos if 0 <= i < vocab_size}

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: str | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue a request; `adapter` names a loaded adapter (None: the base model). Its latency and time to first
        token count from `arrival_time` (a time.perf_counter() reading; None: now)."""
        params = params or self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = prompt_of(prompt)
        if self.tokenizer is None and (isinstance(prompt, str) or params.stop):
            raise ValueError("this engine has no tokenizer (skip_tokenizer_init): prompts must be token ids, "
                             "and stop strings cannot be matched (use stop_token_ids)")
        if isinstance(prompt, str):
            token_ids, text = self.tokenizer(prompt)["input_ids"], prompt
        else:
            token_ids, text = prompt, None
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        generator = None if params.seed is None else seeded_generator(params.seed, self.device)
        stop_token_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        seq = Sequence(request_id, token_ids, params, prompt=text, generator=generator, stop_token_ids=stop_token_ids,
                       matcher=self.grammars.matcher(params.structured) if params.structured else None)
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        if self.tokenizer is not None:
            start_detokenizer(self.tokenizer, seq)
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs.append(None)  # the first token has nothing before it
        with self.adapters.lock:  # an unload must see this request once it has looked the adapter up
            seq.adapter = self.adapters.get(adapter)
            if params.max_tokens is None:  # up to the end of the context (what the adapter leaves of it)
                rest = self.max_model_len - seq.num_virtual_tokens - len(token_ids)
                if params.min_tokens > rest:
                    raise ContextLengthError(f"min_tokens {params.min_tokens} do not fit the {rest} tokens the "
                                             f"model's context leaves after this prompt")
                seq.params = params = replace(params, max_tokens=max(1, rest))
            self._validate_prompt(token_ids, params, seq.num_virtual_tokens)
            self.requests[request_id] = seq
        prompt_len, model_config = seq.num_virtual_tokens + len(seq), self.model.config
        if model_config.rope.rope_type == "dynamic" and prompt_len > model_config.max_position_embeddings:
            seq.dynamic_rope_len = prompt_len
        self.scheduler.add(seq)
        return request_id

    def _validate_prompt(self, token_ids: list[int], params: SamplingParams, num_virtual_tokens: int = 0) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        bad_bias = [t for t in params.logit_bias if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad_bias:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}), got {bad_bias[:5]}")
        bad_stops = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad_stops:
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {bad_stops[:5]}")
        if params.prediction and (min(params.prediction) < 0 or max(params.prediction) >= vocab):
            raise ValueError(f"prediction token ids must be in [0, {vocab})")
        context = self.max_model_len - num_virtual_tokens  # an adapter's virtual tokens take their part
        adapter_note = f" ({num_virtual_tokens} of its {self.max_model_len} go to the adapter's virtual tokens)" \
            if num_virtual_tokens else ""
        if len(token_ids) >= context:
            raise ContextLengthError(f"the prompt has {len(token_ids)} tokens, but this model's context is {context} "
                                     f"tokens{adapter_note}, and at least one must be left to generate")
        if len(token_ids) + params.max_tokens > context:
            raise ContextLengthError(f"this model's context is {context} tokens{adapter_note}, but "
                                     f"{len(token_ids) + params.max_tokens} were asked for ({len(token_ids)} in the "
                                     f"prompt, max_tokens {params.max_tokens}): shorten the prompt or lower max_tokens")

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request; returns its last output (the text held back for stop strings included), None if it
        had already ended or is unknown."""
        seq = self.requests.pop(request_id, None)
        if seq is None or seq.is_finished:
            return None
        seq.finish_time = time.perf_counter()
        self.scheduler.finish(seq, "abort")
        return RequestOutput.of(seq, self._release_text(seq), [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one forward over the scheduled batch; report every request that got tokens or finished."""
        with self.adapters.step_lock:  # adapters are published between steps, never during one
            self.adapters.between_steps()
            return self._step()

    def _step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        outputs = []
        if batch.seqs or batch.tree_seqs:
            # one forward: prefill chunks and plain decode rows, then the Medusa trees, each under its own mask
            trees = self.medusa.tree_rows(batch.tree_seqs) if batch.tree_seqs else None
            inputs = self.runner.prepare(batch, trees)
            hidden = self.runner.forward(inputs)
            # one pass of the LM head: the sampling rows, then the trees' rows
            logits = self.runner.logits(hidden, inputs.sample_rows) if len(inputs.sample_rows) else None
            num_sampling = len(inputs.sampling_seqs)
            outputs = self._plain_outputs(batch, inputs, hidden, logits)
            if trees is not None:
                tree_outputs, accepted = self._tree_outputs(batch.tree_seqs, trees, inputs, hidden,
                                                            logits[num_sampling:])
                outputs += tree_outputs
            if self.medusa is not None:  # drafts for the next step: from each sampled row, each tree's accepted node
                states = hidden[inputs.sample_rows[:num_sampling]]
                self.medusa.propose([batch.seqs[i] for i in inputs.sampling_seqs] + batch.tree_seqs,
                                    states if trees is None else torch.cat([states, accepted]),
                                    len(self.scheduler.running))
        if self.medusa is not None:
            self.medusa.record_step(batch, time.perf_counter() - start)  # whether its drafts pay
        return outputs

    def _plain_outputs(self, batch: ScheduledBatch, inputs: StepInputs, hidden: torch.Tensor,
                       logits: torch.Tensor | None) -> list[RequestOutput]:
        """Sample the next token of every sequence of the batch (but its tree sequences) that ends its prompt or
        decodes this step (logits: the step's, its sampling rows first); score prompt tokens where asked."""
        for i, rows in inputs.prompt_logprob_rows.items():
            self._score_prompt(batch.seqs[i], hidden, rows)
        sampled: dict[int, int] = {}
        sampled_logprobs: dict[int, tuple | None] = {}
        if inputs.sampling_seqs:
            seqs = [batch.seqs[i] for i in inputs.sampling_seqs]
            out = self.sampler(logits[:len(seqs)], [s.params for s in seqs], [s.generator or self._rng for s in seqs],
                               [s.token_ids for s in seqs], [s.num_prompt_tokens for s in seqs],
                               [s.matcher for s in seqs], [() if s.may_stop() else s.stop_token_ids for s in seqs])
            sampled = dict(zip(inputs.sampling_seqs, out.token_ids))
            sampled_logprobs = dict(zip(inputs.sampling_seqs, out.logprobs))
            if any(s.params.return_hidden_states for s in seqs):
                # a copy: CUDA graphs reuse their output buffer
                sampling_hidden = hidden[inputs.sample_rows[:len(seqs)]]
                for seq, row_hidden in zip(seqs, sampling_hidden):
                    if seq.params.return_hidden_states:
                        seq.hidden_states.append(row_hidden)

        outputs = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            before = seq.num_computed_tokens
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq, seq.cache_key, before)
            if i in sampled:
                self._append_token(seq, sampled[i], sampled_logprobs[i])
                outputs.append(RequestOutput.of(seq, self._release_text(seq), [sampled[i]]))
                if seq.is_finished:
                    self.requests.pop(seq.request_id, None)
        return outputs

    def _score_prompt(self, seq: Sequence, hidden: torch.Tensor, rows: list[int]) -> None:
        """Append the logprobs of seq's next len(rows) prompt tokens (and their top alternatives), each read
        from the logits of the row before it."""
        logprobs = self.runner.logits(hidden, torch.tensor(rows, device=hidden.device)).float().log_softmax(dim=-1)
        first = len(seq.prompt_logprobs)
        targets = torch.tensor(seq.token_ids[first:first + len(rows)], device=hidden.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        n = seq.params.prompt_logprobs
        top = logprobs.topk(n) if n else None
        for k, logprob in enumerate(chosen):
            alternatives = dict(zip(top.indices[k].tolist(), top.values[k].tolist())) if top is not None else {}
            seq.prompt_logprobs.append((logprob, alternatives))

    def _tree_outputs(self, seqs: list[Sequence], trees: TreeRows, inputs: StepInputs, hidden: torch.Tensor,
                      logits: torch.Tensor) -> tuple[list[RequestOutput], torch.Tensor]:
        """Accept from each sequence's Medusa tree (logits: the tree rows'); returns the outputs and the hidden states
        of each sequence's last accepted node. The accepted tokens are appended one by one, so stop rules and
        max_tokens end a run exactly where plain decoding would have ended."""
        rows = inputs.tree_rows
        accepted, logprobs, hidden = self.medusa.verify(seqs, trees, hidden[rows], logits,
                                                        inputs.ctx.slot_mapping[rows], self._rng,
                                                        len(self.scheduler.running))
        outputs = []
        for seq, tokens, token_logprobs, tree in zip(seqs, accepted, logprobs, trees.trees):
            seq.num_draft_tokens += tree.tree.size - 1
            appended = []
            for token, logprob in zip(tokens, token_logprobs):
                # every token so far has its K/V (the root, then accepted drafts): findable in the prefix cache
                # before a token that ends the request frees the blocks (a next turn starts with this answer)
                before, seq.num_computed_tokens = seq.num_computed_tokens, len(seq)
                self.block_manager.register_full_blocks(seq, seq.cache_key, before)
                self._append_token(seq, token, logprob)
                appended.append(token)
                if seq.is_finished:
                    break
            seq.accepted_lengths.append(len(appended))
            outputs.append(RequestOutput.of(seq, self._release_text(seq), appended))
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
                continue
            self.block_manager.truncate(seq, seq.num_computed_tokens)  # the last token (the bonus) is pending
        return outputs, hidden

    def _append_token(self, seq: Sequence, token_id: int, logprob: tuple | None) -> None:
        """Append one sampled token, extend output_text, and apply the stop rules."""
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        seq.token_ids.append(token_id)
        if logprob is not None:
            seq.logprobs.append(logprob)
        params = seq.params
        new_text = "" if self.tokenizer is None else detokenize_new_token(self.tokenizer, seq)
        stop_token = token_id in seq.stop_token_ids  # (masked while params.min_tokens asks for more: the sampler's ban)
        if stop_token and not params.include_stop_str_in_output:
            new_text = ""  # a stop token's text stays out of the answer, as vLLM leaves it (its id stays in token_ids)
        text_before = len(seq.output_text)
        seq.output_text += new_text
        reason = None
        if stop_token:
            reason = "stop"
            seq.stop_reason = token_id if token_id in params.stop_token_ids else None  # (EOS: None, as vLLM's)
        elif seq.matcher is not None and (reason := advance(seq.matcher, token_id)) is not None:  # complete, or failed
            if reason == "error":
                seq.error = f"the structured output failed mid-answer: {shortened(seq.matcher.get_error())}"
        elif params.stop and new_text and seq.num_output_tokens > params.min_tokens:  # (as vLLM counts)
            # (each stop string ending in the new text: one that lies wholly in text made before, while min_tokens
            # held the stop rules back, was released as it came)
            hits = [(i, s) for s in params.stop
                    if (i := seq.output_text.find(s, max(0, text_before - len(s) + 1))) >= 0]
            if hits:
                start, seq.stop_reason = min(hits, key=lambda hit: (hit[0], len(hit[1])))
                seq.output_text = seq.output_text[:start + len(seq.stop_reason) * params.include_stop_str_in_output]
                reason = "stop"
        if reason is None and seq.num_output_tokens >= params.max_tokens:  # within the context (_validate_prompt)
            reason = "length"
        if reason is not None:
            seq.finish_time = time.perf_counter()
            self.scheduler.finish(seq, reason)

    @staticmethod
    def _release_text(seq: Sequence) -> str:
        """The output text that can now be reported: all of it once seq has finished; before that, all but
        an end that could still grow into a stop string (so no part of a stop string ever reaches a stream)."""
        end = len(seq.output_text)
        if not seq.is_finished:
            end -= _stop_string_start_len(seq.output_text, seq.params.stop)
        new_text = seq.output_text[seq.num_released_chars:end]
        seq.num_released_chars = end
        return new_text

    # ---- convenience loops (one at a time: each drives the engine's steps until its own requests end) ----------
    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, adapter: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": ...})
        together; outputs in prompt order. `adapter`: one adapter name for all prompts, or one per prompt (None:
        the base model). Requests queued with add_request advance too; their outputs are step()'s."""
        if hasattr(prompts, "tolist"):  # a tensor or array of token ids (one prompt), or of several
            prompts = prompts.tolist()
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        if isinstance(params, (list, tuple)):
            params_list = list(params)
        else:
            params_list = [params or self.default_sampling_params()] * len(prompts)
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        if len(params_list) != len(prompts) or len(adapters) != len(prompts):
            raise ValueError("give one SamplingParams (and adapter), or one per prompt")
        ids: list[str] = []
        finished: dict[str, RequestOutput] = {}
        with self._one_loop_at_a_time():
            try:  # (a refused prompt, a failed step or Ctrl-C leaves none of these requests behind)
                for p, sp, a in zip(prompts, params_list, adapters):
                    ids.append(self.add_request(p, sp, adapter=a))
                mine = set(ids)
                with tqdm(total=len(ids), desc="generating", disable=not use_tqdm) as bar:
                    while len(finished) < len(ids):
                        for out in self.step():
                            if out.finished and out.request_id in mine:
                                finished[out.request_id] = out
                                bar.update()
            finally:
                for request_id in ids:
                    if request_id not in finished:
                        self.abort(request_id)
        return [finished[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False,
             adapter: str | list[str | None] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """generate() for one chat (OpenAI-style messages) or a list of them, each written in the model's chat
        template (config.chat_template_kwargs, updated by chat_template_kwargs), ready for the assistant's answer."""
        chats = [messages] if messages and isinstance(messages[0], dict) else messages
        template_kwargs = {**(self.config.chat_template_kwargs or {}), **(chat_template_kwargs or {})}
        prompts = [chat_prompt_ids(self.tokenizer, chat, template_kwargs) for chat in chats]
        return self.generate(prompts, params, use_tqdm, adapter)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               adapter: str | None = None) -> Iterator[RequestOutput]:
        """Yield one request's outputs as its tokens arrive (requests queued with add_request advance too)."""
        with self._one_loop_at_a_time():
            request_id = self.add_request(prompt, params, adapter=adapter)
            try:
                while True:
                    for out in self.step():
                        if out.request_id == request_id:
                            yield out
                            if out.finished:
                                return
            finally:
                self.abort(request_id)

    def claim_steps(self) -> None:
        """Claim the engine's steps for one loop that takes every step's outputs: generate(), stream(), or a
        server's step thread. Two at once (two threads, a stream not yet finished, a generate() beside a server
        of the same LLM) would take each other's outputs, and one would wait for ever: RuntimeError instead.
        release_steps() gives them back."""
        if not self._loop_lock.acquire(blocking=False):
            raise RuntimeError("this LLM's steps are already taken by generate(), chat() or stream() (in another "
                               "thread, or a stream not yet finished) or by a server of it: one at a time; for "
                               "concurrent requests, add_request() and step() from one thread, or serve them "
                               "(gorgon serve)")

    def release_steps(self) -> None:
        self._loop_lock.release()

    @contextmanager
    def _one_loop_at_a_time(self) -> Iterator[None]:
        self.claim_steps()
        try:
            yield
        finally:
            self.release_steps()

    # ---- adapters (callable from any thread while another one runs step()) ----------------------------
    def load_adapter(self, name: str, path: str | Path) -> LoadedAdapter:
        """Load a PEFT LoRA or prefix-tuning folder (inside the adapter root) under `name`; loading an
        existing name publishes a new version, and requests already running keep the old one."""
        return self.adapters.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Unload `name`; refused, naming the requests, while requests use it."""
        self.adapters.unload(name)

    def list_adapters(self) -> list[dict]:
        return self.adapters.list()

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    def stats(self) -> EngineStats:
        running = tuple(seq.request_id for seq in self.scheduler.running)
        return EngineStats(num_running=len(running), num_waiting=len(self.scheduler.waiting),
                           num_free_blocks=self.block_manager.num_free_blocks, num_blocks=self.block_manager.num_blocks,
                           running_request_ids=running, num_preemptions=self.scheduler.num_preemptions)
