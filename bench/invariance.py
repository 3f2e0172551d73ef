"""`gorgon bench invariance`: what batch invariance costs. The same model loaded twice, batch_invariant on
and off, each measurement interleaved (off, on) `--repeats` times in one run: prefill of a 512-token prompt
(shorter where the context is), batch-1 decode, batch-8 decode, and a chat-sized request (a 200-token prompt,
then 128 new tokens; its tok/s counts the new ones). Reports the time ratio invariant / plain per
test (above 1: invariance costs) and whether the greedy tokens agree, with the CPU's instruction sets.

Run: gorgon bench invariance --model X.gguf|DIR [--dtype D] [--threads 1] --out out/invariance.json"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import CONFIGS, add_out_flag, cpu_isa, machine_info, print_table, random_checkpoint, write_json
from engine import LLM, SamplingParams

PREFILL_LEN, DECODE_PROMPT_LEN = 512, 16
REQUEST_PROMPT_LEN, REQUEST_NEW_TOKENS = 200, 128


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon bench invariance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="HF checkpoint folder or .gguf file (default: the shipped default model)")
    source.add_argument("--config", choices=sorted(CONFIGS), help="random weights of this shape")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: gorgon's (bfloat16 for bf16 checkpoints, else float32)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads; 1 is steadier on a shared machine")
    add_out_flag(parser, "invariance")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.config:
            run(args, random_checkpoint(args.config, args.dtype or "float32", Path(tmp)),
                f"random weights, {args.config} shape")
        else:
            run(args, args.model, args.model or "the default model")


def run(args: argparse.Namespace, model: str | Path | None, source: str) -> None:
    n = args.new_tokens
    engines = {mode: LLM(model, dtype=args.dtype, batch_invariant=mode == "invariant", enable_prefix_caching=False,
                         max_num_seqs=8, max_num_batched_tokens=max(2048, PREFILL_LEN))
               for mode in ("plain", "invariant")}
    vocab = engines["plain"].model.config.vocab_size
    prefill_len = min(PREFILL_LEN, engines["plain"].max_model_len - 1)
    gen = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(3, vocab, (prefill_len,), generator=gen).tolist()
    prompts = torch.randint(3, vocab, (8, DECODE_PROMPT_LEN), generator=gen).tolist()
    request_len = min(REQUEST_PROMPT_LEN, engines["plain"].max_model_len - REQUEST_NEW_TOKENS)
    request = torch.randint(3, vocab, (request_len,), generator=gen).tolist()
    greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    tests = {  # test -> (prompts, params, tokens it generates)
        f"prefill_{prefill_len}": ([long_prompt], SamplingParams(max_tokens=1, temperature=0), prefill_len),
        "decode_bs1": (prompts[:1], greedy, n),
        "decode_bs8": (prompts, greedy, 8 * n),
        f"request_{request_len}": ([request], replace(greedy, max_tokens=REQUEST_NEW_TOKENS), REQUEST_NEW_TOKENS),
    }
    times: dict[tuple[str, str], list[float]] = {}
    tokens: dict[tuple[str, str], list[list[int]]] = {}
    with tqdm(total=(args.repeats + 1) * len(tests) * 2, desc="bench invariance") as bar:
        for repeat in range(args.repeats + 1):  # the first round warms up
            for test, (batch, params, _) in tests.items():
                for mode, llm in engines.items():
                    start = time.perf_counter()
                    outputs = llm.generate(batch, params)
                    if repeat:
                        times.setdefault((test, mode), []).append(time.perf_counter() - start)
                    tokens[(test, mode)] = [o.token_ids for o in outputs]
                    bar.update()
    rows = []
    for test, (_, _, count) in tests.items():
        plain, invariant = (statistics.median(times[(test, m)]) for m in ("plain", "invariant"))
        rows.append({"test": test, "plain tok/s": count / plain, "invariant tok/s": count / invariant,
                     "invariant / plain time": invariant / plain,
                     "same tokens": tokens[(test, "plain")] == tokens[(test, "invariant")]})
    dtype, isa = engines["plain"].config.dtype, cpu_isa()
    print(f"\n{source}, {dtype}, {torch.get_num_threads()} thread(s), medians of {args.repeats} interleaved runs; "
          f"CPU: {isa}")
    print_table(rows, ["test", "plain tok/s", "invariant tok/s", "invariant / plain time", "same tokens"])
    write_json(args.out, {
        "benchmark": "invariance", "model": source, "dtype": dtype, "new_tokens": n, "cpu_isa": isa,
        "machine": machine_info(), "rows": rows,
        "summary": {f"invariance_cost_{r['test']}": r["invariant / plain time"] for r in rows},
    })
