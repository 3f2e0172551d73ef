"""Checkpoint -> model: an HF folder (safetensors only, never unpickled; optionally quantized at load time),
or a GGUF file (models.gguf; quantized tensors stay in their blocks). Keys are checked strictly both ways."""
from __future__ import annotations

import json
import logging
from itertools import groupby
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from models import model_class
from models.config import ModelConfig
from models.gguf import find_gguf, half_precision_dtype, open_gguf, read_gguf
from models.gguf import recommended_sampling as gguf_recommended_sampling
from models.layers import PackedLinear
from models.quant import (
    LOAD_TIME_QUANTIZATIONS,
    MixedQuantizedLinear,
    QType,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedWeight,
    concat,
    quantize,
)

# Buffers that old HF checkpoints saved; recomputed here, so they are skipped, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# a checkpoint's tensors of the model gorgon builds (others, of heads it does not run, are skipped)
MODEL_PREFIXES = ("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")
logger = logging.getLogger("gorgon")


# files of torch.save / pickle: never opened (unpickling runs code)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(ValueError):
    pass


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: the sharded index's files if there is one, else model.safetensors,
    else *.safetensors (as transformers reads a folder: another file beside them, a PEFT adapter's or Mistral's
    consolidated.safetensors, is not the model's)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in the folder: {missing}")
        return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickled weights ({', '.join(pickles)}); gorgon never unpickles. Convert them "
            "once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{folder} has no *.safetensors weights")


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def recommended_sampling(path: str | Path) -> dict[str, float | int]:
    """The sampling parameters a checkpoint's authors recommend, where it states them: a GGUF file's
    general.sampling.* keys, or what generation_config.json sets (as vLLM's --generation-config auto reads
    it). Requests that leave a parameter out take its value from here."""
    path = Path(path)
    if (gguf := find_gguf(path)) is not None:
        recommended = gguf_recommended_sampling(open_gguf(gguf))
    elif (path / "generation_config.json").is_file():
        # read as JSON: GenerationConfig warns at every load of a file that sets them without do_sample
        config = json.loads((path / "generation_config.json").read_text())
        recommended = {name: config[name] for name in SAMPLING_FIELDS if config.get(name) is not None}
    else:
        return {}
    if "top_k" in recommended:  # (-1 is vLLM's "off", 0 transformers' and ours)
        recommended["top_k"] = max(int(recommended["top_k"]), 0)
    return recommended


def default_dtype(path: str | Path, device: str) -> str:
    """The dtype a model runs in when none is asked for: bfloat16 on CUDA; on the CPU the checkpoint's own where it
    is stored in bfloat16 (decode streams every weight each step: fp32 copies would halve its speed and double its
    memory), else float32, an fp16 checkpoint's matrices kept in fp16 (_half_linears: fp16 activations overflow
    where a model's residual stream passes 65504)."""
    if device.startswith("cuda"):
        return "bfloat16"
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return half_precision_dtype(gguf_file) or "float32"
    # (an fp16 checkpoint's matrices stay fp16 under fp32 activations, as an F16 GGUF file's: _half_linears)
    return "bfloat16" if _stored_dtype(path) == "bfloat16" else "float32"


def _stored_dtype(path: str | Path) -> str | None:
    """The dtype an HF folder's config.json says its weights are stored in."""
    config_file = Path(path) / "config.json"
    hf_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return hf_config.get("dtype", hf_config.get("torch_dtype"))


def default_kv_cache_dtype(path: str | Path, dtype: str, quantization: str | None) -> str:
    """The KV cache's dtype when none is asked for: the activations' (an exact model stays exact), except fp16
    under fp32 activations for GGUF files and weights quantized at load, which run as llama.cpp runs them: its
    cache is fp16, whose rounding (2^-11 relative) is far below quantized weights' own, and a decode step reads
    half the bytes (SmolLM2, 1 thread: Q4_1 1.06x at batch 1, 1.15x at batch 32, 1.2-1.45x at a 1k context)."""
    if dtype == "float32" and (quantization is not None or find_gguf(path) is not None or _stored_dtype(path) == (
            "float16")):  # (an fp16 folder's too, as an F16 file's)
        return "float16"
    return dtype


