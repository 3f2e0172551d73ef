"""GGUF checkpoints (llama.cpp's format) -> the model config and HF-named tensors, read with the gguf
package's memory-mapped reader. Float tensors become torch tensors; quantized ones stay in their blocks
(models.quant.QuantizedWeight: raw uint8 rows, never dequantized here). The tokenizer and chat template
come from the metadata through transformers' GGUF tokenizer conversion, corrected where it tokenizes
otherwise than llama.cpp (tokenize_as_llama_cpp)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType

from models.config import ModelConfig
from models.quant import DEQUANTIZED_TYPES, FLOAT_TYPES, QUANTIZED_TYPES, QType, QuantizedWeight, UnsupportedTensorType

# general.architecture -> the HF class. llama.cpp writes Mistral checkpoints as "llama"; Qwen2 (q/k/v biases) and
# Qwen3 (q/k norms) keep their own rotary layout (NEOX, which is HF's), so their q/k rows are not permuted
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
PERMUTED_QK = ("llama",)

# llama.cpp tensor name -> HF name ({} is the layer index)
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
ROPE_FACTORS = "rope_freqs.weight"  # read into the config (RoPE), not a parameter
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GGUFError(ValueError):
    pass


@dataclass
class GGUFCheckpoint:
    """A GGUF file's model. Invariant: `tensors` holds HF parameter names with q/k rows in HF order;
    values are torch tensors (float types) or QuantizedWeight (everything else)."""

    path: Path
    hf_config: dict  # config.json's shape, as models.config.ModelConfig.from_dict reads it
    tensors: dict[str, torch.Tensor | QuantizedWeight]

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.hf_config)


# llama.cpp's gguf-split names a model's parts PREFIX-00001-of-00003.gguf; the first holds the metadata
SPLIT_PART = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def find_gguf(path: str | Path) -> Path | None:
    """The .gguf file that `path` names: the file itself, or the only .gguf in a folder (or the first part of the
    one split model it holds); None if neither, or if the folder is a Hugging Face checkpoint (llama.cpp's
    converter writes its .gguf into the folder it converts)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not ((path / "config.json").is_file() and any(path.glob("*.safetensors"))):
        files = sorted(path.glob("*.gguf"))
        sets = {(m["prefix"], m["count"]) if (m := SPLIT_PART.match(f.name)) else f.name for f in files}
        if len(sets) > 1:  # (one model's parts are one set)
            raise GGUFError(f"{path} holds several .gguf files ({', '.join(f.name for f in files)}); name one")
        if files:
            return files[0]
    return None


