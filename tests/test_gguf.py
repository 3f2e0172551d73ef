"""GGUF checkpoints: tiny random files written in-process with the gguf package, read by our loader and,
as the oracle, by transformers' own GGUF loading."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize as gguf_quantize
from test_quant import random_weight
from transformers import AutoModelForCausalLM

import models.gguf as gguf_module
from bench.common import byte_tokenizer
from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.prompt_files import chat_prompt_ids
from models.gguf import GGUFError, find_gguf, load_tokenizer, read_gguf, unpermute_rows
from models.kernels import decode as cpu_decode
from models.loader import CheckpointError, default_dtype, load_model
from models.quant import (
    DEQUANTIZED_TYPES,
    MixedQuantizedLinear,
    QType,
    QuantizedEmbedding,
    QuantizedLinear,
    UnsupportedTensorType,
    quantize,
)

from conftest import PROMPT_LEN, hf_model, paged_logits, save_tiny_model, save_tiny_qwen3

HF_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
RANDOM_BLOCKS = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_NL, QType.IQ4_XS,
                 *DEQUANTIZED_TYPES)
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (the one our loader undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module, _, suffix = rest.rpartition(".")
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{suffix}"


def write_gguf(model: torch.nn.Module, path: Path, qtype_of=lambda name, w: None, float_dtype=np.float32,
               arch: str = "llama", rope_freqs: np.ndarray | None = None,
               control: dict[int, str] | None = None, sampling: dict[str, float] | None = None,
               control_type: int = 3, metadata: dict[str, int | float] | None = None, vocabulary: bool = True,
               split_max_tensors: int = 0) -> Path:
    """An HF Llama (or Qwen2: arch "qwen2") as llama.cpp's converter writes it: names, q/k rows permuted for
    Llama, tokenizer metadata. qtype_of(gguf name, array) -> a ggml type to quantize that 2-D tensor to, or None
    (float_dtype). rope_freqs: the per-frequency RoPE divisors of a Llama-3-scaled model, as llama.cpp writes them.
    control: token id -> the name of a control token written in its place (of type control_type: 3 control, 4
    user-defined, as converters write added tokens). sampling: the recommended sampling
    the converter copies from generation_config.json (general.sampling.<key>: temp, top_k, top_p, ...). metadata:
    more keys (or other values of the head dimensions' keys). vocabulary: False leaves the tokenizer's out.
    split_max_tensors: cut the model into parts of so many tensors, as llama.cpp's gguf-split does
    (PATH-00001-of-0000N.gguf)."""
    control, metadata = control or {}, metadata or {}
    config = model.config
    writer = GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta if hasattr(config, "rope_theta") else
                              config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        metadata.setdefault(f"{arch}.{key}", head_dim)
    for key, value in metadata.items():
        writer.add_key_value(key, value, GGUFValueType.FLOAT32 if isinstance(value, float) else GGUFValueType.UINT32)
    if vocabulary:
        vocab = sorted(byte_tokenizer().get_vocab().items(), key=lambda kv: kv[1])
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([control.get(i, token) for token, i in vocab])
        writer.add_token_types([control_type if i in control else 1 for _, i in vocab])
        writer.add_token_scores([0.0] * len(vocab))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (sampling or {}).items():
        getattr(writer, f"add_sampling_{key}")(value)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = permute(w, config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = permute(w, config.num_key_value_heads)
        qtype = qtype_of(gguf_name(name), w) if w.ndim == 2 else None
        if qtype is None:
            writer.add_tensor(gguf_name(name), w.astype(float_dtype if w.ndim == 2 else np.float32))
        else:  # a type the gguf package cannot quantize to gets random blocks
            # (the IQ types' scales multiply less than the K-quants' 6-bit ones: larger d, weights of a like size)
            scales = (2e-4, 1e-3) if qtype in DEQUANTIZED_TYPES else (2e-5, 1e-4)
            blocks = (random_weight(qtype, *w.shape, seed=len(name), scales=scales).data.numpy()
                      if qtype in RANDOM_BLOCKS else gguf_quantize(w, qtype))
            writer.add_tensor(gguf_name(name), blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("gguf_hf"))


def our_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = load_model(path, torch.float32, "cpu")
    with torch.no_grad():
        return model.compute_logits(model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens)))


@pytest.mark.parametrize("float_dtype", [np.float32, np.float16], ids=["F32", "F16"])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_gguf_loading(tmp_path, float_dtype, tied):
    folder = save_tiny_model(tmp_path / "hf", tie_word_embeddings=tied)
    file = write_gguf(hf_model(folder), tmp_path / "model.gguf", float_dtype=float_dtype)
    tokens = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = oracle(tokens).logits
    assert (our_logits(file, tokens) - expected).abs().max() <= 1e-4
    if float_dtype is np.float32:  # and the file is the HF model itself
        with torch.no_grad():
            assert (our_logits(file, tokens) - hf_model(folder)(tokens).logits).abs().max() <= 1e-4


def test_qwen2_file_matches_transformers_gguf_loading(tmp_path):
    """Qwen2 files keep q/k/v biases and their q/k rows unpermuted (llama.cpp's rotary layout for Qwen2 is HF's)."""
    folder = save_tiny_model(tmp_path / "hf", arch="Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1e6)
    model = hf_model(folder)
    with torch.no_grad():  # HF zeroes fresh biases: random ones check where each goes
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    file = write_gguf(model, tmp_path / "qwen.gguf", arch="qwen2")
    assert read_gguf(file).config.qkv_bias and not read_gguf(file).config.o_bias
    tokens = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="qwen.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = oracle(tokens).logits
        assert (expected - model(tokens).logits).abs().max() <= 1e-4  # the oracle reads the file as written
    assert (our_logits(file, tokens) - expected).abs().max() <= 1e-4
    assert LLM(file, num_kv_blocks=8).runner.kv_cache.pool.dtype == torch.float16  # llama.cpp's cache, by default
    llm = LLM(file, kv_cache_dtype="float32")  # and the engine decodes it as transformers does
    out = llm.generate([tokens[0].tolist()], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        reference = model.generate(tokens[:1], attention_mask=torch.ones_like(tokens[:1]), max_new_tokens=8,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.token_ids == reference[0, tokens.shape[1]:].tolist()


def test_qwen3_file_matches_transformers_gguf_loading(tmp_path):
    """Qwen3 files hold each layer's q/k norms (attn_q_norm, attn_k_norm) and unpermuted q/k rows; a head_dim
    other than hidden / heads (Qwen3-0.6B: 128 against 64) is read from attention.key_length."""
    model = hf_model(save_tiny_qwen3(tmp_path / "hf", tie_word_embeddings=True, rope_theta=1e6))
    file = write_gguf(model, tmp_path / "qwen3.gguf", arch="qwen3", qtype_of=lambda name, w: QType.Q8_0)
    tokens = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="qwen3.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = oracle(tokens).logits  # (transformers dequantizes the Q8_0 blocks)
    assert (our_logits(file, tokens) - expected).abs().max() <= 1e-4
    llm = LLM(file, kv_cache_dtype="float32")  # the engine decodes it, kernels and all, as transformers does
    out = llm.generate([tokens[0].tolist()], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        reference = oracle.generate(tokens[:1], attention_mask=torch.ones_like(tokens[:1]), max_new_tokens=8,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.token_ids == reference[0, tokens.shape[1]:].tolist()
    wide = save_tiny_model(tmp_path / "wide", arch="Qwen3ForCausalLM", head_dim=24)
    assert read_gguf(write_gguf(hf_model(wide), tmp_path / "wide.gguf", arch="qwen3")).config.head_dim == 24


def test_llama3_rope_factors_tensor_matches_hf(tmp_path):
    """Llama 3.1+ GGUF files carry their RoPE scaling as rope_freqs, one divisor per frequency: the model must
    rotate as HF's llama3 rule does (small theta and original length, so the scaling shows within 40 tokens)."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 100.0,
            "original_max_position_embeddings": 32}
    folder = save_tiny_model(tmp_path / "hf", rope_parameters=rope)
    model = hf_model(folder)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    plain = 1.0 / 100.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    factors = (plain / model.model.rotary_emb.inv_freq).numpy()
    assert factors.max() > 7 and factors.min() == 1  # the rule scales some frequencies and keeps others
    file = write_gguf(model, tmp_path / "l3.gguf", rope_freqs=factors)
    tokens = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(tokens).logits
    assert (our_logits(file, tokens) - expected).abs().max() <= 1e-4
    unscaled = write_gguf(model, tmp_path / "plain.gguf")  # the check can fail: without the factors it differs
    assert (our_logits(unscaled, tokens) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("key", ["llama.rope.scaling.factor", "llama.rope.scale_linear"])
def test_a_rope_scaling_factor_with_no_type_is_linear(tmp_path, key):
    """As llama.cpp reads a file: a factor with no scaling type is linear; older converters wrote it as
    rope.scale_linear (LongChat, Vicuna-16k)."""
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    model = hf_model(save_tiny_model(tmp_path / "hf", rope_parameters=rope))
    file = write_gguf(model, tmp_path / "m.gguf", metadata={key: 4.0})
    tokens = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(tokens).logits
    assert (our_logits(file, tokens) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("key, message", [("llama.rope.dimension_count", "RoPE over 8 of each head's 16"),
                                          ("llama.attention.value_length", "values of 8 dimensions")])
def test_heads_gorgon_does_not_run_are_refused_by_name(tmp_path, tiny_hf, key, message):
    """Partial rotary (llama.cpp rotates only rope.dimension_count dimensions), values narrower than keys."""
    model = hf_model(tiny_hf)
    assert model.config.hidden_size // model.config.num_attention_heads == 16
    file = write_gguf(model, tmp_path / "m.gguf", metadata={key: 8})
    with pytest.raises(GGUFError, match=message):
        read_gguf(file)


def test_quantized_tensors_of_another_shape_than_the_metadata_says_fail_at_load(tmp_path, tiny_hf):
    """The blocks' own shape is checked, as a float tensor's is: not a reshape error in the first forward."""
    model = hf_model(tiny_hf)
    wider = {f"llama.{key}": 32 for key in ("attention.key_length", "attention.value_length", "rope.dimension_count")}
    file = write_gguf(model, tmp_path / "m.gguf", qtype_of=lambda name, w: QType.Q8_0, metadata=wider)
    with pytest.raises(CheckpointError, match="q_proj.weight has shape"):
        load_model(file, torch.float32, "cpu")


def test_a_file_without_vocabulary_says_how_to_run_it(tmp_path, tiny_hf):
    file = write_gguf(hf_model(tiny_hf), tmp_path / "m.gguf", vocabulary=False)
    with pytest.raises(FileNotFoundError, match="no vocabulary .*skip_tokenizer_init"):
        LLM(file)
    assert LLM(file, skip_tokenizer_init=True).generate([[5, 6]], SamplingParams(max_tokens=2))[0].token_ids


def test_the_metadata_reads_as_ggufs_own_reader_reads_it(tmp_path, tiny_hf):
    """models.gguf parses arrays in bulk; every field must come out as gguf's GGUFReader gives it."""
    file = write_gguf(hf_model(tiny_hf), tmp_path / "m.gguf")
    writer = GGUFWriter(tmp_path / "arrays.gguf", "llama")
    writer.add_array("strings", ["", "a", "héllo ▁wörld", "<|im_end|>", "x" * 300])
    writer.add_array("ints", [3, -1, 7])
    writer.add_array("floats", [0.5, -2.25])
    writer.add_array("bools", [True, False])
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_string("text", "plain")
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.close):
        write()
    for path in (file, tmp_path / "arrays.gguf"):
        ours, theirs = gguf_module._Reader(path), GGUFReader(path)
        assert list(ours.fields) == list(theirs.fields)
        for name, field in ours.fields.items():
            expected = theirs.fields[name]
            assert (field.offset, field.data, field.types) == (expected.offset, expected.data, expected.types), name
            assert [(p.dtype, p.shape, p.tobytes()) for p in field.parts] == \
                [(p.dtype, p.shape, p.tobytes()) for p in expected.parts], name
            assert field.contents() == expected.contents(), name
        assert [(t.name, t.data_offset) for t in ours.tensors] == [(t.name, t.data_offset) for t in theirs.tensors]
    assert ours.fields["strings"].contents()[2] == "héllo ▁wörld" and ours.fields["ints"].contents() == [3, -1, 7]


def test_config_from_metadata(tmp_path, tiny_hf):
    file = write_gguf(hf_model(tiny_hf), tmp_path / "m.gguf")
    config = read_gguf(file).config
    hf = hf_model(tiny_hf).config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.vocab_size) == \
           (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.vocab_size)
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert (config.bos_token_id, config.eos_token_ids, config.tie_word_embeddings) == (1, [2], False)


