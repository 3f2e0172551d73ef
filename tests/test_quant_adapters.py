"""Load-time quantization (--quantization int8 / int4) and adapters on quantized base weights: LoRA and prefix
tuning vs PEFT on the dequantized weights, Medusa on a quantized LM head."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig
from test_adapters import build_peft
from test_gguf import NARROW_MIXES, write_gguf
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from models.loader import quantize_model
from models.medusa import MedusaConfig, MedusaHeads, save_medusa_heads
from models.quant import LOAD_TIME_QUANTIZATIONS, QuantizedEmbedding, QuantizedLinear, quantize

from conftest import hf_model

ADAPTERS = {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"]),
            "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)}
PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 40], list(range(3, 30))]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def dequantized_hf(model_dir, quantization: str) -> torch.nn.Module:
    """The HF model with every weight that `quantization` replaces swapped for its dequantized blocks."""
    model = hf_model(model_dir)
    qtype = LOAD_TIME_QUANTIZATIONS[quantization]
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and (".layers." in name or name == "lm_head"):
                module.weight.copy_(quantize(module.weight, qtype).dequantize())
    return model


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantize_model_replaces_linears_and_a_tied_embedding(tmp_path, quantization):
    from models.loader import load_model

    from conftest import save_tiny_model

    model = load_model(save_tiny_model(tmp_path, tie_word_embeddings=True), torch.float32, "cpu")
    quantize_model(model, quantization)
    assert isinstance(model.lm_head, QuantizedLinear) and isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert model.model.embed_tokens.weight is model.lm_head.weight  # tied: one set of blocks
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, QuantizedLinear)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_engine_matches_transformers_on_dequantized_weights(tiny_model_dir, quantization):
    oracle = dequantized_hf(tiny_model_dir, quantization)
    llm = LLM(tiny_model_dir, quantization=quantization, cpu_kernels=False,  # exact: dequantized tiles,
              kv_cache_dtype="float32")  # an fp32 cache
    for prompt in PROMPTS:
        out = llm.generate([prompt], GREEDY)[0].token_ids
        with torch.no_grad():
            ref = oracle.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert out == ref[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_adapters")
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        build_peft(tiny_model_dir, config, root / name, seed)
    return root


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_adapters_on_quantized_base_match_peft_on_dequantized_weights(tiny_model_dir, adapters, adapter):
    oracle = PeftModel.from_pretrained(dequantized_hf(tiny_model_dir, "int8"), adapters / adapter).eval()
    llm = LLM(tiny_model_dir, quantization="int8", cpu_kernels=False, adapter_root=str(adapters),
              kv_cache_dtype="float32")
    llm.load_adapter(adapter, adapter)
    for prompt in PROMPTS:
        ids = llm.add_request(prompt, SamplingParams(max_tokens=1), adapter=adapter)
        batch = llm.scheduler.schedule()
        inputs = llm.runner.prepare(batch)
        ours = llm.runner.logits(llm.runner.forward(inputs), torch.arange(len(prompt)))
        llm.abort(ids)
        with torch.no_grad():
            ref = oracle(input_ids=torch.tensor([prompt])).logits[0]
        assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_adapters_with_quantized_kernels_decode_like_the_dequantized_path(tiny_model_dir, adapters, adapter):
    """The fused decode kernels (quantized weights + LoRA rows in one call) agree with the dequantized path.
    Not batch invariant, so that the 37-row prefill stays exact (torch's GEMM) and only decode steps take int8
    activations: with invariance the prefill takes them too, and this tiny model's near-ties flip."""
    outs = []
    for cpu_kernels in (True, False):
        llm = LLM(tiny_model_dir, quantization="int8", cpu_kernels=cpu_kernels, adapter_root=str(adapters),
                  batch_invariant=False, kv_cache_dtype="float32")
        llm.load_adapter(adapter, adapter)
        outs.append([o.token_ids for o in llm.generate(PROMPTS, GREEDY, adapter=adapter)])
    agree = sum(a == b for x, y in zip(*outs) for a, b in zip(x, y))
    assert agree >= 0.9 * sum(len(x) for x in outs[0])


def lora_logits_against_peft(folder: Path, adapters: Path, cpu_kernels: bool, check=None):
    """Per prompt, our logits with the LoRA on every projection beside PEFT's on transformers' dequantization of
    folder's m.gguf; check(llm) first, on the engine as it loaded."""
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file="m.gguf", dtype=torch.float32)
    oracle = PeftModel.from_pretrained(dequantized, adapters / "lora").eval()
    llm = LLM(folder / "m.gguf", cpu_kernels=cpu_kernels, adapter_root=str(adapters), kv_cache_dtype="float32")
    if check is not None:
        check(llm)
    llm.load_adapter("lora", "lora")
    for prompt in PROMPTS:  # (each fits one fused step)
        request = llm.add_request(prompt, SamplingParams(max_tokens=1), adapter="lora")
        inputs = llm.runner.prepare(llm.scheduler.schedule())
        ours = llm.runner.logits(llm.runner.forward(inputs), torch.arange(len(prompt)))
        llm.abort(request)
        with torch.no_grad():
            yield ours, oracle(input_ids=torch.tensor([prompt])).logits[0]


def test_lora_on_a_file_that_mixes_types_in_q_k_v_matches_peft(tiny_model_dir, adapters, tmp_path):
    """A Q4_K_M file of a narrow model keeps attn_v in Q8_0 beside Q5_0 q/k, so q/k/v load as a
    MixedQuantizedLinear (a part per type): a LoRA on every projection adapts it as PEFT does on transformers' own
    dequantization of the file, and the fused kernels (int8 activations) stay close to that."""
    types = NARROW_MIXES["q4_k_m"]
    write_gguf(hf_model(tiny_model_dir), tmp_path / "m.gguf", qtype_of=lambda name, w: types.get(name.split(".")[-2]))
    for cpu_kernels in (False, True):
        for ours, ref in lora_logits_against_peft(tmp_path, adapters, cpu_kernels):
            if cpu_kernels:  # the bound of test_gguf's mixed q/k/v (a random model amplifies int8 noise: 14% measured)
                assert ((ours - ref).norm(dim=-1) <= 0.15 * ref.norm(dim=-1)).all()
                assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
            else:
                assert (ours - ref).abs().max() <= 1e-4


def test_lora_on_an_f16_file_under_fp32_activations_matches_peft(tiny_model_dir, adapters, tmp_path):
    """An F16 file's linears keep their fp16 matrices under fp32 activations (models.loader._half_linears): a LoRA
    on them computes in fp32, as PEFT does on transformers' fp32 load of the file."""
    write_gguf(hf_model(tiny_model_dir), tmp_path / "m.gguf", float_dtype=np.float16)

    def half_matrices(llm: LLM) -> None:
        assert llm.config.dtype == "float32"
        assert llm.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float16

    for cpu_kernels in (False, True):
        for ours, ref in lora_logits_against_peft(tmp_path, adapters, cpu_kernels, half_matrices):
            assert (ours - ref).abs().max() <= 1e-4


def test_medusa_on_a_quantized_lm_head_is_lossless(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(2, 1, 64, 256, False))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.2)
    save_medusa_heads(heads, tmp_path)
    plain = LLM(tiny_model_dir, quantization="int8")
    medusa = LLM(tiny_model_dir, quantization="int8", medusa=str(tmp_path))
    assert isinstance(medusa.model.lm_head, QuantizedLinear)
    expected = [o.token_ids for o in plain.generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in medusa.generate(PROMPTS, GREEDY)] == expected