def model_config(path: str | Path) -> ModelConfig:
    """The configuration of the model at `path` (a .gguf file or a folder holding one, else an HF folder), read
    without its weights."""
    gguf_file = find_gguf(path)
    return read_gguf(gguf_file).config if gguf_file is not None else ModelConfig.from_folder(path)


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device | str,
               quantization: str | None = None, dequantize: bool = False) -> torch.nn.Module:
    """The model at `path`: a .gguf file or a folder holding one, else an HF folder. `quantization` ("int8",
    "int4", models.quant.LOAD_TIME_QUANTIZATIONS) quantizes an HF checkpoint's linear layers as it loads (a GGUF
    file's: those it stores in float or in types without kernels); `dequantize` turns a GGUF file's quantized
    weights into `dtype` (as they load off the CPU)."""
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        if quantization is not None and dequantize:
            raise CheckpointError("--quantization and --dequantize ask for opposite things: give one")
        return load_gguf_model(gguf_file, dtype, device, dequantize, quantization)
    folder = Path(path)
    config = ModelConfig.from_folder(folder)
    files = safetensors_files(folder)
    model = _empty_model(config, dtype, device)
    stored = load_weights(model, files)
    if quantization is not None:
        quantize_model(model, quantization)
    elif torch.device(device).type == "cpu" and dtype == torch.float32:
        keep_half(model, _half_linears(model, stored), dtype)
    return model.eval()


