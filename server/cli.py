"""The `gorgon` command. Each subcommand lives in its own module, which parses its own arguments."""
from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module, one-line help); the module's main(argv) does the work
COMMANDS = {
    "generate": ("server.generate_cli", "generate text from a prompt"),
    "serve": ("server.__main__", "serve the OpenAI-compatible HTTP API"),
    "train-default": ("engine.training.default_model", "retrain the shipped default model"),
    "train-medusa": ("engine.training.medusa", "train Medusa heads on a frozen base model"),
    "train-adapters": ("engine.training.adapters", "train the example LoRA and prefix adapters with PEFT"),
}
# `gorgon bench NAME` runs bench/NAME.py
BENCHMARKS = ("decode", "attention", "medusa", "prediction", "adapters", "serving", "invariance")
# optional dependencies -> the extra of pyproject.toml that installs them
EXTRAS = {"peft": "train"}


def _usage() -> str:
    lines = ["usage: gorgon COMMAND [--help] [ARGS...]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append(f"  {'bench NAME':<14} run a benchmark: {', '.join(BENCHMARKS)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    # nothing is downloaded at run time: a checkpoint is a local folder or file (a mistyped one is an error now,
    # not a minute of retries against huggingface.co); HF_HUB_OFFLINE=0 in the environment says otherwise
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command, rest = argv[0], argv[1:]
    if command == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            sys.exit(f"usage: gorgon bench {{{','.join(BENCHMARKS)}}} [--help]")
        module, rest = f"bench.{rest[0]}", rest[1:]
    elif command in COMMANDS:
        module = COMMANDS[command][0]
    else:
        sys.exit(f"gorgon: unknown command {command!r}\n\n{_usage()}")
    try:
        command_module = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name not in EXTRAS:
            raise
        sys.exit(f"gorgon {command}: needs {e.name}, which a plain install lacks: "
                 f"pip install -e '.[{EXTRAS[e.name]}]' in gorgon's checkout (or pip install {e.name})")
    command_module.main(rest)


if __name__ == "__main__":
    main()
