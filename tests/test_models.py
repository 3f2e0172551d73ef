"""Our decoder vs transformers: logits over the prefill and 32 incremental paged decode steps."""
from __future__ import annotations

import json

import pytest
import torch

from engine import LLM, ContextLengthError, SamplingParams
from models.config import ModelConfig

from conftest import PROMPT_LEN, hf_model, paged_logits, save_tiny_model, save_tiny_qwen3

DECODE_STEPS = 32

ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    # max_position_embeddings is 24 below, so decoding past it exercises the dynamic growth
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "rope_theta": 500000.0, "original_max_position_embeddings": 16},
}

MODEL_CASES = {
    "llama-gqa": ("LlamaForCausalLM", {}),
    "llama-mha-tied": ("LlamaForCausalLM", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-head-dim": ("LlamaForCausalLM", {"head_dim": 24}),  # != hidden / heads = 16
    "llama-mqa": ("LlamaForCausalLM", {"num_key_value_heads": 1}),
    "llama-biases": ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {"sliding_window": 4096}),
}


def hf_incremental_logits(folder, tokens: list[int]) -> torch.Tensor:
    """HF's logits computed the way HF decodes: prefill, then one cached token at a time."""
    model = hf_model(folder)
    with torch.no_grad():
        out = model(torch.tensor([tokens[:PROMPT_LEN]]), use_cache=True)
        rows, past = [out.logits[0]], out.past_key_values
        for token in tokens[PROMPT_LEN:]:
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            rows.append(out.logits[0])
            past = out.past_key_values
    return torch.cat(rows)


def check_against_hf(folder, device: str = "cpu") -> None:
    llm = LLM(folder, num_kv_blocks=32, block_size=4, device=device, dtype="float32")
    tokens = torch.randint(3, 256, (PROMPT_LEN + DECODE_STEPS,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = paged_logits(llm, tokens).cpu()
    ref = hf_incremental_logits(folder, tokens)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", MODEL_CASES)
def test_architectures_match_hf(tmp_path, case):
    arch, overrides = MODEL_CASES[case]
    check_against_hf(save_tiny_model(tmp_path, arch, **overrides))


def test_qwen3_q_and_k_norms_match_hf(tmp_path):
    """Qwen3 RMS-norms each head's q and k (weights over head_dim, here != hidden / heads) before RoPE; trained
    norm weights, not HF's fresh ones, check that each goes where it should."""
    check_against_hf(save_tiny_qwen3(tmp_path, head_dim=24))


@pytest.mark.parametrize("rope", ROPE_CASES)
def test_rope_scaling_matches_hf(tmp_path, rope):
    overrides = {"max_position_embeddings": 24} if rope == "dynamic" else {}
    if ROPE_CASES[rope] is not None:
        overrides["rope_parameters"] = ROPE_CASES[rope]
    check_against_hf(save_tiny_model(tmp_path, "LlamaForCausalLM", **overrides))


def test_transformers4_config_reads_like_transformers5():
    v5 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
          "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                              "original_max_position_embeddings": 16}}
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=5e5, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    assert ModelConfig.from_dict(v4).rope == ModelConfig.from_dict(v5).rope


def test_unknown_rope_type_is_named():
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 2,
              "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}
    with pytest.raises(ValueError, match="longrope"):
        ModelConfig.from_dict(config)


def test_sliding_window_caps_the_context(tmp_path):
    folder = save_tiny_model(tmp_path, "MistralForCausalLM", sliding_window=32)
    llm = LLM(folder, num_kv_blocks=32, block_size=4)
    assert llm.max_model_len == 32
    with pytest.raises(ContextLengthError, match="the prompt has 37 tokens, but this model's context is 32 tokens"):
        llm.add_request(list(range(3, 40)), SamplingParams(max_tokens=4))
    with pytest.raises(ContextLengthError, match="117 were asked for"):  # no silent truncation
        llm.add_request(list(range(3, 20)), SamplingParams(max_tokens=100))
    out = llm.generate(list(range(3, 20)), SamplingParams(max_tokens=32 - 17, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 32 - 17
    assert json.loads((folder / "config.json").read_text())["sliding_window"] == 32