def gguf_parts(path: str | Path) -> list[Path]:
    """The files of the model whose (first) file `path` is: itself, or every part of a model llama.cpp's
    gguf-split cut into several, found beside it by their names, as llama.cpp finds them."""
    path = Path(path)
    reader = open_gguf(path)
    count = _field(reader, "split.count", 1)
    if count <= 1:
        return [path]
    if _field(reader, "split.no", 0) != 0:
        raise GGUFError(f"{path.name} is part {_field(reader, 'split.no', 0) + 1} of a model split into {count} files "
                        f"(llama.cpp's gguf-split): give its first part, PREFIX-00001-of-{count:05d}.gguf")
    name = SPLIT_PART.match(path.name)
    if name is None or int(name["count"]) != count:
        raise GGUFError(f"{path.name} is the first of the {count} parts of a model (llama.cpp's gguf-split), found by "
                        f"their names: PREFIX-00001-of-{count:05d}.gguf and so on; name it so")
    parts = [path.with_name(f"{name['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise GGUFError(f"{path.name} is the first of {count} parts; missing beside it: {', '.join(missing)}")
    for i, part in enumerate(parts):
        part_reader = open_gguf(part)
        if (_field(part_reader, "split.no"), _field(part_reader, "split.count")) != (i, count):
            raise GGUFError(f"{part.name} is not part {i + 1} of {count} of this model: its metadata says part "
                            f"{_field(part_reader, 'split.no', 0) + 1} of {_field(part_reader, 'split.count', 1)}")
    return parts


def gguf_tensors(path: str | Path) -> list:
    """The model's tensors (gguf's ReaderTensor), of all its parts."""
    return [t for part in gguf_parts(path) for t in open_gguf(part).tensors]


class _Reader(GGUFReader):
    """GGUFReader slicing a plain ndarray view of its memory map: numpy.memmap runs a Python hook on each
    slice, and a Llama 3 or Qwen2 vocabulary's metadata takes over a million (6.3 s to parse a 1B model's
    file here, 2.0-2.7 s without). The tensors still read the file's pages (the view's base is the map)."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if type(self.data) is np.memmap:
            self.data = self.data.view(np.ndarray)
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs, raw_type):
        """gguf's parts for an array of numbers or strings, built in one pass where gguf recurses per item: a
        Qwen2 file's metadata (455k vocabulary items) took 4.0-5.3 s so, 1.2-1.5 s here. The parts, their indices and
        types are gguf's own (tests/test_gguf.py compares every field with gguf's reader)."""
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":  # (a file of the other byte order: gguf's way)
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, length = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        kind, count, offs = GGUFValueType(item_type[0]), int(length[0]), orig_offs + 12
        if count == 0 or kind not in (*self.gguf_scalar_to_np, GGUFValueType.STRING):
            return super()._get_field_parts(orig_offs, raw_type)  # (gguf types an empty array by its first item)
        if kind in self.gguf_scalar_to_np:
            items = self._get(offs, self.gguf_scalar_to_np[kind], count)
            return 12 + items.nbytes, [item_type, length, *items.reshape(-1, 1)], list(range(2, 2 + count)), \
                [GGUFValueType.ARRAY, kind]
        data, parts = self.data, [item_type, length]
        raw = memoryview(data)
        for _ in range(count):
            size = int.from_bytes(raw[offs:offs + 8], sys.byteorder)
            if offs + 8 + size > len(data):
                raise ValueError(f"the string at byte {offs} runs past the end of the file")
            parts += (data[offs:offs + 8].view(np.uint64), data[offs + 8:offs + 8 + size])
            offs += 8 + size
        return offs - orig_offs, parts, list(range(3, 2 + 2 * count, 2)), [GGUFValueType.ARRAY, kind]


@lru_cache(maxsize=16)  # (a split model's parts stay open together)
def _reader(path: Path, modified_ns: int) -> GGUFReader:
    try:
        return _Reader(path)  # memory-maps the file
    except ValueError as e:  # (an empty file, another format, a truncated one: gguf says only what it tripped on)
        raise GGUFError(f"{path} is not a GGUF file gorgon can read: {e}") from None


def open_gguf(path: str | Path) -> GGUFReader:
    """The file's reader, parsed once for the several reads of one load (parsing the metadata of a large
    vocabulary takes seconds); a file written anew is parsed anew."""
    path = Path(path).resolve()
    return _reader(path, path.stat().st_mtime_ns)


def half_precision_dtype(path: Path) -> str | None:
    """"bfloat16" where the file's matrices are all BF16 (a converter's BF16 file), else None. (An F16 file's
    activations are fp32, as llama.cpp's: in fp16 they overflow on models with large activations; its matrices
    stay F16, models.loader._half_linears.)"""
    types = {QType(t.tensor_type) for t in gguf_tensors(path) if len(t.shape) == 2}
    # (a quantized file with one BF16 matrix, an embedding left unquantized, runs in fp32 as llama.cpp runs it:
    # its quantized linears take fp32 activations, and bf16 ones would round every layer's output)
    return "bfloat16" if types == {QType.BF16} else None


def _field(reader: GGUFReader, key: str, default: object = None) -> object:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# the sampling llama.cpp's converter copies from a checkpoint's generation_config.json -> SamplingParams' names
RECOMMENDED_SAMPLING = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                        "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
                        "general.sampling.penalty_repeat": "repetition_penalty"}


def recommended_sampling(reader: GGUFReader) -> dict[str, float | int]:
    """The sampling parameters the file recommends (llama.cpp's general.sampling.* keys) that it states."""
    return {name: _field(reader, key) for key, name in RECOMMENDED_SAMPLING.items() if key in reader.fields}


def read_config(reader: GGUFReader, tensors: list) -> dict:
    """Llama, Qwen2 or Qwen3 metadata (and the model's `tensors`, of all its parts) -> an HF config.json dict."""
    arch = _field(reader, "general.architecture")
    if arch not in HF_ARCHITECTURES:
        raise GGUFError(f"unsupported GGUF architecture {arch!r}; gorgon reads {', '.join(HF_ARCHITECTURES)}")
    if _field(reader, "general.type") == "adapter":
        raise GGUFError("this GGUF is a LoRA adapter, not a model; gorgon loads adapters in PEFT format")
    experts = _field(reader, f"{arch}.expert_count", 0)
    if experts:
        raise GGUFError(f"this GGUF is a mixture of experts ({arch}.expert_count = {experts}), which gorgon "
                        "does not run")
    names = {t.name for t in tensors}
    embed = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise GGUFError("this GGUF holds no token_embd.weight, so no model (a vocabulary alone?)")
    num_heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    head_dim = _field(reader, f"{arch}.attention.key_length", hidden // num_heads)
    value_dim = _field(reader, f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise GGUFError(f"attention values of {value_dim} dimensions beside keys of {head_dim} "
                        f"({arch}.attention.value_length) are not supported")
    rotary_dim = _field(reader, f"{arch}.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise GGUFError(f"RoPE over {rotary_dim} of each head's {head_dim} dimensions ({arch}.rope.dimension_count) "
                        "is not supported: gorgon rotates whole heads")
    config = {
        "architectures": [HF_ARCHITECTURES[arch]],
        "vocab_size": _field(reader, f"{arch}.vocab_size", int(embed.shape[1])),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "max_position_embeddings": _field(reader, f"{arch}.context_length", 2048),
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_output.bias" in names,
        "mlp_bias": "blk.0.ffn_down.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": end_of_generation_ids(reader),
    }
    # (as llama.cpp reads them: a factor with no type is linear; older converters wrote it as rope.scale_linear)
    factor = _field(reader, f"{arch}.rope.scaling.factor") or _field(reader, f"{arch}.rope.scale_linear")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "linear" if factor not in (None, 0, 1) else "none")
    if ROPE_FACTORS in names:  # Llama 3.1+: llama.cpp's converter wrote the Llama-3 rule as a divisor per frequency
        if scaling not in ("none", None):
            raise GGUFError(f"the file has both RoPE scaling {scaling!r} and a {ROPE_FACTORS} tensor")
        factors = next(t for t in tensors if t.name == ROPE_FACTORS)
        config["rope_scaling"] = {"rope_type": "freq_factors",
                                  "factors": np.asarray(factors.data, dtype=np.float32).ravel().tolist()}
    elif scaling not in ("none", None):
        if scaling not in ("linear", "yarn"):
            raise GGUFError(f"unsupported RoPE scaling {scaling!r} in the GGUF metadata")
        config["rope_scaling"] = {"rope_type": scaling, "factor": factor or 1.0}
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


# Tokens that end a chat model's turn. A file often names the end of a text as its EOS and the end of a turn, which
# its chat template writes and the model generates, only as a control token of this name (a Qwen2 file's EOS may be
# <|endoftext|> where its turns end in <|im_end|>; an older Llama 3 file's <|end_of_text|>, not <|eot_id|>)
# chat models' end-of-turn tokens by their text (an HF tokenizer's special ones end generation too)
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>",
                      "<EOT>")
# and, in a GGUF file, as llama.cpp ends there: Qwen2.5-Coder's fill-in-the-middle tokens
END_OF_GENERATION_TOKENS = (*END_OF_TURN_TOKENS, "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
ADDED_TOKEN_TYPES = (3, 4)  # tokenizer.ggml.token_type: control, user-defined (a converter's added tokens)


def end_of_generation_ids(reader: GGUFReader) -> list[int]:
    """The ids that end generation, as llama.cpp takes them: the file's EOS, its end-of-turn and end-of-message
    tokens where it names them, and its added tokens of END_OF_GENERATION_TOKENS, whether typed control or user-defined
    (a ChatML fine-tune's <|im_end|> may be either)."""
    ids = [_field(reader, f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot", "eom")]
    tokens, types = reader.fields.get("tokenizer.ggml.tokens"), reader.fields.get("tokenizer.ggml.token_type")
    if tokens is not None and types is not None:
        for i in np.flatnonzero(np.isin(np.asarray(types.contents()), ADDED_TOKEN_TYPES)).tolist():
            if bytes(tokens.parts[tokens.data[i]]).decode("utf-8", "replace") in END_OF_GENERATION_TOKENS:
                ids.append(i)
    return list(dict.fromkeys(i for i in ids if i is not None))


def hf_name(name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _LAYER_NAME.fullmatch(name)
    if m is None or m[2] not in _LAYER_TENSORS:
        raise GGUFError(f"unexpected tensor {name!r} in a Llama-family GGUF file")
    return f"model.layers.{m[1]}.{_LAYER_TENSORS[m[2]]}.{m[3]}"


def unpermute_rows(num_rows: int, num_heads: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's converter permutation of q/k weights (it interleaves the two
    rotary halves of each head): HF row r of a head is file row 2 r for r < half, 2 (r - half) + 1 after."""
    half = num_rows // num_heads // 2
    return torch.arange(num_rows).view(num_heads, half, 2).transpose(1, 2).reshape(-1)


def _tensor(data: np.ndarray) -> torch.Tensor:
    """A tensor over the file's read-only memory map (torch warns that it is not writable: we never write it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(data))


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    path = Path(path)
    reader, parts = open_gguf(path), gguf_tensors(path)
    hf_config = read_config(reader, parts)
    tensors: dict[str, torch.Tensor | QuantizedWeight] = {}
    for t in (t for t in parts if t.name != ROPE_FACTORS):
        name = hf_name(t.name)
        qtype = QType(t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest-moving dimension first
        if qtype in FLOAT_TYPES:
            data = _tensor(t.data)
            value = data.view(torch.bfloat16) if qtype == QType.BF16 else data
            value = value.reshape(shape)
        elif qtype not in (*QUANTIZED_TYPES, *DEQUANTIZED_TYPES):
            raise UnsupportedTensorType(f"tensor {t.name} has type {qtype.name}, which gorgon cannot run; supported: "
                                        f"{', '.join(q.name for q in (*FLOAT_TYPES, *QUANTIZED_TYPES))}, and "
                                        f"dequantized at load: {', '.join(q.name for q in DEQUANTIZED_TYPES)}")
        else:
            if len(shape) != 2:
                raise GGUFError(f"quantized tensor {t.name} is not a matrix")
            value = QuantizedWeight(qtype, shape, _tensor(t.data))
        tensors[name] = value
    permuted = _field(reader, "general.architecture") in PERMUTED_QK
    for i in range(hf_config["num_hidden_layers"] if permuted else 0):  # q/k rows back in HF order
        for proj, heads in (("q_proj", hf_config["num_attention_heads"]), ("k_proj", hf_config["num_key_value_heads"])):
            for suffix in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{proj}.{suffix}"
                if name in tensors:
                    value = tensors[name]
                    order = unpermute_rows(value.shape[0], heads)
                    tensors[name] = value.rows(order) if isinstance(value, QuantizedWeight) else value[order]
    return GGUFCheckpoint(path, hf_config, tensors)


# Converted tokenizers, saved as transformers' own files (JSON, never pickles), by file
TOKENIZER_CACHE = Path.home() / ".cache" / "gorgon" / "tokenizers"


def load_tokenizer(path: str | Path):
    """transformers' tokenizer built from the file's metadata (vocabulary, merges, chat template). Building it
    takes seconds for a large vocabulary, so the result is kept in TOKENIZER_CACHE, under the file's path,
    size and modification time, and later loads read that (a cache that cannot be written is skipped)."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    path = Path(path).resolve()
    if "tokenizer.ggml.tokens" not in open_gguf(path).fields:
        raise FileNotFoundError(f"{path} has no tokenizer: its metadata holds no vocabulary (tokenizer.ggml.tokens). "
                                "Take one from an HF folder (tokenizer=...), or run without one "
                                "(skip_tokenizer_init=True: token-id prompts only)")
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    cached = TOKENIZER_CACHE / key.hexdigest()[:24]
    fresh = not (cached / "tokenizer_config.json").is_file()
    # The generic class, fresh or cached: a model's own class (Qwen2Tokenizer) would put back its default normalizer
    # over the file's, and AutoTokenizer reads the whole metadata again only to choose that class (Qwen2 vocabulary:
    # 17 s, against 1.9 s for the conversion itself)
    tokenizer = (PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name) if fresh
                 else PreTrainedTokenizerFast.from_pretrained(cached))
    _added_tokens_at_their_ids(tokenizer, open_gguf(path))  # (a no-op on a cache written since it repairs them)
    if fresh:
        try:
            TOKENIZER_CACHE.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=TOKENIZER_CACHE) as tmp:  # whole, or not at all: loads may race
                tokenizer.save_pretrained(Path(tmp) / "tokenizer")
                os.replace(Path(tmp) / "tokenizer", cached)
        except OSError:
            pass
    tokenize_as_llama_cpp(tokenizer, open_gguf(path))  # on every load: the cache holds transformers' conversion
    return tokenizer


# Pre-tokenizer names (tokenizer.ggml.pre) of Llama 3's kind of vocabulary and Mistral's tekken: llama.cpp takes a
# word that is one token of the vocabulary whole, before any merge (tokenizers' `ignore_merges`), and adds BOS
# unless the file says otherwise
WHOLE_WORD_VOCABULARIES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "tekken")


def tokenize_as_llama_cpp(tokenizer, reader: GGUFReader) -> None:
    """Make transformers' tokenizer of a GGUF file give llama.cpp's tokens, which are the model's own (llama.cpp's
    vocabulary tests, models/ggml-vocab-*.gguf.inp/.out, hold its original tokenizer's ids). transformers departs
    from them in two places: a sentencepiece vocabulary's space prefix (llama.cpp, like sentencepiece, writes
    "▁" before the text even when the text starts with a space: " Hello" is "▁", "▁Hello"; transformers' Metaspace
    writes "▁Hello"), and Llama 3's and tekken's whole-word lookup. BOS is llama.cpp's rule too: the file's
    add_bos_token, else added for a sentencepiece vocabulary and Llama 3's and tekken's, not for other BPE ones
    (transformers' own choice changed between its versions: up to 5.22 a sentencepiece vocabulary had none)."""
    from tokenizers import decoders, normalizers

    backend, vocabulary = tokenizer.backend_tokenizer, _field(reader, "tokenizer.ggml.pre")
    sentencepiece = _field(reader, "tokenizer.ggml.model") == "llama"
    if sentencepiece:
        space_prefix = _field(reader, "tokenizer.ggml.add_space_prefix", True)
        escape = normalizers.Replace(" ", "\u2581")
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), escape]) if space_prefix else escape
        backend.pre_tokenizer = None
        if not space_prefix:  # nothing to take off the front when decoding
            backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                                 decoders.Fuse()])
    if vocabulary in WHOLE_WORD_VOCABULARIES:
        backend.model.ignore_merges = True
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    tokenizer.add_bos_token = bool(add_bos) if add_bos is not None else (
        sentencepiece or vocabulary in WHOLE_WORD_VOCABULARIES)
    _chats_start_with_bos(tokenizer)


def _chats_start_with_bos(tokenizer) -> None:
    """llama.cpp starts every chat with BOS where its vocabulary adds BOS, whether the chat template writes one or
    not: it takes a BOS the text starts with off, then tokenizes the text with BOS (common/chat.cpp). Templates
    that write none are common: TinyLlama's and Zephyr's, ChatML on a Mistral. A chat through transformers holds
    only what its template writes, so such a file's template is wrapped to start its text with BOS, once."""
    template = tokenizer.chat_template
    if tokenizer.add_bos_token and tokenizer.bos_token and isinstance(template, str):
        tokenizer.chat_template = ("{% set chat %}" + template + "{% endset %}"
                                   "{{ chat if chat.startswith(bos_token) else bos_token + chat }}")


def _added_tokens_at_their_ids(tokenizer, reader: GGUFReader) -> None:
    """llama.cpp matches each control and user-defined token of the file whole, at its id. transformers leaves out of
    a byte-level vocabulary those spelled outside the byte alphabet (DeepSeek's <｜User｜>, with fullwidth bars, are
    cut into bytes) and adds the BOS/EOS strings again at new ids past the model's vocabulary: put them back."""
    tokens, types = reader.fields.get("tokenizer.ggml.tokens"), reader.fields.get("tokenizer.ggml.token_type")
    if tokens is None or types is None:
        return
    types = np.asarray(types.contents())
    file_ids: dict[str, int] = {}
    for i in np.flatnonzero(np.isin(types, ADDED_TOKEN_TYPES)).tolist():
        file_ids.setdefault(bytes(tokens.parts[tokens.data[i]]).decode("utf-8", "replace"), i)
    missing = {text: i for text, i in file_ids.items() if tokenizer.convert_tokens_to_ids(text) != i}
    if not missing:  # (the usual case: the whole tokenizer is serialised below only where one is not)
        return
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"].get("vocab")
    if not isinstance(vocab, dict):  # a sentencepiece vocabulary holds them at their ids
        return
    taken = {i: text for text, i in vocab.items() if i in missing.values()}  # their bytes' spelling, unreachable
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] not in missing]
    for text, i in missing.items():
        vocab.pop(taken.get(i), None)
        vocab[text] = i
        state["added_tokens"].append({"id": i, "content": text, "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": bool(types[i] == 3)})
    for processor in [state["post_processor"] or {}, *(state["post_processor"] or {}).get("processors", [])]:
        for text, special in processor.get("special_tokens", {}).items():  # the BOS it adds
            if text in missing:
                special["ids"] = [missing[text]]
    from tokenizers import Tokenizer

    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))


__all__ = ["GGUFCheckpoint", "GGUFError", "UnsupportedTensorType", "find_gguf", "gguf_tensors", "load_tokenizer",
           "read_gguf"]
