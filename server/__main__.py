"""`gorgon serve` (== `python -m server`): the OpenAI-compatible HTTP API over one model."""
from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from pathlib import Path

from engine import LLM, EngineConfig
from engine.config import available_memory
from engine.parallel import run_worker_if_launched
from engine.parallel.group import launched_rank
from server.app import Server, ServerConfig, create_app
from server.async_engine import in_passing_thread
from server.flags import (
    add_batch_invariant_flag,
    add_chat_template_flag,
    add_device_flags,
    add_dtype_flags,
    add_generation_config_flag,
    add_medusa_flags,
    add_model_flags,
    add_tensor_parallel_flag,
    positive_int,
    set_threads,
    shared_engine_kwargs,
)
from server.guards import is_loopback
from server.reasoning import REASONING_FORMATS

DEFAULT_MODEL_NAME = "gorgon-default"
API_KEY_ENV = "GORGON_API_KEY"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1000000' -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MB, 1000000)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"the size must be positive, got {text!r}")
    return size


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction is in (0, 1], got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    return value


def ranks_sharing_memory(device: str, tensor_parallel_size: int) -> int:
    """How many of the engine's ranks keep a KV cache in the memory available_memory measured: on CPU, every
    rank this process spawns (one host), or those torchrun started on this host; on CUDA, one (a GPU each)."""
    if device.startswith("cuda"):
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launched_rank() is not None else tensor_parallel_size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon serve", description="Serve the OpenAI-compatible HTTP API.")
    add_model_flags(parser)
    parser.add_argument("--served-model-name", default=None,
                        help=f"the base model's id in the API (default: the folder's name, or {DEFAULT_MODEL_NAME})")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=port, default=8000, help="the port to listen on (default: %(default)s)")
    add_medusa_flags(parser)
    add_chat_template_flag(parser)
    add_generation_config_flag(parser)
    parser.add_argument("--skip-tokenizer-init", action="store_true",
                        help="run without a tokenizer: token-id prompts only, answers carry token ids and no text")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="load a LoRA or prefix-tuning adapter at startup (repeatable)")
    parser.add_argument("--adapter-root", default=None,
                        help="adapters load only from inside this folder (default: <model>/adapters, beside a .gguf "
                             "file)")
    parser.add_argument("--max-lora-rank", type=positive_int, default=None,
                        help="the largest LoRA rank an adapter may have (default: the engine's, 16)")
    parser.add_argument("--max-loras", type=positive_int, default=None,
                        help="adapters loaded at once (default: the engine's, 8); loading one more unloads the least "
                             "recently used idle one")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on every route but /health, /ping, /version, "
                             f"/metrics and the playground's page (default: ${API_KEY_ENV}, if set)")
    add_device_flags(parser)
    add_dtype_flags(parser)
    add_tensor_parallel_flag(parser)
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=positive_int, default=64,
                        help="requests decoded together (default: %(default)s)")
    engine.add_argument("--max-model-len", type=positive_int, default=None,
                        help="the longest prompt plus answer a request may have (default: the model's context, or "
                             "less where the KV cache holds less)")
    engine.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                        help="tokens per step (longer prompts are prefilled in chunks; default: the engine's)")
    engine.add_argument("--block-size", type=positive_int, default=None,
                        help="tokens per KV cache block (default: the engine's)")
    engine.add_argument("--attention-backend", default=None,
                        help="auto (default: the fastest on the device), reference, flash, cpu or triton")
    engine.add_argument("--no-prefix-caching", action="store_true", help="do not share KV blocks of common prefixes")
    add_batch_invariant_flag(engine)
    kv = engine.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-memory", type=parse_bytes, default=None, metavar="SIZE",
                    help="bytes for the KV cache, e.g. 2GiB (default: the engine's, 1 GiB), at most what "
                         "--max-num-seqs sequences of --max-model-len tokens take")
    kv.add_argument("--kv-cache-fraction", type=fraction, default=None, metavar="F",
                    help="this fraction of the device's memory available at startup, before the model loads (on "
                         "CPU, shared by the tensor-parallel ranks on this host)")
    kv.add_argument("--num-kv-blocks", type=positive_int, default=None, help="KV cache blocks")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--max-waiting-requests", type=non_negative_int, default=None, metavar="N",
                      help="requests queued beyond the running batch; more get a 429 with Retry-After "
                           "(default: no limit)")
    http.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_FORMATS),
                      help="split chat answers' reasoning (up to </think>) into the message's reasoning_content, "
                           "as vLLM's flag: deepseek_r1 (DeepSeek-R1 and its distills, whose prompt opens the "
                           "reasoning), qwen3 (answers that open with <think>)")
    http.add_argument("--cors-origins", nargs="+", default=[], metavar="ORIGIN",
                      help="browser origins allowed to call the API ('*': any)")
    http.add_argument("--max-request-bytes", type=positive_int, default=1 << 20, help="request body size limit")
    http.add_argument("--shutdown-timeout", type=float, default=30.0,
                      help="seconds in-flight requests get to finish on shutdown before they are aborted")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="(default: %(default)s)")
    return parser.parse_args(argv)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig fields from the flags; a flag left out keeps the engine's default."""
    kwargs = shared_engine_kwargs(args) | {
        "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len, "adapter_root": args.adapter_root,
        "enable_prefix_caching": not args.no_prefix_caching, "skip_tokenizer_init": args.skip_tokenizer_init}
    optional = {"max_num_batched_tokens": args.max_num_batched_tokens, "block_size": args.block_size,
                "attention_backend": args.attention_backend, "num_kv_blocks": args.num_kv_blocks,
                "kv_cache_memory": args.kv_cache_memory, "max_lora_rank": args.max_lora_rank,
                "max_adapters": args.max_loras}
    if args.kv_cache_fraction is not None:
        free = available_memory(args.device)
        if free is None:
            raise ValueError("--kv-cache-fraction: this OS does not tell how much memory is free; give "
                             "--kv-cache-memory instead")
        optional["kv_cache_memory"] = int(args.kv_cache_fraction * free
                                          // ranks_sharing_memory(args.device, args.tensor_parallel_size))
    return kwargs | {name: value for name, value in optional.items() if value is not None}


def load_engine(model: str | None, kwargs: dict, adapters: dict[str, str]) -> LLM:
    llm = LLM(model, **kwargs)
    for name, folder in adapters.items():
        llm.load_adapter(name, folder)
    return llm


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in [0, 65535], got {text!r}")
    return value


def check_address(host: str, port: int) -> None:
    """Fail now, not after minutes of loading, where the address cannot be listened on (a port in use)."""
    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    adapters = {}
    for spec in args.adapter:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            sys.exit(f"gorgon serve: error: --adapter takes NAME=DIR, got {spec!r}")
        adapters[name] = folder
    set_threads(args)
    try:
        kwargs = engine_kwargs(args)
        if run_worker_if_launched(EngineConfig(args.model, **kwargs)):  # a torchrun rank above 0
            return
        check_address(args.host, args.port)
        llm = in_passing_thread(load_engine, args.model, kwargs, adapters)
    except (ValueError, OSError) as e:
        sys.exit(f"gorgon serve: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C while the model loads: at once (exiting would wait for the loading thread)
        os._exit(130)
    model_name = args.served_model_name or (Path(args.model).name if args.model else DEFAULT_MODEL_NAME)
    # a path is reported resolved; a named model (smollm2) or the default by its name
    model_root = str(Path(args.model).resolve()) if args.model and Path(args.model).exists() else (
        args.model or DEFAULT_MODEL_NAME)
    log = logging.getLogger("gorgon")
    log.info("serving %s as %r: %s activations, a context of %d tokens, %d KV blocks of %d tokens, speculation: %s",
             model_root, model_name, llm.config.dtype, llm.max_model_len, llm.block_manager.num_blocks,
             llm.config.block_size, llm.config.medusa or "off")
    if llm.sampling_defaults:  # (as vLLM says so: a request's defaults differ from the API's)
        log.warning("requests that leave them out sample with the model's recommended %s (--generation-config none: "
                    "the API's defaults)", llm.sampling_defaults)
    config = ServerConfig(model_name=model_name, model_root=model_root, api_key=args.api_key or None,
                          max_request_bytes=args.max_request_bytes, max_waiting_requests=args.max_waiting_requests,
                          cors_origins=args.cors_origins, reasoning_parser=args.reasoning_parser,
                          loopback_hosts_only=is_loopback(args.host) and not args.api_key)
    try:
        Server(create_app(llm, config), args.shutdown_timeout, host=args.host, port=args.port,
               log_level=args.log_level).run()
    finally:
        llm.close()


if __name__ == "__main__":
    main()