def test_unpermute_undoes_the_converter():
    rows = np.arange(24)[:, None]
    assert torch.equal(torch.from_numpy(permute(rows, 3)[:, 0])[unpermute_rows(24, 3)], torch.arange(24))


def test_quantized_tensors_stay_in_their_blocks(tmp_path, tiny_hf):
    file = write_gguf(hf_model(tiny_hf), tmp_path / "q.gguf", qtype_of=lambda name, w: QType.Q8_0)
    model = load_model(file, torch.float32, "cpu")
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    layer = model.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj,
                   model.lm_head):
        assert isinstance(linear, QuantizedLinear) and linear.weight.dtype == torch.uint8
    assert not any(p.numel() > 256 for p in model.parameters())  # norms only: nothing dequantized
    assert layer.self_attn.qkv_proj.shards == {"q_proj": (0, 64), "k_proj": (64, 32), "v_proj": (96, 32)}
    mapped = read_gguf(file).tensors  # (the same reader: the file is mapped once)
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "lm_head"):  # a matrix alone
        assert model.get_submodule(name).weight.data_ptr() == mapped[f"{name}.weight"].data.data_ptr()  # no copy


def test_quantized_file_matches_its_dequantized_oracle(tmp_path, tiny_hf):
    """Q8_0 / Q4_0 / Q4_1 through the tiled path vs transformers (which dequantizes the same blocks)."""
    types = {"attn_q": QType.Q8_0, "attn_k": QType.Q8_0, "attn_v": QType.Q8_0, "attn_output": QType.Q4_0,
             "ffn_gate": QType.Q4_1, "ffn_up": QType.Q4_1, "ffn_down": QType.Q4_0, "output": QType.Q8_0}
    file = write_gguf(hf_model(tiny_hf), tmp_path / "q.gguf",
                      qtype_of=lambda name, w: types.get(name.split(".")[-2]))
    tokens = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (our_logits(file, tokens) - oracle(tokens).logits).abs().max() <= 1e-4


