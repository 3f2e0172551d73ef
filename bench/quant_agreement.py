"""How often gorgon's quantized decode kernels (int8 activations per block), over its default KV cache (fp16 for
quantized weights), pick the same greedy tokens as the exact path over the same weights (dequantized tiles, fp32,
an fp32 cache): a few chat prompts, token by token.

    python -m bench.quant_agreement --model SmolLM2-135M-Instruct.Q4_1.gguf --out out/agreement.json

A request's tokens agree up to its first difference; after one, the two continue from different texts,
so the report counts the common prefix of each request."""
from __future__ import annotations

import argparse

from bench.common import add_out_flag, write_json
from engine import LLM, SamplingParams
from engine.prompt_files import chat_prompt_ids

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a hash table is.",
           "Give three tips for learning to cook.", "What is 17 times 23?", "Translate 'good morning' into Spanish.",
           "Why is the sky blue?", "Write a Python function that reverses a string.",
           "Name the planets of the solar system.", "What does a CPU cache do?"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .gguf file, or an HF folder with --quantization")
    parser.add_argument("--quantization", choices=["int8", "int4"], default=None)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the engine's (on: prefill takes int8 activations too, as decode does)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the kernels' side's cache (the exact side: float32)")
    add_out_flag(parser, "quant_agreement")
    args = parser.parse_args(argv)
    greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    outputs = []
    for cpu_kernels in (True, False):
        cache = args.kv_cache_dtype if cpu_kernels else "float32"
        llm = LLM(args.model, quantization=args.quantization, cpu_kernels=cpu_kernels, enable_prefix_caching=False,
                  batch_invariant=args.batch_invariant, kv_cache_dtype=cache)
        chats = [chat_prompt_ids(llm.tokenizer, p) for p in PROMPTS]
        # one request at a time: the exact path's batch would otherwise change with the kernels' row limit
        outputs.append([llm.generate(chat, greedy)[0].token_ids for chat in chats])
    prefixes = []
    for ours, exact in zip(*outputs):
        prefixes.append(next((i for i, (a, b) in enumerate(zip(ours, exact)) if a != b), len(exact)))
    total = len(PROMPTS) * args.new_tokens
    print(f"{args.model}: {sum(prefixes)}/{total} greedy tokens agree before the first difference; "
          f"{sum(p == args.new_tokens for p in prefixes)}/{len(PROMPTS)} requests agree throughout; "
          f"common prefixes {prefixes}")
    write_json(args.out, {"benchmark": "quant_agreement", "model": args.model, "quantization": args.quantization,
                          "kv_cache_dtype": args.kv_cache_dtype,
                          "new_tokens": args.new_tokens, "prompts": PROMPTS, "common_prefix": prefixes,
                          "summary": {"agreeing_tokens": sum(prefixes), "tokens": total,
                                      "requests_agreeing_throughout": sum(p == args.new_tokens for p in prefixes)}})


if __name__ == "__main__":
    main()
