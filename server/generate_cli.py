"""`gorgon generate`: one prompt in, its continuation (or with --chat, the model's answer) out, streamed or as one
JSON object."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from itertools import chain
from pathlib import Path

from engine import LLM, SAMPLING_FIELDS, EngineConfig, SamplingParams
from engine.medusa.speculator import PREDICTION_ONLY
from engine.parallel import run_worker_if_launched
from engine.prompt_files import chat_prompt_ids
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

# the sampling of a model that recommends none: gentler than the API's temperature 1
CLI_SAMPLING = {"temperature": 0.6, "top_k": 40}
MAX_TOKENS = 128  # a continuation's (a chat answer runs to the end of its turn)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon generate", description="Generate a continuation of a prompt.")
    add_model_flags(parser)
    parser.add_argument("--prompt", default="def fibonacci(n):", help="text to continue (default: %(default)r)")
    parser.add_argument("--chat", action="store_true",
                        help="answer the prompt as a user's message, through the model's chat template (the answer "
                             "ends at the model's end of turn)")
    parser.add_argument("--max-tokens", type=positive_int, default=None,
                        help=f"the most tokens to generate (default: {MAX_TOKENS}; with --chat, up to the end of the "
                             "answer's turn, or of the context)")
    # left out: the model's recommended value (--generation-config), else CLI_SAMPLING's
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's, else 0.6)")
    parser.add_argument("--top-p", type=float, default=None, help="(default: the model's, else 1: off)")
    parser.add_argument("--top-k", type=int, default=None, help="0 = no top-k filter (default: the model's, else 40)")
    parser.add_argument("--min-p", type=float, default=None, help="(default: the model's, else 0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="(default: the model's, else 1: off)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--prediction", default=None,
                        help="the output predicted (OpenAI's predicted outputs), or @FILE: drafted where the output "
                             "follows it, verified like any draft (by the default --medusa, or any but none)")
    add_device_flags(parser)
    add_dtype_flags(parser)
    add_medusa_flags(parser)
    add_chat_template_flag(parser)
    add_generation_config_flag(parser)
    add_batch_invariant_flag(parser)
    add_tensor_parallel_flag(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args)
    try:
        prediction = read_prediction(args.prediction)
        if prediction is not None and args.medusa is None and args.device != "cpu":
            args.medusa = PREDICTION_ONLY  # drafting is off by default there; a prediction asks for it
        engine_kwargs = shared_engine_kwargs(args)
        if run_worker_if_launched(EngineConfig(args.model, **engine_kwargs)):  # a torchrun rank above 0
            return
        with LLM(args.model, **engine_kwargs) as llm:
            given = {name: getattr(args, name) for name in SAMPLING_FIELDS if getattr(args, name) is not None}
            params = SamplingParams(max_tokens=args.max_tokens or MAX_TOKENS, seed=args.seed, stop=args.stop,
                                    ignore_eos=args.ignore_eos, **CLI_SAMPLING | llm.sampling_defaults | given)
            if prediction is not None:
                params = replace(params, prediction=llm.tokenizer(prediction, add_special_tokens=False)["input_ids"])
            generate(llm, args, params)
    except (ValueError, OSError) as e:
        sys.exit(f"gorgon generate: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: what was generated stays on screen, no traceback
        print(file=sys.stderr)
        sys.exit(130)


def read_prediction(value: str | None) -> str | None:
    """--prediction's text: the value, or the contents of the file @FILE names."""
    if value is None or not value.startswith("@"):
        return value
    return Path(value[1:]).read_text()


def generate(llm: LLM, args: argparse.Namespace, params: SamplingParams) -> None:
    """Print the continuation (after the prompt) or the chat answer: streamed text (and a summary on stderr), or
    one JSON object."""
    if args.chat and not llm.tokenizer.chat_template:
        raise ValueError("--chat needs a chat model: this model's tokenizer has no chat template")
    prompt = chat_prompt_ids(llm.tokenizer, args.prompt, llm.config.chat_template_kwargs) if args.chat else args.prompt
    if args.chat and args.max_tokens is None:  # an answer ends its turn, not mid-sentence
        params = replace(params, max_tokens=max(llm.max_model_len - len(prompt), 1))
    if args.json:
        out = llm.generate(prompt, params)[0]
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "tokens_per_s": round(out.tokens_per_s, 2), "accepted_lengths": out.accepted_lengths}))
        return
    stream = llm.stream(prompt, params)
    first = next(stream)  # the request is taken (or refused: a prompt too long) before anything is printed
    if not args.chat:
        sys.stdout.write(args.prompt)
    for out in chain([first], stream):
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    steps = out.accepted_lengths
    speculation = f", {sum(steps) / len(steps):.2f} tokens per Medusa step" if steps else ""
    print(f"[{len(out.token_ids)} tokens, {out.tokens_per_s:.1f} tokens/s{speculation}, "
          f"finish_reason={out.finish_reason}]", file=sys.stderr)