def test_a_quantized_file_loads_dequantized_on_request(tmp_path, tiny_hf):
    types = {"attn_q": QType.Q8_0, "attn_k": QType.Q8_0, "attn_v": QType.Q8_0, "attn_output": QType.Q4_0,
             "ffn_gate": QType.Q4_1, "ffn_up": QType.Q4_1, "ffn_down": QType.Q4_0, "output": QType.Q8_0}
    file = write_gguf(hf_model(tiny_hf), tmp_path / "q.gguf", qtype_of=lambda name, w: types.get(name.split(".")[-2]))
    model = load_model(file, torch.float32, "cpu", dequantize=True)
    assert not any(b.dtype == torch.uint8 for b in model.buffers())
    assert not any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())
    tokens = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dequantized = model.compute_logits(model(tokens, torch.arange(10).expand_as(tokens)))
    assert (dequantized - our_logits(file, tokens)).abs().max() <= 1e-4  # the blocks' own fp32 tiles
    assert EngineConfig(model=str(file), dtype="float32", dequantize=True).weights == "q.gguf (float32, dequantized)"


K_QUANT_MIXES = {  # a GGUF tensor kind -> its type, as llama-quantize mixes them (roughly)
    "one_type": dict.fromkeys(["attn_q", "attn_k", "attn_v", "ffn_down"], QType.Q4_K)
    | {"attn_output": QType.Q5_K, "ffn_gate": QType.Q6_K, "ffn_up": QType.Q6_K, "output": QType.Q6_K},
    "q4_k_m": {"attn_q": QType.Q4_K, "attn_k": QType.Q4_K, "attn_v": QType.Q6_K, "attn_output": QType.Q5_K,
               "ffn_gate": QType.Q6_K, "ffn_up": QType.Q6_K, "ffn_down": QType.Q4_K, "output": QType.Q6_K},
    "q3_k_m": {"attn_q": QType.Q3_K, "attn_k": QType.Q3_K, "attn_v": QType.Q5_K, "attn_output": QType.Q4_K,
               "ffn_gate": QType.Q3_K, "ffn_up": QType.Q3_K, "ffn_down": QType.Q5_K, "output": QType.Q6_K},
    "q2_k": {"attn_q": QType.Q2_K, "attn_k": QType.Q2_K, "attn_v": QType.Q3_K, "attn_output": QType.Q3_K,
             "ffn_gate": QType.Q2_K, "ffn_up": QType.Q2_K, "ffn_down": QType.Q3_K, "output": QType.Q6_K},
    "iq4_xs": dict.fromkeys(["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"],
                            QType.IQ4_XS) | {"output": QType.Q6_K},
}


