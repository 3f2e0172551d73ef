"""Model registry: config.json's architectures[0] -> decoder class."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from models.config import MODEL_TYPES, ModelConfig
from models.llama import LlamaForCausalLM

# Qwen2 (q/k/v bias), Qwen3 (q/k norms) and Mistral (sliding window) differ from Llama only in config flags.
MODEL_REGISTRY: dict[str, type[nn.Module]] = dict.fromkeys(MODEL_TYPES.values(), LlamaForCausalLM)

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {config.architecture!r}; gorgon supports "
                         f"{', '.join(MODEL_REGISTRY)}") from None
