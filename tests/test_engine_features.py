"""Engine features that lean on the attention kernels: every backend decodes the same greedy tokens;
prefix-cache hits reuse blocks and change nothing; chunked prefill keeps to its token budget;
preemption under a tiny KV budget loses no request; the KV pool is sized from a memory budget; no
block leaks; a checkpoint without a tokenizer (a clear error, a tokenizer from elsewhere, or token ids only)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers
from transformers import AutoTokenizer

from engine import LLM, SamplingParams
from engine.attention import available_backends
from engine.kv_cache import KVCache

PROMPTS = [list(range(3, 40)), [1, 20, 21], [1, 99] * 9, [7], list(range(50, 71))]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def reference_tokens(tiny_model_dir) -> list[list[int]]:
    llm = LLM(tiny_model_dir, attention_backend="reference", block_size=16, num_kv_blocks=64,
              enable_prefix_caching=False)
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def generate_tokens(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize("backend", [
    "flash",
    pytest.param("cpu", marks=pytest.mark.skipif("cpu" not in available_backends("cpu"),
                                                 reason="the fused CPU attention kernel could not be built")),
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")),
])
def test_greedy_tokens_identical_across_backends(tiny_model_dir, reference_tokens, backend):
    # chunked prefill (8-token budget) mixes prompt chunks with decodes in the same batches
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    llm = LLM(tiny_model_dir, attention_backend=backend, device=device, dtype="float32", block_size=4,
              num_kv_blocks=256, max_num_batched_tokens=8)
    assert llm.runner.backend.name == backend
    assert generate_tokens(llm) == reference_tokens
    assert llm.num_free_blocks == 256


def test_prefix_cache_hit_reuses_blocks_and_returns_identical_tokens(tiny_model_dir):
    shared = list(range(3, 43))  # 40 tokens: five full blocks of 8
    first, second = shared + [50, 51, 52], shared + [60, 61]
    cold = LLM(tiny_model_dir, block_size=8, num_kv_blocks=64, enable_prefix_caching=False)
    expected = generate_tokens(cold, [first, second])

    llm = LLM(tiny_model_dir, block_size=8, num_kv_blocks=64)
    seq_a = llm.requests[llm.add_request(first, GREEDY)]
    llm.step()  # prefills `first`; its five full blocks become findable
    seq_b = llm.requests[llm.add_request(second, GREEDY)]
    free_before = llm.num_free_blocks
    llm.step()
    assert seq_b.num_cached_tokens == 40
    assert seq_b.block_table[:5] == seq_a.block_table[:5]
    assert all(llm.block_manager.ref_counts[b] == 2 for b in seq_a.block_table[:5])
    assert free_before - llm.num_free_blocks == 1  # `second` took one new block, for its last 2 tokens
    outputs = {}
    while llm.has_unfinished():
        outputs.update({o.request_id: o.token_ids for o in llm.step() if o.finished})
    assert [outputs[seq_a.request_id], outputs[seq_b.request_id]] == expected
    assert llm.num_free_blocks == 64

    # freed blocks keep their contents until reused (lazy eviction): a later request still hits them
    again = llm.generate(second, GREEDY)[0]
    assert again.num_cached_tokens == 40 and again.token_ids == expected[1]
    assert llm.num_free_blocks == 64


@pytest.mark.parametrize("max_num_batched_tokens", [512, 24])  # a prefill in one step, and in chunks
def test_requests_sharing_a_prefix_that_arrive_together_compute_it_once(tiny_model_dir, max_num_batched_tokens):
    """n choices of a prompt, or a burst sharing a system prompt: the later requests wait (a step, or until the
    first has computed the blocks) and find the shared blocks in the prefix cache, instead of computing their own
    copies; their tokens are those of requests run apart."""
    shared = list(range(3, 103))  # 100 tokens: twelve full blocks of 8
    prompts = [shared + [200 + i] for i in range(4)]
    kwargs = dict(block_size=8, num_kv_blocks=128, max_num_batched_tokens=max_num_batched_tokens)
    cold = LLM(tiny_model_dir, enable_prefix_caching=False, **kwargs)
    llm = LLM(tiny_model_dir, **kwargs)
    rows = []
    forward = llm.runner.forward
    llm.runner.forward = lambda inputs: (rows.append(len(inputs.input_ids)), forward(inputs))[1]
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in cold.generate(prompts, GREEDY)]
    assert [o.num_cached_tokens for o in outs] == [0, 96, 96, 96]
    assert sum(rows) == 101 + 3 * 5 + 4 * (GREEDY.max_tokens - 1)  # each prompt row once, then the decode rows


def test_chunked_prefill_keeps_to_the_token_budget(tiny_model_dir, reference_tokens):
    llm = LLM(tiny_model_dir, block_size=16, num_kv_blocks=64, max_num_batched_tokens=8)
    scheduled = []
    schedule = llm.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        scheduled.append(sum(batch.num_new_tokens))
        return batch

    llm.scheduler.schedule = recording_schedule
    assert generate_tokens(llm) == reference_tokens
    assert max(scheduled) == 8  # the budget was used, never exceeded
    assert llm.num_free_blocks == 64


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_under_a_tiny_kv_budget_completes_every_request(tiny_model_dir, reference_tokens,
                                                                     prefix_caching):
    model_config = LLM(tiny_model_dir, num_kv_blocks=1).model.config
    bytes_per_block = KVCache.bytes_per_block(model_config.num_layers, 4, model_config.num_kv_heads,
                                              model_config.head_dim, torch.float32)
    budget = 16 * bytes_per_block + bytes_per_block // 2
    llm = LLM(tiny_model_dir, block_size=4, kv_cache_memory=budget, enable_prefix_caching=prefix_caching)
    # sized from the memory budget: 16 blocks (64 tokens), while the prompts need about 200 together
    assert llm.block_manager.num_blocks == 16
    assert llm.runner.kv_cache.pool.numel() * llm.runner.kv_cache.pool.element_size() <= budget
    assert generate_tokens(llm) == reference_tokens
    assert llm.scheduler.num_preemptions > 0
    assert llm.num_free_blocks == 16


@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16"])
def test_a_16bit_kv_cache_holds_twice_the_blocks_and_shifts_logprobs_by_its_rounding(tiny_model_dir, cache_dtype):
    """kv_cache_dtype: an fp32 model keeps K/V in 16 bits. The same memory budget holds twice the blocks; prompt
    logprobs move by about the rounding of K/V (fp16: 2^-11 relative, bf16: 2^-8); every backend decodes the same
    greedy tokens over that cache."""
    budget = 1 << 20
    full = LLM(tiny_model_dir, dtype="float32", kv_cache_memory=budget, max_num_seqs=1024)
    half = LLM(tiny_model_dir, dtype="float32", kv_cache_dtype=cache_dtype, kv_cache_memory=budget,
               max_num_seqs=1024)
    assert half.runner.kv_cache.pool.dtype == getattr(torch, cache_dtype)
    assert half.block_manager.num_blocks == 2 * full.block_manager.num_blocks
    prompt = list(range(3, 60))
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    exact, rounded = (llm.generate(prompt, params)[0].prompt_logprobs[1:] for llm in (full, half))
    errors = [abs(a[0] - b[0]) for a, b in zip(exact, rounded)]
    assert 0 < max(errors) <= {"float16": 3e-3, "bfloat16": 4e-2}[cache_dtype]  # (measured: 1.7e-3, 2.7e-2)
    tokens = {name: generate_tokens(LLM(tiny_model_dir, dtype="float32", kv_cache_dtype=cache_dtype,
                                        attention_backend=name, block_size=4, num_kv_blocks=256))
              for name in available_backends("cpu")}
    assert len({str(t) for t in tokens.values()}) == 1, tokens


def test_the_kv_cache_dtype_by_default_and_its_limits(tiny_model_dir):
    """auto: the activations' dtype, or fp16 (llama.cpp's cache) under quantized weights; a 16-bit cache needs fp32
    activations."""
    def cache_dtype(**kwargs) -> torch.dtype:
        return LLM(tiny_model_dir, num_kv_blocks=8, **kwargs).runner.kv_cache.pool.dtype

    assert cache_dtype(dtype="float32") == torch.float32
    assert cache_dtype(dtype="bfloat16") == torch.bfloat16
    assert cache_dtype(dtype="float32", quantization="int8") == torch.float16
    assert cache_dtype(dtype="float32", quantization="int4", kv_cache_dtype="float32") == torch.float32
    assert cache_dtype(dtype="bfloat16", quantization="int8") == torch.bfloat16
    with pytest.raises(ValueError, match="needs float32 activations"):
        LLM(tiny_model_dir, dtype="bfloat16", kv_cache_dtype="float16")
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        LLM(tiny_model_dir, kv_cache_dtype="fp8")


def test_load_time_quantization_is_refused_off_the_cpu(tiny_model_dir):
    with pytest.raises(ValueError, match="quantization 'int8' runs on the CPU"):
        LLM(tiny_model_dir, device="cuda", quantization="int8")


def test_aborting_mid_generation_returns_every_block(tiny_model_dir):
    llm = LLM(tiny_model_dir, block_size=4, num_kv_blocks=32, max_num_batched_tokens=16)
    ids = [llm.add_request(p, GREEDY) for p in PROMPTS]
    for _ in range(4):  # some prompts mid-prefill, some decoding, some still waiting
        llm.step()
    assert llm.num_free_blocks < 32
    for request_id in ids:
        llm.abort(request_id)
    assert not llm.has_unfinished() and llm.num_free_blocks == 32
    assert all(count == 0 for count in llm.block_manager.ref_counts)


@pytest.fixture(scope="module")
def no_tokenizer_dir(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint without its tokenizer files."""
    folder = tmp_path_factory.mktemp("no_tokenizer")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, folder / name)
    return folder