@pytest.mark.skipif(cpu_decode.compiled() is None, reason="the CPU kernels could not be built here")
@pytest.mark.parametrize("mix", K_QUANT_MIXES)
def test_engine_decodes_a_k_quant_file_close_to_its_dequantized_path(tmp_path, mix):
    """K-quant files (random blocks: the gguf package cannot quantize to them) through the engine: the fused
    kernels at decode vs the same engine with torch's operators on dequantized tiles. Where attn_v's type differs
    from q/k's (Q4_K_M files keep it in Q6_K), q/k/v load as a MixedQuantizedLinear, a part per type."""
    folder = save_tiny_model(tmp_path / "hf", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2)
    types = K_QUANT_MIXES[mix]
    file = write_gguf(hf_model(folder), tmp_path / "k.gguf", qtype_of=lambda name, w: types.get(name.split(".")[-2]))
    tokens = torch.randint(3, 256, (PROMPT_LEN + 6,), generator=torch.Generator().manual_seed(2)).tolist()
    llm = LLM(file, kv_cache_dtype="float32")  # the kernels' error alone, not the fp16 cache's (both paths)
    qkv = llm.model.model.layers[0].self_attn.qkv_proj
    mixed = types["attn_v"] != types["attn_q"]
    assert isinstance(qkv, MixedQuantizedLinear) == mixed
    assert [p.qtype for p in getattr(qkv, "parts", [])] == ([types["attn_q"], types["attn_v"]] if mixed else [])
    fused = paged_logits(llm, tokens)
    reference = paged_logits(LLM(file, cpu_kernels=False, kv_cache_dtype="float32"), tokens)
    # int8 activations cost ~0.5% per linear (models/kernels/quant.h states the bound; test_quant checks it);
    # through two layers and the head of a random (so chaotic) model that stays within 5% of each row's norm
    # (the mixes' random v in another type amplifies more: 11% measured for Q4_K_M's, where an all-Q6_K
    # q/k/v gave 4.4%)
    bound = 0.15 if mixed else 0.05
    assert ((fused - reference).norm(dim=-1) <= bound * reference.norm(dim=-1)).all()
    assert (fused.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    # the dequantized path itself is transformers' own GGUF dequantization
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        assert (our_logits(file, ids) - oracle(ids).logits).abs().max() <= 1e-4


@pytest.mark.skipif(cpu_decode.compiled() is None, reason="the CPU kernels could not be built here")
def test_packed_linears_free_the_files_blocks_where_the_kernels_take_every_forward(tmp_path, monkeypatch):
    """Batch invariant, the kernels take every forward, so a linear's packed copy replaces its file layout in
    memory: the blocks are freed (but the LM head's, whose rows Medusa drafts from), and greedy tokens are those
    of the same engine that keeps them. Otherwise (large prefills on torch's tiles) they stay."""
    folder = save_tiny_model(tmp_path / "hf", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2)
    types = K_QUANT_MIXES["q4_k_m"]
    file = write_gguf(hf_model(folder), tmp_path / "k.gguf", qtype_of=lambda name, w: types.get(name.split(".")[-2]))
    prompts, greedy = [list(range(3, 60)), [7, 8, 9]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def linears(llm: LLM) -> list[QuantizedLinear]:
        return [m for m in llm.model.modules() if isinstance(m, QuantizedLinear) and m is not llm.model.lm_head]

    released = LLM(file, batch_invariant=True)
    assert linears(released) and all(m.packed is not None and m.weight.numel() == 0 for m in linears(released))
    assert released.model.lm_head.weight.numel() > 0
    tokens = [o.token_ids for o in released.generate(prompts, greedy)]
    monkeypatch.setattr(QuantizedLinear, "release_blocks", lambda self: None)
    assert [o.token_ids for o in LLM(file, batch_invariant=True).generate(prompts, greedy)] == tokens
    monkeypatch.undo()
    kept = LLM(file, batch_invariant=False)
    assert all(m.weight.numel() > 0 for m in linears(kept))
    assert len(kept.generate(prompts, greedy)[0].token_ids) == 12  # its 57-token prefill reads the file's blocks


NARROW_MIXES = {  # Q4_K_M's fallbacks, and an older llama-quantize's Q3_K_M's (IQ4_NL; Q4_0 now)
    "q4_k_m": {"attn_q": QType.Q5_0, "attn_k": QType.Q5_0, "attn_v": QType.Q8_0, "attn_output": QType.Q5_0,
               "ffn_gate": QType.Q5_0, "ffn_up": QType.Q5_1, "ffn_down": QType.Q5_1, "output": QType.Q8_0},
    "q3_k_m": {"attn_q": QType.IQ4_NL, "attn_k": QType.IQ4_NL, "attn_v": QType.Q5_0, "attn_output": QType.IQ4_NL,
               "ffn_gate": QType.IQ4_NL, "ffn_up": QType.IQ4_NL, "ffn_down": QType.Q5_0, "output": QType.Q8_0},
}


@pytest.mark.skipif(cpu_decode.compiled() is None, reason="the CPU kernels could not be built here")
@pytest.mark.parametrize("mix", NARROW_MIXES)
def test_a_narrow_model_s_k_quant_mix_with_its_fallbacks(tmp_path, mix):
    """llama-quantize's K-quant mixes of a model whose widths are no multiple of 256 (SmolLM2's 576, ...) fall back
    to other types: Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, IQ-quants (and once Q2_K / Q3_K) to IQ4_NL. Such a
    file loads, matches transformers' own GGUF dequantization, and the kernels decode it close to the dequantized
    path."""
    folder = save_tiny_model(tmp_path / "hf")
    types = NARROW_MIXES[mix]
    file = write_gguf(hf_model(folder), tmp_path / "q5.gguf", qtype_of=lambda name, w: types.get(name.split(".")[-2]))
    tokens = torch.randint(3, 256, (PROMPT_LEN + 6,), generator=torch.Generator().manual_seed(3)).tolist()
    llm = LLM(file)
    assert [p.qtype for p in llm.model.model.layers[0].self_attn.qkv_proj.parts] == [types["attn_q"], types["attn_v"]]
    fused = paged_logits(llm, tokens)
    reference = paged_logits(LLM(file, cpu_kernels=False), tokens)
    assert ((fused - reference).norm(dim=-1) <= 0.05 * reference.norm(dim=-1)).all()
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q5.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        assert (our_logits(file, ids) - oracle(ids).logits).abs().max() <= 1e-4


def test_a_model_split_into_parts_loads_from_its_first(tmp_path, tiny_hf):
    """llama.cpp's gguf-split cuts a model into PREFIX-00001-of-0000N.gguf files (large models are published so):
    given its first part, or their folder, it loads as the whole file does; another part, or a part missing, is
    named."""
    q8 = dict(qtype_of=lambda name, w: QType.Q8_0)
    whole = write_gguf(hf_model(tiny_hf), tmp_path / "m.gguf", **q8)
    (tmp_path / "split").mkdir()
    write_gguf(hf_model(tiny_hf), tmp_path / "split" / "m.gguf", split_max_tensors=5, **q8)
    parts = sorted((tmp_path / "split").glob("*.gguf"))
    assert len(parts) > 2 and parts[0].name == f"m-00001-of-{len(parts):05d}.gguf"
    tokens = torch.tensor([[3, 40, 50, 60]])
    assert torch.equal(our_logits(parts[0], tokens), our_logits(whole, tokens))
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    assert LLM(tmp_path / "split").generate(["hi"], greedy)[0].token_ids == LLM(whole).generate(["hi"], greedy)[
        0].token_ids
    with pytest.raises(GGUFError, match=f"part 2 of a model split into {len(parts)} files"):
        read_gguf(parts[1])
    renamed = parts[0].rename(tmp_path / "split" / "first.gguf")
    with pytest.raises(GGUFError, match="first of the .* parts of a model .* name it so"):
        read_gguf(renamed)
    renamed.rename(parts[0])
    (tmp_path / "split" / "m-00001-of-00002.gguf").write_bytes(whole.read_bytes())  # another set beside it
    with pytest.raises(GGUFError, match="holds several .gguf files"):
        find_gguf(tmp_path / "split")
    parts[-1].unlink()
    with pytest.raises(GGUFError, match=f"missing beside it: {parts[-1].name}"):
        read_gguf(parts[0])


def test_folder_with_one_gguf(tmp_path, tiny_hf):
    write_gguf(hf_model(tiny_hf), tmp_path / "only.gguf")
    assert find_gguf(tmp_path) == tmp_path / "only.gguf"
    write_gguf(hf_model(tiny_hf), tmp_path / "second.gguf")
    with pytest.raises(GGUFError, match="several"):
        find_gguf(tmp_path)
    # a checkpoint folder llama.cpp's converter wrote its .gguf into is still the checkpoint
    write_gguf(hf_model(tiny_hf), tiny_hf / "converted.gguf")
    assert find_gguf(tiny_hf) is None
    (tiny_hf / "converted.gguf").unlink()


def test_a_file_that_is_no_gguf_is_named(tmp_path, tiny_hf):
    whole = write_gguf(hf_model(tiny_hf), tmp_path / "whole.gguf").read_bytes()
    cut = whole.index(b"tokenizer.ggml.tokens") + 200  # within the vocabulary's strings
    for name, content, why in (("junk.gguf", b"not a gguf", ""), ("empty.gguf", b"", ""),
                               ("cut.gguf", whole[:cut], ": the string at byte .* runs past the end of the file")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(GGUFError, match=f"{name} is not a GGUF file gorgon can read{why}"):
            read_gguf(tmp_path / name)


def test_unsupported_architecture_names_it(tmp_path, tiny_hf):
    file = write_gguf(hf_model(tiny_hf), tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(GGUFError, match="'gpt2'"):
        read_gguf(file)


def test_a_gguf_that_is_no_model_is_a_clear_error(tmp_path):
    """A vocabulary alone, a LoRA adapter, a mixture of experts or a part of a split model: a GGUFError that says
    which, not a traceback."""
    vocabulary = write_vocabulary(tmp_path / "vocab.gguf", "gpt2", ["a", "b"], [1, 1])
    with pytest.raises(GGUFError, match="no token_embd.weight"):
        read_gguf(vocabulary)
    for key, value, message in (("general.type", "adapter", "LoRA adapter"), ("llama.expert_count", 8, "experts"),
                                ("split.count", 3, "the first of the 3 parts of a model .* name it so")):
        writer = GGUFWriter(str(tmp_path / "other.gguf"), "llama")
        writer.add_key_value(key, value, GGUFValueType.STRING if isinstance(value, str) else GGUFValueType.UINT16)
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(GGUFError, match=message):
            read_gguf(tmp_path / "other.gguf")


def test_unsupported_tensor_type_names_it(tmp_path):
    folder = save_tiny_model(tmp_path / "hf", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    file = write_gguf(hf_model(folder), tmp_path / "m.gguf",
                      qtype_of=lambda name, w: QType.MXFP4 if name == "blk.0.ffn_up.weight" else None)
    with pytest.raises(UnsupportedTensorType, match="blk.0.ffn_up.weight has type MXFP4.*dequantized at load: IQ1_S"):
        load_model(file, torch.float32, "cpu")


@pytest.mark.parametrize("qtype", DEQUANTIZED_TYPES, ids=lambda t: t.name)
def test_types_without_kernels_load_dequantized_beside_those_with(tmp_path, qtype, caplog):
    """An IQ2_M / IQ3_M-style file: 1- to 3-bit IQ (or ternary) tensors beside K-quants. Those run dequantized, as
    does a kernel type packed with them (q/k/v, gate/up), in fp16 under fp32 activations (as an F16 file's
    matrices); the rest keep their blocks. Loaded dequantized into fp32, the logits are transformers' own GGUF
    loading's; as it runs, those of these weights rounded to fp16; and the warning says what runs dequantized."""
    folder = save_tiny_model(tmp_path / "hf", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=True)
    types = {"attn_q": qtype, "attn_k": qtype, "attn_v": QType.Q4_K, "attn_output": QType.Q4_K, "ffn_gate": qtype,
             "ffn_up": qtype, "ffn_down": QType.Q6_K, "token_embd": qtype}
    file = write_gguf(hf_model(folder), tmp_path / "iq.gguf", qtype_of=lambda name, w: types.get(name.split(".")[-2]))
    with caplog.at_level("WARNING", logger="gorgon"):
        model = load_model(file, torch.float32, "cpu")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, QuantizedLinear) and isinstance(layer.mlp.down_proj, QuantizedLinear)
    for dequantized in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, model.model.embed_tokens, model.lm_head):
        assert dequantized.weight.dtype == torch.float16 and dequantized.dtype == torch.float32
    # per layer q, k, v, gate, up; and the tied embedding: 2 x 5 + 1
    assert f"gorgon has no kernels for {qtype.name}; 11 quantized tensors" in caplog.text
    assert "dequantized into float16" in caplog.text
    tokens = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="iq.gguf", dtype=torch.float32).eval()
    exact = load_model(file, torch.float32, "cpu", dequantize=True)

    def logits(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m.compute_logits(m(tokens, torch.arange(10).expand_as(tokens)))

    expected = oracle(tokens).logits.detach()
    assert expected.abs().max() > 0 and (logits(exact) - expected).abs().max() <= 1e-5 * expected.abs().max()
    for rounded in exact.model.layers:  # what the model runs: those weights rounded to fp16, no more
        for module in (rounded.self_attn.qkv_proj, rounded.mlp.gate_up_proj):
            module.weight.data = module.weight.data.half().float()
    exact.model.embed_tokens.weight.data = exact.model.embed_tokens.weight.data.half().float()
    assert (logits(model) - logits(exact)).abs().max() <= 1e-5 * expected.abs().max()


def test_tokenizer_and_chat_template_from_metadata(tmp_path, tiny_hf, monkeypatch):
    """Built from the metadata once, then read from the cache: the same tokenizer either way."""
    monkeypatch.setattr(gguf_module, "TOKENIZER_CACHE", tmp_path / "cache")
    file = write_gguf(hf_model(tiny_hf), tmp_path / "m.gguf")
    reference = byte_tokenizer()
    for _ in range(2):
        tokenizer = load_tokenizer(file)
        assert tokenizer("hello world")["input_ids"] == reference("hello world")["input_ids"]
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert chat == "<user>hi\n"
        assert (tokenizer.eos_token_id, tokenizer.bos_token_id) == (2, 1)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    write_gguf(hf_model(tiny_hf), file)  # written anew (a second later): converted anew
    modified = file.stat().st_mtime_ns + 1_000_000_000
    os.utime(file, ns=(modified, modified))
    load_tokenizer(file)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def write_vocabulary(path: Path, model: str, tokens: list[str], token_types: list[int], pre: str = "default",
                     scores: list[float] | None = None, merges: list[str] = (),
                     space_prefix: bool | None = None, add_bos: bool | None = None,
                     chat_template: str | None = None) -> Path:
    """A GGUF that holds a vocabulary alone, as llama.cpp's own tokenizer tests do (models/ggml-vocab-*.gguf)."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    if space_prefix is not None:
        writer.add_add_space_prefix(space_prefix)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_scores(scores or [0.0] * len(tokens))
    if merges:
        writer.add_token_merges(list(merges))
    writer.add_bos_token_id(1 if model == "llama" else 0)
    writer.add_eos_token_id(2 if model == "llama" else 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("space_prefix", [None, False])
def test_a_sentencepiece_vocabulary_prefixes_a_space_as_llama_cpp_does(tmp_path, monkeypatch, space_prefix):
    """Llama 2 / Mistral / TinyLlama files: like sentencepiece, llama.cpp writes "▁" before the text even where
    the text starts with a space, so " a" is "▁", "▁a" (transformers' conversion alone gives "▁a", and
    decoding it loses the space); unless the file's add_space_prefix is false. The cached copy tokenizes the
    same."""
    monkeypatch.setattr(gguf_module, "TOKENIZER_CACHE", tmp_path / "cache")
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "\u2581a", "b", "\u2581b"]
    file = write_vocabulary(tmp_path / "spm.gguf", "llama", tokens, [2, 3, 3, 1, 1, 1, 1, 1],
                            scores=[0.0, 0.0, 0.0, -1.0, -2.0, -0.5, -3.0, -0.6], space_prefix=space_prefix)
    expected = ({"a": [5], " a": [3, 5], "a b": [5, 7], "  a  b": [3, 3, 5, 3, 7]} if space_prefix is None else
                {"a": [4], " a": [5], "a b": [4, 7], "  a  b": [3, 5, 3, 7]})
    for _ in range(2):
        tokenizer = load_tokenizer(file)
        for text, ids in expected.items():
            assert tokenizer.encode(text, add_special_tokens=False) == ids, text
            assert tokenizer.decode(ids) == text
        assert tokenizer.encode(" a") == [1, *expected[" a"]]  # BOS


@pytest.mark.parametrize("pre", ["llama-bpe", "tekken", "qwen2"])
def test_a_llama3_vocabulary_takes_whole_words_and_adds_bos(tmp_path, monkeypatch, pre):
    """Llama 3 files and Mistral's tekken: a word that is a token of its own is taken whole, whatever the merges
    say, and BOS leads where the file does not say otherwise (llama.cpp's rules for these vocabularies); other
    vocabularies follow their merges and add nothing."""
    monkeypatch.setattr(gguf_module, "TOKENIZER_CACHE", tmp_path / "cache")
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", "a", "b", "c", "ab", "abc"]
    file = write_vocabulary(tmp_path / "bpe.gguf", "gpt2", tokens, [3, 3, 1, 1, 1, 1, 1], pre=pre, merges=["a b"])
    tokenizer = load_tokenizer(file)
    if pre != "qwen2":
        assert tokenizer.encode("abc") == [0, 6] and tokenizer.encode("cab") == [0, 4, 5]
    else:
        assert tokenizer.encode("abc") == [5, 4] and tokenizer.encode("cab") == [4, 5]


@pytest.mark.parametrize("model, pre", [("llama", "default"), ("gpt2", "llama-bpe"), ("gpt2", "qwen2")])
@pytest.mark.parametrize("add_bos", [True, False])
def test_the_files_add_bos_token_decides_bos_for_any_vocabulary(tmp_path, monkeypatch, model, pre, add_bos):
    """Where the file says whether BOS leads, llama.cpp does as it says, whatever the vocabulary's default (and
    transformers' conversion: up to 5.22 a sentencepiece vocabulary had no BOS)."""
    monkeypatch.setattr(gguf_module, "TOKENIZER_CACHE", tmp_path / "cache")
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "\u2581a"] if model == "llama" else ["<s>", "</s>", "a", "b", "ab"]
    file = write_vocabulary(tmp_path / "v.gguf", model, tokens, [2, 3, 3, 1, 1, 1] if model == "llama" else
                            [3, 3, 1, 1, 1], pre=pre, merges=[] if model == "llama" else ["a b"], add_bos=add_bos)
    bos, ids = (1, [5]) if model == "llama" else (0, [4])
    text = "a" if model == "llama" else "ab"
    assert load_tokenizer(file).encode(text) == ([bos] if add_bos else []) + ids


@pytest.mark.parametrize("writes_bos", [False, True])
@pytest.mark.parametrize("add_bos", [True, False])
def test_a_chat_starts_with_bos_once_where_the_vocabulary_adds_it(tmp_path, monkeypatch, writes_bos, add_bos):
    """As llama.cpp's chats: BOS first where the file's vocabulary adds it, though the template write none (as
    TinyLlama's and Zephyr's do), never twice where it writes one; where the vocabulary adds none, what the template
    writes."""
    monkeypatch.setattr(gguf_module, "TOKENIZER_CACHE", tmp_path / "cache")
    template = ("{{ bos_token }}" if writes_bos else "") + "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    file = write_vocabulary(tmp_path / "v.gguf", "llama", ["<unk>", "<s>", "</s>", "\u2581", "a", "\u2581a"],
                            [2, 3, 3, 1, 1, 1], add_bos=add_bos, chat_template=template)
    tokenizer = load_tokenizer(file)
    assert chat_prompt_ids(tokenizer, "a") == ([1] if add_bos or writes_bos else []) + [5]
    assert tokenizer("a")["input_ids"] == ([1] if add_bos else []) + [5]  # (a plain prompt: the vocabulary's rule)


def test_control_tokens_spelled_outside_the_byte_alphabet_stay_whole_at_the_files_ids(tmp_path, monkeypatch):
    """DeepSeek-R1's files write their control tokens with fullwidth bars (<｜User｜>): transformers' conversion
    leaves them out of a byte-level vocabulary, cuts them into bytes and gives BOS/EOS new ids past the model's
    vocabulary (every prompt was refused). llama.cpp takes each control and user-defined token whole, at its id."""
    monkeypatch.setattr(gguf_module, "TOKENIZER_CACHE", tmp_path / "cache")
    tokens = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜tool▁sep｜>", "a", "b", "ab"]
    file = write_vocabulary(tmp_path / "r1.gguf", "gpt2", tokens, [3, 3, 3, 4, 1, 1, 1], pre="deepseek-r1-qwen",
                            merges=["a b"])
    for _ in range(2):  # converted, then cached
        tokenizer = load_tokenizer(file)
        assert tokenizer.convert_tokens_to_ids(tokens[:4]) == [0, 1, 2, 3]
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
        assert tokenizer.encode("<｜User｜>ab<｜tool▁sep｜>b", add_special_tokens=False) == [2, 6, 3, 5]
        assert max(tokenizer.encode("ab")) < len(tokens)
        assert tokenizer.decode([0, 2, 6, 3], skip_special_tokens=True) == "ab<｜tool▁sep｜>"


def test_engine_generates_from_a_gguf_file(tmp_path, tiny_hf):
    file = write_gguf(hf_model(tiny_hf), tmp_path / "m.gguf", qtype_of=lambda name, w: QType.Q8_0)
    from engine import SamplingParams

    out = LLM(file).generate(["hello"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


@pytest.mark.parametrize("token_type", [3, 4])
def test_generation_ends_at_an_end_of_turn_control_token(tmp_path, tiny_hf, token_type):
    """A file whose EOS is the end of a text also stops at its end-of-turn token (<|im_end|>, <|eot_id|>), typed
    control or user-defined (a ChatML fine-tune's may be either), as llama.cpp does: a chat model generates that one."""
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = [3, 40, 50, 60]
    tokens = LLM(write_gguf(hf_model(tiny_hf), tmp_path / "m.gguf")).generate([prompt], greedy)[0].token_ids
    end = next(t for t in tokens[1:] if t not in (1, 2, tokens[0]))
    llm = LLM(write_gguf(hf_model(tiny_hf), tmp_path / "chat.gguf", control={end: "<|im_end|>"},
                         control_type=token_type))
    out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0]
    assert out.token_ids == tokens[:tokens.index(end) + 1] and out.finish_reason == "stop"


def test_requests_without_sampling_take_the_files_recommended_sampling(tmp_path, tiny_hf):
    """llama.cpp's converter stores generation_config.json's sampling as general.sampling.*; llama.cpp, as vLLM
    with the HF file, samples with it where a request says nothing."""
    file = write_gguf(hf_model(tiny_hf), tmp_path / "m.gguf",
                      sampling={"temp": 0.5, "top_k": -1, "top_p": 0.75, "penalty_repeat": 1.25})
    llm = LLM(file)
    assert llm.sampling_defaults == pytest.approx({"temperature": 0.5, "top_k": 0, "top_p": 0.75,
                                                   "repetition_penalty": 1.25})
    params = llm.default_sampling_params()
    assert (params.temperature, params.top_p, params.repetition_penalty) == pytest.approx((0.5, 0.75, 1.25))
    assert LLM(file, generation_config="none").default_sampling_params() == SamplingParams()
    with pytest.raises(ValueError, match="recommended sampling .* is not valid"):
        LLM(write_gguf(hf_model(tiny_hf), tmp_path / "bad.gguf", sampling={"temp": -1.0}))


def test_default_dtype_is_the_files_own_bf16(tmp_path, tiny_hf):
    """A BF16 file runs in bfloat16 unless asked otherwise (fp32 copies would halve decode's speed); F32, F16 (its
    matrices kept in fp16) and quantized files run in float32. Its bf16 decode (packed weights, vdpbf16ps where the CPU
    has it) stays within bf16's rounding of the float32 run of the same file."""
    model = hf_model(tiny_hf)
    bf16 = write_gguf(model, tmp_path / "bf16.gguf", qtype_of=lambda name, w: QType.BF16)
    f16 = write_gguf(model, tmp_path / "f16.gguf", float_dtype=np.float16)
    f32 = write_gguf(model, tmp_path / "f32.gguf")
    q8 = write_gguf(model, tmp_path / "q8.gguf", qtype_of=lambda name, w: QType.Q8_0)
    # (its embedding left in BF16, as llama.cpp's quantizer leaves a tensor it is told to: its linears take fp32)
    q8_bf16_embedding = write_gguf(model, tmp_path / "q8e.gguf", qtype_of=lambda name, w: QType.BF16 if name == (
        "token_embd.weight") else QType.Q8_0)
    assert [default_dtype(f, "cpu") for f in (bf16, f16, f32, q8, q8_bf16_embedding)] == [
        "bfloat16", "float32", "float32", "float32", "float32"]
    assert default_dtype(bf16, "cuda") == "bfloat16"
    ours, full = LLM(bf16), LLM(bf16, dtype="float32")
    assert ours.config.dtype == "bfloat16" and ours.model.lm_head.weight.dtype == torch.bfloat16
    from engine import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    prompt = [5, 17, 42, 9]
    a, b = ours.generate([prompt], params)[0], full.generate([prompt], params)[0]
    assert a.token_ids == b.token_ids
    assert full.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32  # (bf16 dot products round x)
    half = LLM(f16)  # F16 matrices under fp32 activations, as llama.cpp runs them
    assert half.config.dtype == "float32" and half.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float16
    assert half.generate([prompt], params)[0].token_ids == b.token_ids


def test_an_f16_file_whose_activations_exceed_fp16_runs_as_in_fp32(tmp_path, tiny_hf):
    """A residual stream beyond fp16's 65504 (Qwen2's outlier channels reach such sizes): fp16 activations made
    every logit NaN; an F16 file runs under fp32 activations, its matrices in fp16, and gives the fp32 answer."""
    model = hf_model(tiny_hf)
    with torch.no_grad():  # one channel of layer 0's MLP output grows to ~1e5
        model.model.layers[0].mlp.down_proj.weight[7] *= 400.0
        model.model.layers[0].mlp.gate_proj.weight *= 15.0
        model.model.layers[0].mlp.up_proj.weight *= 15.0
    file = write_gguf(model, tmp_path / "f16.gguf", float_dtype=np.float16)
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f16.gguf", dtype=torch.float32).eval()
    tokens = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = oracle(tokens, output_hidden_states=True)
        reference = oracle.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=6,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)[0, 24:].tolist()
    assert out.hidden_states[1].abs().max() > 65504  # (the check can fail: the model overflows fp16)
    llm = LLM(file, kv_cache_dtype="float32")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    got = llm.generate([tokens[0].tolist()], params)[0]
    assert got.token_ids == reference and all(math.isfinite(lp) for lp, _ in got.logprobs)
    assert (our_logits(file, tokens) - out.logits).abs().max() <= 1e-3 * out.logits.abs().max()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantization_turns_a_files_float_and_kernelless_matrices_into_its_blocks(tmp_path, quantization):
    """`--quantization` on a GGUF file: the matrices that would run in float (F16 here, IQ3_S, and the tied
    embedding, which is the LM head) go into the quantization's blocks, byte for byte what the gguf package makes of
    the file's values (as llama-quantize would); those in kernel types (Q4_K) keep theirs, q/k/v then mixed."""
    qtype = {"int8": QType.Q8_0, "int4": QType.Q4_1}[quantization]
    folder = save_tiny_model(tmp_path / "hf", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=True)
    types = {"attn_q": QType.IQ3_S, "attn_k": QType.IQ3_S, "attn_v": QType.Q4_K}
    file = write_gguf(hf_model(folder), tmp_path / "m.gguf", float_dtype=np.float16,
                      qtype_of=lambda name, w: types.get(name.split(".")[-2]))
    model = load_model(file, torch.float32, "cpu", quantization=quantization)
    stored = read_gguf(file).tensors
    layer = model.model.layers[0]
    assert [p.qtype for p in layer.self_attn.qkv_proj.parts] == [qtype, QType.Q4_K]
    q = stored["model.layers.0.self_attn.q_proj.weight"].dequantize()
    assert torch.equal(layer.self_attn.qkv_proj.parts[0].weight[:256], quantize(q, qtype).data)
    for module, key in ((layer.mlp.down_proj, "model.layers.0.mlp.down_proj.weight"),
                        (model.lm_head, "model.embed_tokens.weight")):
        assert module.qtype == qtype and torch.equal(module.weight, quantize(stored[key].float(), qtype).data)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding) and model.model.embed_tokens.qtype == qtype
    config = EngineConfig(model=str(file), quantization=quantization)
    config.resolve_model()
    assert config.weights == f"m.gguf (float32, quantized {quantization})"
    with pytest.raises(CheckpointError, match="opposite"):
        load_model(file, torch.float32, "cpu", quantization=quantization, dequantize=True)
