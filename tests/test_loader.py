"""Loader: strict key checks, safetensors only, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from models.loader import CheckpointError, default_dtype, default_kv_cache_dtype, load_model, recommended_sampling

from conftest import hf_model, save_tiny_model


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
    for stored, runs in (("bfloat16", "bfloat16"), ("float16", "float32")):  # (fp16: its matrices kept in fp16)
        (folder / "config.json").write_text(json.dumps({**config, key: stored}))
        assert default_dtype(folder, "cpu") == runs


def test_an_fp16_checkpoint_runs_under_fp32_activations_over_its_fp16_matrices(tmp_path):
    """As an F16 GGUF file: fp16 activations overflowed where the residual stream passed 65504 (every logit NaN,
    and greedy decoding then gave token 0 over and over)."""
    folder = save_tiny_model(tmp_path)
    hf = hf_model(folder)
    with torch.no_grad():  # one channel of layer 0's MLP output grows to ~1e5
        hf.model.layers[0].mlp.down_proj.weight[7] *= 400.0
        hf.model.layers[0].mlp.gate_proj.weight *= 15.0
        hf.model.layers[0].mlp.up_proj.weight *= 15.0
    hf.half().save_pretrained(folder)
    hf = hf.float()
    tokens = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
    assert out.hidden_states[1].abs().max() > 65504  # (the check can fail: the model overflows fp16)
    llm = LLM(folder, kv_cache_dtype="float32")
    layer = llm.model.model.layers[0]
    assert llm.config.dtype == "float32" and layer.mlp.down_proj.weight.dtype == torch.float16
    assert llm.model.lm_head.weight.dtype == torch.float16  # (untied here: a linear of its own)
    assert default_kv_cache_dtype(folder, "float32", None) == "float16"  # (as an F16 file's)
    got = llm.generate([tokens[0].tolist()], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        want = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=6, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, 24:].tolist()
    assert got.token_ids == want


def test_a_tied_checkpoint_whose_head_differs_from_its_embedding_unties_it(tmp_path):
    """As transformers loads it (a tied model fine-tuned with its head trained apart); a file holding the head alone
    gives the embedding too."""
    folder = save_tiny_model(tmp_path, tie_word_embeddings=True)
    tensors = load_file(folder / "model.safetensors")
    head = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file({**tensors, "lm_head.weight": head}, folder / "model.safetensors")
    model = load_model(folder, torch.float32, "cpu")
    assert torch.equal(model.lm_head.weight, head) and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
    only_head = {k: v for k, v in tensors.items() if k != "model.embed_tokens.weight"}
    save_file({**only_head, "lm_head.weight": head}, folder / "model.safetensors")
    model = load_model(folder, torch.float32, "cpu")
    embedding = model.model.embed_tokens.weight
    assert torch.equal(embedding, head) and model.lm_head.weight is embedding


def test_files_and_tensors_that_are_not_the_models_are_left_alone(tmp_path, caplog):
    """A PEFT adapter's or Mistral's consolidated weights beside model.safetensors, and tensors of heads gorgon
    does not run (Medusa, MTP, a rotary cache), as transformers leaves them; an unknown tensor inside a layer is
    still an error (another model)."""
    folder = save_tiny_model(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    save_file({"tok_embeddings.weight": torch.zeros(2)}, folder / "consolidated.safetensors")
    extras = {"medusa_head.0.0.linear.weight": torch.zeros(2), "model.mtp.0.weight": torch.zeros(2),
              "model.layers.0.self_attn.rotary_emb.cos_cached": torch.zeros(2)}
    save_file({**tensors, **extras}, folder / "model.safetensors")
    with caplog.at_level("WARNING", logger="gorgon"):
        model = load_model(folder, torch.float32, "cpu")
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])
    assert "skipped 2 tensors" in caplog.text and "medusa_head.0.0.linear.weight" in caplog.text


@pytest.mark.parametrize("arch, flag", [("MistralForCausalLM", "attention_bias"), ("Qwen2ForCausalLM", "mlp_bias"),
                                        ("MistralForCausalLM", "mlp_bias")])
def test_bias_flags_an_architecture_does_not_read_are_ignored(tmp_path, arch, flag):
    """transformers' Mistral reads neither flag and Qwen2 no mlp_bias: a config that sets one still loads."""
    folder = save_tiny_model(tmp_path, arch)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, flag: True}))
    load_model(folder, torch.float32, "cpu")


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_an_activation_other_than_silu_is_refused(tmp_path, activation):
    folder = save_tiny_model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": activation}))
    with pytest.raises(ValueError, match=f"hidden_act '{activation}' is not supported"):
        load_model(folder, torch.float32, "cpu")


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


def test_a_top_level_original_context_wins_over_the_rope_scalings_own(tmp_path):
    """transformers 4's form, as transformers reads it: yarn's original_max_position_embeddings at the top level of
    config.json overrides the one inside rope_scaling."""
    folder = save_tiny_model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config |= {"rope_theta": 10000.0, "max_position_embeddings": 128, "original_max_position_embeddings": 32,
               "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}
    (folder / "config.json").write_text(json.dumps(config))
    tokens = torch.randint(3, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    ours = load_model(folder, torch.float32, "cpu")
    with torch.no_grad():
        got = ours.compute_logits(ours(tokens, torch.arange(100)[None]))
        want = hf_model(folder)(tokens).logits
    assert (got - want).abs().max() <= 1e-4
