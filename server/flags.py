"""Flags that `gorgon serve` and `gorgon generate` share."""
from __future__ import annotations

import argparse
import codecs
import json
import re
from pathlib import Path

import torch

from engine import own_medusa_heads
from engine.training.common import positive_int  # (the training commands' flags take it too)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF checkpoint folder, a .gguf file or a folder holding one, or a named model such as "
                             "smollm2 (default: the shipped model)")
    parser.add_argument("--quantization", default=None, choices=["int8", "int4"],
                        help="quantize an HF checkpoint's linear layers as it loads (a GGUF file's: those it "
                             "stores in float or in types without kernels, such as IQ3_S)")
    parser.add_argument("--dequantize", action="store_true",
                        help="dequantize a GGUF file's quantized weights into --dtype as it loads: throughput for "
                             "large batches, where the quantized kernels stop at 32 rows (SmolLM2 Q4_1 in bf16, 64 "
                             "sequences, 2 cores: 420 -> 1076 tokens/s), at 2-4x the weights' memory and a slower "
                             "batch 1")
    parser.add_argument("--tokenizer", default=None, help="take the tokenizer from this folder (default: the model's)")


def add_medusa_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--medusa", default=None,
                        help="Medusa heads folder (speculative decoding), 'auto' (the model's own), 'lookup' (no "
                             "heads: prompt-lookup drafts alone, for any model), 'prediction' (drafts only from "
                             "requests' predicted outputs) or 'none' (default: on the CPU, the model's own heads when "
                             "it has some, as the shipped model does, else 'prediction'; elsewhere none)")
    parser.add_argument("--medusa-tree", default=None, help="Medusa tree: a shipped tree's name or a JSON file")
    parser.add_argument("--medusa-max-batch-size", type=int, default=None, metavar="N",
                        help="speculate only while at most N sequences decode together, plain decoding above (default: "
                             "the limit train-medusa measured for the heads' tree; 1 for 'lookup' and 'prediction')")
    parser.add_argument("--medusa-acceptance", default=None, choices=["rejection", "typical"],
                        help="how sampled requests accept drafts: rejection (the default) keeps plain sampling's "
                             "distribution exactly; typical accepts more, and trades that exactness for it")
    parser.add_argument("--medusa-posterior-threshold", type=float, default=None,
                        help="typical acceptance: accept when p > min(threshold, alpha * exp(-entropy))")
    parser.add_argument("--medusa-posterior-alpha", type=float, default=None, help="typical acceptance's alpha")
    parser.add_argument("--medusa-ngram-tokens", type=int, default=None, metavar="N",
                        help="where a sequence's last 3 (else 2) tokens occurred in it before, verify the tokens "
                             "that followed them in place of the heads' tree, as many as it drafts, at most N "
                             "(prompt lookup; default: up to 8, and 4 with --medusa lookup; 0: off)")


def medusa_options(args: argparse.Namespace) -> dict:
    """EngineConfig's Medusa fields from add_medusa_flags' flags (left out: the defaults; none with --medusa none)."""
    medusa = args.medusa
    # the model's own heads by default on the CPU, else drafts from predicted outputs alone (which leave requests
    # without one as they were); on CUDA plain decode steps replay graphs and tree steps run eagerly, so
    # speculating there is slower (an H200, the shipped model: 0.51x at batch 1)
    if medusa is None and args.device == "cpu":
        medusa = "auto" if own_medusa_heads(args.model).is_dir() else "prediction"
    if medusa in (None, "none"):
        return {}
    fields = {"medusa": medusa, "medusa_tree": args.medusa_tree, "medusa_max_batch_size": args.medusa_max_batch_size,
              "medusa_acceptance": args.medusa_acceptance,
              "medusa_posterior_threshold": args.medusa_posterior_threshold,
              "medusa_posterior_alpha": args.medusa_posterior_alpha, "medusa_ngram_tokens": args.medusa_ngram_tokens}
    return {name: value for name, value in fields.items() if value is not None}


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's); N tensor-parallel ranks on this host take 1/N each")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="on CUDA, run every step eagerly (default: decode steps replay captured CUDA graphs)")


def device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"a device is cpu, cuda or cuda:N, got {text!r}")
    return text


def set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def add_dtype_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA; on the CPU the checkpoint's own if bfloat16, else "
                             "float32 (an fp16 checkpoint's matrices kept in fp16)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the KV cache's dtype; auto (default): the model's, but float16 for GGUF files and "
                             "quantized weights, as llama.cpp keeps it (half the bytes, faster long contexts); "
                             "float32 keeps a float32 model's cache exact")


def add_batch_invariant_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                        help="a request's tokens never depend on what else is batched with it; default: on where "
                             "that costs at most 5%% (AVX-512 VNNI CPUs without AMX; AVX2 ones with packed quantized "
                             "weights; README)")


def add_tensor_parallel_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="split the model over N processes (README: Tensor parallelism): on one host they are "
                             "started here; across hosts, start each with torchrun and the same command line")


def add_generation_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generation-config", default="auto", choices=["auto", "none"],
                        help="auto: sampling parameters a request leaves out take the values the model recommends "
                             "(its generation_config.json, or a GGUF's general.sampling.* keys), as vLLM and "
                             "llama.cpp take them; none: they are ignored (serve: the API's defaults, temperature 1 "
                             "and no filters; generate: its own)")


def add_chat_template_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chat-template", type=chat_template, default=None,
                        help="a Jinja chat template in place of the tokenizer's own: a file, or the template itself "
                             "(as vLLM's flag)")
    parser.add_argument("--default-chat-template-kwargs", type=json_object, default=None, metavar="JSON",
                        help="the chat template's variables where a request sets none of its own, e.g. "
                             "'{\"enable_thinking\": false}' for Qwen3 (as vLLM's flag)")


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text!r}")
    return value


def chat_template(value: str) -> str:
    """--chat-template's template: the file it names, else the value itself where it is one (as vLLM tells them
    apart: a template has braces or line breaks; anything else is a path, which must exist)."""
    if not Path(value).is_file() and any(c in value for c in "{}\n"):
        # (as vLLM: a "\n" typed in a shell is a line break; only in ASCII text, which the codec reads as Latin-1)
        return codecs.decode(value, "unicode_escape") if value.isascii() else value
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value} (nor a template: it has no {{ }})")
    return Path(value).read_text()


def shared_engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig fields from the flags serve and generate share; a flag left out keeps the engine's default."""
    fields = {"device": args.device, "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
              "quantization": args.quantization, "dequantize": args.dequantize, "tokenizer": args.tokenizer,
              "chat_template": args.chat_template,
              "chat_template_kwargs": args.default_chat_template_kwargs, "batch_invariant": args.batch_invariant,
              "tensor_parallel_size": args.tensor_parallel_size, "cuda_graphs": not args.enforce_eager,
              "generation_config": args.generation_config, **medusa_options(args)}
    return {name: value for name, value in fields.items() if value is not None}
