"""`gorgon serve` (== `python -m server`): the OpenAI-compatible HTTP API over one model."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from engine import LLM
from server.app import ServerConfig, create_app

DEFAULT_MODEL_NAME = "gorgon-default"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon serve", description="Serve the OpenAI-compatible HTTP API.")
    parser.add_argument("--model", default=None, help="HF checkpoint folder (default: the shipped model)")
    parser.add_argument("--served-model-name", default=None,
                        help=f"the base model's id in the API (default: the folder's name, or {DEFAULT_MODEL_NAME})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--medusa", default=None, help="Medusa heads folder (speculative decoding)")
    parser.add_argument("--medusa-tree", default=None, help="Medusa tree: a shipped tree's name or a JSON file")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="load a LoRA or prefix-tuning adapter at startup (repeatable)")
    parser.add_argument("--adapter-root", default=None,
                        help="adapters load only from inside this folder (default: <model>/adapters)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20, help="request body size limit")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish on shutdown before they are aborted")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    adapters = {}
    for spec in args.adapter:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            sys.exit(f"gorgon serve: error: --adapter takes NAME=DIR, got {spec!r}")
        adapters[name] = folder
    engine_kwargs = {"device": args.device, "dtype": args.dtype, "max_num_seqs": args.max_num_seqs,
                     "max_model_len": args.max_model_len, "adapter_root": args.adapter_root}
    if args.medusa:
        engine_kwargs |= {"medusa": args.medusa, "medusa_tree": args.medusa_tree}
    try:
        llm = LLM(args.model, **engine_kwargs)
        for name, folder in adapters.items():
            llm.load_adapter(name, folder)
    except (ValueError, OSError) as e:
        sys.exit(f"gorgon serve: error: {e}")
    model_name = args.served_model_name or (Path(args.model).name if args.model else DEFAULT_MODEL_NAME)
    config = ServerConfig(model_name=model_name, model_root=str(Path(args.model).resolve()) if args.model else
                          DEFAULT_MODEL_NAME, api_key=args.api_key, max_request_bytes=args.max_request_bytes)
    uvicorn.run(create_app(llm, config), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)


if __name__ == "__main__":
    main()
