"""HF checkpoint folder -> model. Reads safetensors only (never unpickles) and checks keys strictly."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from models import model_class
from models.config import ModelConfig
from models.layers import PackedLinear

# Buffers that old HF checkpoints saved; recomputed here, so they are skipped, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    pass


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: the sharded index's files if there is one, else *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in the folder: {missing}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickled weights ({', '.join(pickles)}); gorgon never unpickles. Convert them "
            "once with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{folder} has no *.safetensors weights")


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device | str) -> torch.nn.Module:
    folder = Path(path)
    config = ModelConfig.from_folder(folder)
    cls = model_class(config)
    files = safetensors_files(folder)
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, files, device)
    for module in model.modules():  # buffers are not in the checkpoint; rebuild them on the device
        if hasattr(module, "inv_freq"):
            module.__init__(module.head_dim, module.rope, module.max_position_embeddings)
            module.to(device)
    return model.eval()


def load_weights(model: torch.nn.Module, files: list[Path], device: torch.device | str) -> None:
    """Copy every tensor into its parameter (packed ones into their shard); strict both ways."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    expected = _expected_checkpoint_keys(model)
    seen: set[str] = set()
    unexpected: list[str] = []
    total = sum(len(safe_open(f, "pt").keys()) for f in files)
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=total < 64) as bar:
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    bar.update()
                    if key.endswith(_IGNORED_SUFFIXES):
                        continue
                    if key not in expected:
                        unexpected.append(key)
                        continue
                    _copy(key, f.get_tensor(key), params, modules, model)
                    seen.add(key)
    missing = sorted(expected - seen)
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))


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
    module_path, param_name = key.rsplit(".", 1)
    parent, _, leaf = module_path.rpartition(".")
    packed_into = model.packed_modules.get(leaf)
    if packed_into is not None:
        target = modules[f"{parent}.{packed_into}"].shard_param(param_name, leaf)
    else:
        target = params[key].data
    if target.shape != tensor.shape:
        raise CheckpointError(f"tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
    target.copy_(tensor)
