"""Loader: strict key checks, safetensors only, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.loader import CheckpointError, default_dtype, load_model, recommended_sampling

from conftest import save_tiny_model


def test_sharded_checkpoint_loads(tmp_path):
    folder = save_tiny_model(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / file)
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(folder, torch.float32, "cpu")
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])


def test_a_tied_checkpoint_that_still_holds_its_head_loads(tmp_path):
    """Fine-tunes and re-saves of tied models (Llama 3.2 1B, Qwen2.5 0.5B) often keep lm_head.weight: the embedding
    is the head, as transformers ties it."""
    folder = save_tiny_model(tmp_path, tie_word_embeddings=True)
    tensors = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in tensors
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, folder / "model.safetensors")
    model = load_model(folder, torch.float32, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_bfloat16_load(tmp_path):
    model = load_model(save_tiny_model(tmp_path), torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])  # transformers 5 and 4
def test_default_dtype_is_the_checkpoints_own_half_precision(tmp_path, key):
    folder = save_tiny_model(tmp_path)
    assert default_dtype(folder, "cpu") == "float32" and default_dtype(folder, "cuda") == "bfloat16"
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    for stored in ("bfloat16", "float16"):
        (folder / "config.json").write_text(json.dumps({**config, key: stored}))
        assert default_dtype(folder, "cpu") == stored


def _drop_k_proj(tensors: dict) -> None:
    del tensors["model.layers.1.self_attn.k_proj.weight"]


def _add_extra(tensors: dict) -> None:
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)


def _shrink_norm(tensors: dict) -> None:
    tensors["model.norm.weight"] = torch.zeros(3)


@pytest.mark.parametrize("edit, message", [
    (_drop_k_proj, r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight"),
    (_add_extra, r"unexpected tensors: model\.layers\.0\.extra\.weight"),
    (_shrink_norm, r"model\.norm\.weight has shape \(3,\)"),
])
def test_checkpoint_mismatch_is_named(tmp_path, edit, message):
    folder = save_tiny_model(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_model(folder, torch.float32, "cpu")


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path):
    folder = save_tiny_model(tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle: must never be opened")
    with pytest.raises(CheckpointError, match="never unpickles.*safe_serialization"):
        load_model(folder, torch.float32, "cpu")


def test_unknown_architecture_is_named(tmp_path):
    folder = save_tiny_model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(folder, torch.float32, "cpu")
    # named before anything else is read: a nested config (Gemma 3, Llama 4), a quantized one, Phi-3's longrope
    nested = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": {"hidden_size": 8}}
    longrope = config | {"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"type": "longrope"},
                         "quantization_config": {"quant_method": "awq"}}
    for bad in (nested, longrope):
        (folder / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"unsupported architecture '{bad['architectures'][0]}'"):
            load_model(folder, torch.float32, "cpu")
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 8}))
    with pytest.raises(ValueError, match="config.json has no hidden_size, intermediate_size"):
        load_model(folder, torch.float32, "cpu")


def test_a_config_without_architectures_is_read_by_its_model_type(tmp_path):
    folder = save_tiny_model(tmp_path)
    tokens = torch.arange(3, 13)[None]
    with torch.no_grad():
        expected = load_model(folder, torch.float32, "cpu")(tokens[0], torch.arange(10))
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]  # as a hand-written config may leave it out: transformers reads model_type
    (folder / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        assert torch.equal(load_model(folder, torch.float32, "cpu")(tokens[0], torch.arange(10)), expected)
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="neither an 'architectures' entry nor a known 'model_type'"):
        load_model(folder, torch.float32, "cpu")


def test_a_file_of_a_checkpoint_folder_names_the_folder(tmp_path):
    folder = save_tiny_model(tmp_path)
    for file in ("model.safetensors", "config.json"):
        with pytest.raises(FileNotFoundError, match="is a file: give the Hugging Face checkpoint folder"):
            load_model(folder / file, torch.float32, "cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path, torch.float32, "cpu")


def test_recommended_sampling_is_what_generation_config_sets(tmp_path):
    """vLLM's --generation-config auto: the sampling fields a model's generation_config.json sets, and no others."""
    folder = save_tiny_model(tmp_path)
    assert recommended_sampling(folder) == {}
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
         "eos_token_id": [2, 3]}))
    assert recommended_sampling(folder) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8", "bitsandbytes"])
def test_a_checkpoint_quantized_by_another_library_is_a_clear_error(tmp_path, method):
    """AWQ / GPTQ / FP8 / bitsandbytes folders hold packed tensors (qweight, scales, ...): named, not mismatched."""
    folder = save_tiny_model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method}}))
    with pytest.raises(ValueError, match=f"quantized in '{method}' format .* a GGUF file"):
        load_model(folder, torch.float32, "cpu")


def test_a_folder_transformers_saved_from_a_gguf_file_loads(tmp_path):
    """transformers saves a model it loaded from a GGUF file dequantized, and marks it quant_method "gguf"."""
    folder = save_tiny_model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gguf"}}))
    assert load_model(folder, torch.float32, "cpu").config.architecture == "LlamaForCausalLM"