def test_a_folder_without_tokenizer_files_is_named(no_tokenizer_dir):
    with pytest.raises(FileNotFoundError, match=f"{no_tokenizer_dir} has no tokenizer: none of tokenizer.json"):
        LLM(no_tokenizer_dir)


def test_token_ids_only_without_a_tokenizer(tiny_model_dir, no_tokenizer_dir, reference_tokens):
    llm = LLM(no_tokenizer_dir, skip_tokenizer_init=True)
    assert llm.tokenizer is None
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference_tokens
    assert all(o.text == "" and o.prompt is None for o in outs)
    streamed = list(llm.stream(PROMPTS[0], GREEDY))
    assert [t for o in streamed for t in o.new_token_ids] == reference_tokens[0]
    stop_at = reference_tokens[0][3]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[stop_at])
    out = llm.generate(PROMPTS[0], params)[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_at
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.add_request("def f(x):", GREEDY)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.add_request(PROMPTS[0], SamplingParams(stop=["\n"]))


def test_a_tokenizer_json_tokenizes_as_its_file_says(tmp_path):
    """Llama 2's layout (a normalizer that prepends and replaces spaces with U+2581, SentencePiece BPE with byte
    fallback, tokenizer_class LlamaTokenizer): transformers 5's LlamaTokenizer rebuilds its own pre-tokenizer and
    splits "[INST]" or a leading space otherwise; the engine's tokenizer gives the file's own tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    corpus = ["[INST] What is the capital of France? [/INST] Paris.", "def f(n):\n    return n", "Hello world"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": False}))
    ours = LLM._load_tokenizer(tmp_path)
    for text in ["[INST] What is the capital? [/INST]", "    return n", " Hello world", "</s> Hello"]:
        assert ours(text)["input_ids"] == tok.encode(text).ids, text


def test_the_tokenizers_eos_and_end_of_turn_tokens_end_generation(tiny_model_dir, tmp_path):
    """A fine-tune whose config.json names one EOS while its tokenizer ends turns with another (ChatML on a Llama):
    the tokenizer's EOS and its end-of-turn special tokens stop too (ids beyond the model's vocabulary left out)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"eos_token": tokenizer.convert_ids_to_tokens(7)})
    tokenizer.save_pretrained(tmp_path)
    llm = LLM(tiny_model_dir, tokenizer=str(tmp_path))
    assert llm.eos_token_ids == {2, 7}
    out = llm.generate([5, 6], SamplingParams(max_tokens=4, temperature=0, logit_bias={7: 100.0}))[0]
    assert out.token_ids == [7] and out.finish_reason == "stop"
    fake = SimpleNamespace(eos_token_id=None, added_tokens_decoder={5: AddedToken("<|im_end|>", special=True),
                                                                    6: AddedToken("<|im_end|>"),
                                                                    300: AddedToken("<|eot_id|>", special=True)})
    assert LLM._eos_token_ids(tiny_model_dir, [2], fake, 256) == {2, 5}


def test_a_tokenizer_from_another_folder(tiny_model_dir, no_tokenizer_dir):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = LLM(tiny_model_dir).generate("def f(x):", params)[0]
    got = LLM(no_tokenizer_dir, tokenizer=str(tiny_model_dir)).generate("def f(x):", params)[0]
    assert got.prompt_token_ids == want.prompt_token_ids and got.token_ids == want.token_ids and got.text == want.text
