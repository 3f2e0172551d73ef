"""ModelConfig: the parts of an HF `config.json` that the decoder needs, read the same way from
transformers 4 files (`rope_theta` + `rope_scaling`) and transformers 5 files (`rope_parameters`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# a config.json without `architectures` names its class by model_type, as transformers' Auto classes read it
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
# freq_factors: not an HF type; a GGUF file's per-frequency divisors (its rope_freqs tensor) as read by models.gguf
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "freq_factors")


@dataclass
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    params: dict = field(default_factory=dict)  # the type's remaining parameters, as written

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope scaling type {self.rope_type!r}; gorgon supports {', '.join(SUPPORTED_ROPE_TYPES)}"
            )


@dataclass
class ModelConfig:
    """Shapes and options of a Llama-family decoder; invariant: num_heads % num_kv_heads == 0."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool  # Llama/Mistral's attention_bias covers o_proj too; Qwen2's q/k/v bias does not
    mlp_bias: bool
    qk_norm: bool  # Qwen3: each head's q and k RMS-normed (weights over head_dim) before RoPE
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: list[int]

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")

    @property
    def max_model_len(self) -> int:
        """Longest sequence the engine accepts: the context that RoPE scaling extends to, as vLLM computes it
        (the factor times the original context for linear, dynamic and yarn; HF's dynamic NTK sets no limit of
        its own), or max_position_embeddings when that is larger. Llama 3's scaling (llama3, and a GGUF's
        freq_factors) states its context in max_position_embeddings (3.1: 131072 with factor 8 over 8192; 3.2:
        131072 with factor 32). Sliding-window attention is not implemented, so a model with an active window is
        served only up to the window, where it equals full attention."""
        length = self.max_position_embeddings
        if self.rope.rope_type not in ("default", "llama3", "freq_factors"):
            original = self.rope.params.get("original_max_position_embeddings", self.max_position_embeddings)
            length = max(length, int(self.rope.factor * original))
        if self.sliding_window is not None:
            return min(length, self.sliding_window)
        return length

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        architectures = d.get("architectures") or []
        if not architectures and d.get("model_type") not in MODEL_TYPES:
            raise ValueError("config.json has neither an 'architectures' entry nor a known 'model_type' "
                             f"({', '.join(MODEL_TYPES)}); cannot tell which model class to build")
        arch = architectures[0] if architectures else MODEL_TYPES[d["model_type"]]
        if arch not in MODEL_TYPES.values():
            raise ValueError(f"unsupported architecture {arch!r}: gorgon runs Llama-family decoders "
                             f"({', '.join(MODEL_TYPES.values())})")
        quantized = d.get("quantization_config")
        method = quantized.get("quant_method", "unknown") if isinstance(quantized, dict) else "unknown"
        # (transformers saves a GGUF file's model, dequantized, with quant_method "gguf": its weights are floats)
        if quantized is not None and method != "gguf":  # packed tensors (qweight, scales) of another library
            raise ValueError(f"this checkpoint is quantized in {method!r} format (config.json's quantization_config), "
                             "which gorgon does not read: load the unquantized checkpoint (--quantization int8 or "
                             "int4 quantizes it as it loads), or a GGUF file of the model")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"config.json has no {', '.join(missing)}: not a {arch} configuration gorgon can read")
        activation = d.get("hidden_act", d.get("hidden_activation", "silu"))
        if activation not in ("silu", "swish"):
            raise ValueError(f"hidden_act {activation!r} is not supported: gorgon's MLP (and its fused kernels) "
                             "computes SiLU")
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        # the bias flags each of transformers' classes reads (Mistral none, Qwen2 its fixed q/k/v biases alone)
        attention_bias = arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") and bool(d.get("attention_bias", False))
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope=_read_rope(d),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=arch == "LlamaForCausalLM" and bool(d.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=_active_sliding_window(arch, d),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if Path(path).is_file():
            raise FileNotFoundError(f"{path} is a file: give the Hugging Face checkpoint folder that holds it (with "
                                    "its config.json and tokenizer), or a .gguf file")
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face checkpoint folder")
        return cls.from_dict(json.loads(config_file.read_text()))


def _read_rope(d: dict) -> RopeConfig:
    # transformers 5: everything in rope_parameters; transformers 4: rope_theta + optional rope_scaling
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if "rope_theta" in params:
        theta = params.pop("rope_theta")
    else:
        theta = d.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1.0 is not supported")
    if rope_type in ("yarn", "llama3"):  # (a top-level original length wins, as transformers reads it)
        params["original_max_position_embeddings"] = d.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings", d.get("max_position_embeddings", 2048))
    factor = params.pop("factor", 1.0)
    if factor is None:  # yarn may infer it from the two lengths
        factor = d.get("max_position_embeddings", 2048) / params["original_max_position_embeddings"]
    return RopeConfig(rope_type=rope_type, theta=float(theta), factor=float(factor), params=params)


def _active_sliding_window(arch: str, d: dict) -> int | None:
    window = d.get("sliding_window")
    if window is None:
        return None
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not d.get("use_sliding_window", False):
        return None
    layer_types = d.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)