def _empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> torch.nn.Module:
    with torch.device("meta"):
        model = model_class(config)(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():  # buffers are not in the checkpoint; rebuild them on the device
        if hasattr(module, "inv_freq"):
            module.__init__(module.head_dim, module.rope, module.max_position_embeddings)
            module.to(device)
    return model


def _linear_modules(model: torch.nn.Module) -> list[str]:
    """Paths of the linears that quantization replaces: every projection of every layer, and the LM head."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and (".layers." in f".{name}" or name == "lm_head")]


def quantize_model(model: torch.nn.Module, quantization: str) -> None:
    """Replace each linear (and a tied embedding) by its load-time quantization, in place."""
    qtype = _load_time_qtype(quantization)
    dtype = model.model.embed_tokens.weight.dtype
    for name in _linear_modules(model):
        linear = model.get_submodule(name)
        _replace(model, name, _quantized_linear(_in_blocks(name, linear.weight, qtype), linear.bias, linear, dtype))
    if model.config.tie_word_embeddings:  # the embedding reads the LM head's blocks
        head = model.lm_head
        _replace(model, "model.embed_tokens",
                 _embedding(QuantizedWeight(qtype, (head.out_features, head.in_features), head.weight), dtype))


def _load_time_qtype(quantization: str) -> QType:
    if quantization not in LOAD_TIME_QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(LOAD_TIME_QUANTIZATIONS)}, got {quantization!r}")
    return LOAD_TIME_QUANTIZATIONS[quantization]


def _in_blocks(name: str, weight: torch.Tensor, qtype: QType) -> QuantizedWeight:
    """A float matrix quantized at load (Q8_0 / Q4_1: blocks of 32 weights of a row)."""
    if weight.shape[1] % 32:
        raise CheckpointError(f"{name} has {weight.shape[1]} input features; {qtype.name} needs a multiple of 32")
    return quantize(weight, qtype)


def load_gguf_model(file: Path, dtype: torch.dtype, device: torch.device | str,
                    dequantize: bool = False, quantization: str | None = None) -> torch.nn.Module:
    """A GGUF checkpoint's model: float tensors copied into the model's dtype; each linear whose weights are
    quantized becomes a QuantizedLinear over the raw blocks (packed q/k/v and gate/up of one type), or a
    MixedQuantizedLinear (shards of several types). Off the CPU, where gorgon has no quantized kernels, or when
    asked to `dequantize`, quantized tensors are dequantized into the model's dtype instead, as transformers loads
    GGUF files: one at a time, as each is copied, so the host never holds more than one tensor in fp32. So are
    tensors of types the kernels do not run (models.quant.DEQUANTIZED_TYPES), with the shards packed with them:
    into fp16 under fp32 activations, as the file's F16 matrices run (_half_linears). With a `quantization`, the
    matrices that would run in float go into its blocks instead (_quantize_float_linears)."""
    checkpoint = read_gguf(file)
    config = checkpoint.config
    model = _empty_model(config, dtype, device)
    tensors = dict(checkpoint.tensors)
    keep_quantized = torch.device(device).type == "cpu" and not dequantize
    expected = _expected_checkpoint_keys(model)
    unexpected = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if unexpected or missing:
        raise CheckpointError(f"{file} does not match a {config.architecture}: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")
    if quantization is not None:
        _quantize_float_linears(model, tensors, quantization)
    # quantized linears: one module per packed group, shards in the model's order
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    for name in _linear_modules(model):
        linear = modules[name]
        parent = name.rpartition(".")[0]
        shard_keys = ([f"{parent}.{shard}" for shard in linear.shards] if isinstance(linear, PackedLinear)
                      else [name])
        weights = [tensors[f"{key}.weight"] for key in shard_keys if f"{key}.weight" in tensors]
        quantized = [w for w in weights if isinstance(w, QuantizedWeight)]
        if not keep_quantized or not quantized or not all(w.has_kernels for w in quantized):
            continue  # dequantized with the float rest
        if name == "lm_head" and config.tie_word_embeddings:
            continue
        if len(quantized) < len(weights):
            raise CheckpointError(f"{name} mixes quantized and float shards, which gorgon's kernels cannot pack into "
                                  "one matrix: load it dequantized (--dequantize)")
        for key in shard_keys:  # (the blocks' own shapes: a metadata mismatch fails here, not in a forward)
            for part in ("weight", "bias"):
                if f"{key}.{part}" in tensors:
                    _check_shape(f"{key}.{part}", tensors[f"{key}.{part}"].shape,
                                 _target(f"{key}.{part}", params, modules, model))
        biases = [tensors.pop(f"{key}.bias") for key in shard_keys if f"{key}.bias" in tensors]
        if len({w.qtype for w in weights}) == 1:
            _replace(model, name, _quantized_linear(concat(weights), torch.cat(biases) if biases else None, linear,
                                                    dtype))
        else:
            _replace(model, name, _mixed_linear(weights, biases, linear, dtype))
        for key in shard_keys:
            del tensors[f"{key}.weight"]
    embed = tensors.pop("model.embed_tokens.weight")
    _check_shape("model.embed_tokens.weight", embed.shape, params["model.embed_tokens.weight"])
    if keep_quantized and isinstance(embed, QuantizedWeight) and embed.has_kernels:
        _replace(model, "model.embed_tokens", _embedding(embed, dtype))
        if config.tie_word_embeddings:
            _replace(model, "lm_head", _quantized_linear(embed, None, model.lm_head, dtype))
    else:
        tensors["model.embed_tokens.weight"] = embed
    # the rest is float on copy: norms, biases, float linears, quantized tensors that run dequantized (off the CPU, all)
    if keep_quantized and dtype == torch.float32:  # fp16 matrices stay so: made fp16 before the copy, never fp32
        stored = {key: torch.float16 if isinstance(t, QuantizedWeight) else t.dtype for key, t in tensors.items()}
        keep_half(model, _half_linears(model, stored), dtype)
        params = dict(model.named_parameters())
    if keep_quantized:
        _say_what_runs_dequantized(file, list(tensors.values()), torch.float16 if dtype == torch.float32 else dtype)
    for key, tensor in tensors.items():
        _copy(key, _float(tensor), params, modules, model)
    return model.eval()


def _quantize_float_linears(model: torch.nn.Module, tensors: dict[str, torch.Tensor | QuantizedWeight],
                            quantization: str) -> None:
    """Load-time quantization of a GGUF file, in `tensors`: each linear's matrix that would run in float (the
    file's F32/F16/BF16 ones, and those of types without kernels) goes into the quantization's blocks, one at a
    time, as llama-quantize would turn it; matrices in kernel types keep theirs. A tied embedding is the LM head's
    matrix too."""
    qtype = _load_time_qtype(quantization)
    keys = ["model.embed_tokens.weight"] if model.config.tie_word_embeddings else []
    for name in _linear_modules(model):
        module, parent = model.get_submodule(name), name.rpartition(".")[0]
        keys += ([f"{parent}.{shard}.weight" for shard in module.shards] if isinstance(module, PackedLinear)
                 else [f"{name}.weight"])
    for key in keys:
        tensor = tensors.get(key)
        if tensor is not None and not (isinstance(tensor, QuantizedWeight) and tensor.has_kernels):
            tensors[key] = _in_blocks(key, _float(tensor), qtype)


def _say_what_runs_dequantized(file: Path, rest: list[torch.Tensor | QuantizedWeight], dtype: torch.dtype) -> None:
    """Warn that the quantized tensors among those left to copy (of types without kernels, and the shards packed
    with them) run dequantized into `dtype`: how many, and in how many bytes."""
    dequantized = [w for w in rest if isinstance(w, QuantizedWeight)]
    if not dequantized:
        return
    types = sorted({w.qtype.name for w in dequantized if not w.has_kernels})
    gib = sum(w.shape[0] * w.shape[1] for w in dequantized) * dtype.itemsize / 2**30
    logger.warning("%s: gorgon has no kernels for %s; %d quantized tensors (those, and any packed with them) are "
                   "dequantized into %s as the model loads: %.2f GiB, which decode reads at every step", file.name,
                   ", ".join(types), len(dequantized), str(dtype).removeprefix("torch."), gib)


def _half_linears(model: torch.nn.Module, stored: dict[str, torch.dtype | None]) -> dict[str, torch.dtype]:
    """The linears (and the embedding) whose matrices the checkpoint stores in fp16 (stored: each tensor's dtype),
    which keep it under fp32 activations on the CPU, as llama.cpp runs an F16 file: the decode kernels widen them
    exactly as they read them (fp16 activations overflow where a model's residual stream exceeds 65504, as Qwen2's
    can: every logit NaN), and a step reads half the bytes of fp32 copies. A tied LM head shares the embedding's.
    (BF16 ones become fp32: the kernels' bf16 dot products round the activations to bf16.)"""
    half = {}
    for name in [*_linear_modules(model), "model.embed_tokens"]:
        module, parent = model.get_submodule(name), name.rpartition(".")[0]
        if name == "lm_head" and model.config.tie_word_embeddings:
            continue
        keys = [f"{parent}.{shard}" for shard in module.shards] if isinstance(module, PackedLinear) else [name]
        if {stored.get(f"{key}.weight") for key in keys} == {torch.float16}:
            half[name] = torch.float16
    return half


def keep_half(model: torch.nn.Module, half: dict[str, torch.dtype], dtype: torch.dtype) -> None:
    """Turn each module `half` names back to its checkpoint's fp16 (exactly: its values were), under activations of
    `dtype` (models.layers.Linear.dtype, Embedding.dtype); frozen, as inference weights are."""
    for name, half_dtype in half.items():
        module = model.get_submodule(name)
        module.weight = torch.nn.Parameter(module.weight.detach().to(half_dtype), requires_grad=False)
        module.dtype = dtype
    if "model.embed_tokens" in half and model.config.tie_word_embeddings:
        model.lm_head.weight, model.lm_head.dtype = model.model.embed_tokens.weight, dtype


def _float(tensor: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    return tensor.dequantize() if isinstance(tensor, QuantizedWeight) else tensor


def _quantized_linear(weight: QuantizedWeight, bias: torch.Tensor | None, replaces: torch.nn.Module,
                      dtype: torch.dtype) -> QuantizedLinear:
    layer = QuantizedLinear.from_weight(weight, None if bias is None else bias.detach(), dtype)
    if isinstance(replaces, PackedLinear):
        layer.shards = dict(replaces.shards)
    return layer


def _mixed_linear(weights: list[QuantizedWeight], biases: list[torch.Tensor], replaces: torch.nn.Module,
                  dtype: torch.dtype) -> MixedQuantizedLinear:
    """One part per run of consecutive shards of one type (biases: one per shard, or none)."""
    parts = [QuantizedLinear.from_weight(concat(list(run)), None, dtype)
             for _, run in groupby(weights, key=lambda w: w.qtype)]
    layer = MixedQuantizedLinear(parts, torch.cat(biases).detach().to(dtype) if biases else None)
    layer.shards = dict(replaces.shards)
    return layer


def _embedding(weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedEmbedding:
    embedding = QuantizedEmbedding(weight.shape[0], weight.shape[1], weight.qtype, dtype)
    embedding.weight = weight.data
    return embedding


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def load_weights(model: torch.nn.Module, files: list[Path]) -> dict[str, torch.dtype]:
    """Copy every tensor into its parameter (packed ones into their shard), and return each one's stored dtype.
    Strict both ways within the model's own modules; tensors of other parts (Medusa or MTP heads) are skipped
    with a warning, as transformers skips them. A tied model's `lm_head.weight`, which fine-tunes and re-saves of
    tied models often still hold, is the embedding: where the file holds no embedding it fills it, and where it
    differs from the embedding the head is untied, as transformers loads it."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    expected = _expected_checkpoint_keys(model)
    tied = model.config.tie_word_embeddings
    stored: dict[str, torch.dtype] = {}
    unexpected: list[str] = []
    skipped: list[str] = []
    head = None
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            total += len(f.keys())
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=total < 64) as bar:
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    bar.update()
                    if key.endswith(_IGNORED_SUFFIXES):
                        continue
                    if key == "lm_head.weight" and tied:
                        head = f.get_tensor(key).to(model.lm_head.weight.device)
                        continue
                    if key not in expected:
                        (unexpected if key.startswith(MODEL_PREFIXES) else skipped).append(key)
                        continue
                    tensor = f.get_tensor(key)
                    _copy(key, tensor, params, modules, model)
                    stored[key] = tensor.dtype
    if head is not None and "model.embed_tokens.weight" not in stored:  # (the head alone: the embedding too)
        _copy("model.embed_tokens.weight", head, params, modules, model)
        stored["model.embed_tokens.weight"] = head.dtype
    elif head is not None and not torch.equal(head.to(model.lm_head.weight.dtype), model.lm_head.weight.data):
        logger.warning("config.json ties the LM head to the embedding, but the checkpoint's lm_head.weight differs "
                       "from it: the head is untied, as transformers loads it")
        _check_shape("lm_head.weight", head.shape, model.lm_head.weight)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(head.to(model.lm_head.weight.dtype), requires_grad=False)
        stored["lm_head.weight"] = head.dtype
    if skipped:
        logger.warning("skipped %d tensors of parts gorgon does not run: %s", len(skipped),
                       ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    missing = sorted(expected - set(stored))
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))
    return stored


def _expected_checkpoint_keys(model: torch.nn.Module) -> set[str]:
    keys = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            if isinstance(module, PackedLinear):
                parent = module_name.rsplit(".", 1)[0]
                keys.update(f"{parent}.{shard}.{param_name}" for shard in module.shards)
            else:
                keys.add(f"{module_name}.{param_name}")
    if model.config.tie_word_embeddings:
        keys.discard("lm_head.weight")
    return keys


def _copy(key: str, tensor: torch.Tensor, params: dict, modules: dict, model: torch.nn.Module) -> None:
    target = _target(key, params, modules, model)
    _check_shape(key, tensor.shape, target)
    target.copy_(tensor)


def _target(key: str, params: dict, modules: dict, model: torch.nn.Module) -> torch.Tensor:
    """The model's tensor that a checkpoint's tensor `key` fills (a packed projection's rows for a shard)."""
    module_path, param_name = key.rsplit(".", 1)
    parent, _, leaf = module_path.rpartition(".")
    packed_into = model.packed_modules.get(leaf)
    if packed_into is not None:
        return modules[f"{parent}.{packed_into}"].shard_param(param_name, leaf)
    return params[key].data


def _check_shape(key: str, shape: tuple[int, ...], target: torch.Tensor) -> None:
    if tuple(target.shape) != tuple(shape):
        raise CheckpointError(f"tensor {key} has shape {tuple(shape)}, the model expects {tuple(target.shape)}")
