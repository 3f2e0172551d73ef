"""`gorgon bench prediction`: what a predicted output (OpenAI's Predicted Outputs) buys. Three arms, greedy, batch 1,
interleaved `--repeats` times in one run on one engine: plain decoding, the engine's own speculation (its heads
and prompt lookup), and the same with the prediction. Two kinds of request:
- `again`: a question asked again, its earlier answer sent as the prediction (where an answer is regenerated);
- `edit`: code in the prompt to rewrite with a rename, the code as the prediction (where prompt lookup already
  finds most of it).
Every arm must give plain decoding's tokens. Reports tokens/s and tokens per step, each arm against plain.

Run: gorgon bench prediction --model smollm2 [--medusa auto|lookup|DIR] [--threads 2] --out out/prediction.json"""
from __future__ import annotations

import argparse
import inspect
import textwrap
import time
from pathlib import Path

import torch
from tqdm import tqdm

import models
from bench.common import add_out_flag, cpu_isa, machine_info, print_table, write_json
from bench.medusa import load_prompts
from engine import LLM, RequestOutput, SamplingParams
from engine.prompt_files import chat_prompt_ids
from models.named import resolve_model
from server.flags import positive_int

# code to edit: stdlib functions, so that every machine has the same text
EDITED_CODE = ("difflib:SequenceMatcher.find_longest_match", "textwrap:TextWrapper._split",
               "json.encoder:JSONEncoder.iterencode")
EDIT_REQUEST = "Rewrite this Python code exactly, but rename the variable `self` to `this`. Reply with the code only."
ARMS = ("plain", "speculative", "prediction")


# SmolLM2's held-out everyday questions, shipped with its heads (wherever gorgon runs from)
DEFAULT_PROMPTS = Path(models.__file__).parent / "smollm2" / "general_prompts.jsonl"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon bench prediction", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a named model (smollm2), an HF folder or a .gguf")
    parser.add_argument("--medusa", default="auto", help="the engine's speculation: auto (the model's heads), "
                                                          "lookup (prompt lookup alone) or a heads folder")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                        help="`again` questions: as `gorgon bench medusa --prompts` takes them (a .jsonl file of "
                             "{'prompt': ...} or {'messages': [...]} records, or a text file of one per line)")
    parser.add_argument("--num-prompts", type=positive_int, default=3, help="`again` questions (the `edit` ones: 3)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per arm; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; 1 is steadier on a shared machine")
    add_out_flag(parser, "prediction")
    return parser.parse_args(argv)


def code_of(name: str) -> str:
    module, qualname = name.split(":")
    obj = __import__(module, fromlist=["_"])
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return textwrap.dedent(inspect.getsource(obj))[:1500]


def edit_request(llm: LLM, code: str, max_tokens: int) -> tuple[str, list[int], str]:
    """The `edit` request for this code, its last lines left out where the prompt and answer would not fit the
    model's context."""
    lines = code.splitlines(keepends=True)
    while True:
        code = "".join(lines)
        prompt = chat_prompt_ids(llm.tokenizer, f"{EDIT_REQUEST}\n\n```python\n{code}```")
        if len(prompt) + max_tokens <= llm.max_model_len or len(lines) == 1:
            return "edit", prompt, code
        lines.pop()


def steps(out: RequestOutput) -> int:
    """Forward passes that made it: a plain step emits one token, a speculative one len(accepted)."""
    return len(out.token_ids) - sum(out.accepted_lengths) + len(out.accepted_lengths)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    try:
        # no prefix cache: every arm prefills its prompt alike, so that greedy tokens can be compared exactly
        llm = LLM(model, medusa=args.medusa, enable_prefix_caching=False)
        questions = load_prompts(args.prompts, llm.tokenizer, args.num_prompts, llm.max_model_len - args.max_tokens)
    except (ValueError, OSError) as e:
        raise SystemExit(f"gorgon bench prediction: error: {e}") from None
    requests = [("again", q, None) for q in questions]
    requests += [edit_request(llm, code_of(name), args.max_tokens) for name in EDITED_CODE]
    greedy = dict(max_tokens=args.max_tokens, temperature=0)
    llm.generate([requests[0][1]], SamplingParams(max_tokens=8, temperature=0))  # warm-up
    rows = []
    with tqdm(total=len(requests) * (1 + len(ARMS) * args.repeats), desc="bench prediction") as bar:
        for kind, prompt, code in requests:
            plain = llm.generate([prompt], SamplingParams(**greedy, use_medusa=False))[0]
            bar.update()
            text = code if code is not None else llm.tokenizer.decode(plain.token_ids, skip_special_tokens=True)
            prediction = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
            params = {"plain": SamplingParams(**greedy, use_medusa=False), "speculative": SamplingParams(**greedy),
                      "prediction": SamplingParams(**greedy, prediction=prediction)}
            seconds, outputs = {arm: float("inf") for arm in ARMS}, {}
            for _ in range(args.repeats):
                for arm in ARMS:
                    start = time.perf_counter()
                    outputs[arm] = llm.generate([prompt], params[arm])[0]
                    seconds[arm] = min(seconds[arm], time.perf_counter() - start)
                    bar.update()
            row = {"kind": kind, "tokens": len(plain.token_ids), "prediction_tokens": len(prediction),
                   "lossless": all(outputs[arm].token_ids == plain.token_ids for arm in ARMS)}
            for arm in ARMS:
                row[f"{arm}_tok_s"] = len(plain.token_ids) / seconds[arm]
                row[f"{arm}_tokens_per_step"] = len(plain.token_ids) / steps(outputs[arm])
            rows.append(row)
    summary = {"cpu_isa": cpu_isa(), "lossless": all(r["lossless"] for r in rows)}
    for kind in ("again", "edit"):
        of_kind = [r for r in rows if r["kind"] == kind]
        tokens = sum(r["tokens"] for r in of_kind)
        speed = {arm: tokens / sum(r["tokens"] / r[f"{arm}_tok_s"] for r in of_kind) for arm in ARMS}
        for arm in ARMS[1:]:
            summary[f"{kind}_{arm}_vs_plain"] = round(speed[arm] / speed["plain"], 3)
        summary[f"{kind}_prediction_tokens_per_step"] = round(tokens / sum(r["tokens"] / r["prediction_tokens_per_step"]
                                                                            for r in of_kind), 3)
    print_table(rows, ["kind", "tokens", "lossless", *(f"{arm}_tok_s" for arm in ARMS),
                       *(f"{arm}_tokens_per_step" for arm in ARMS[1:])])
    print(" ".join(f"{key}={value}" for key, value in summary.items()))
    write_json(args.out, {"summary": summary, "rows": rows, "model": args.model or "the default model",
                          "medusa": args.medusa, "machine": machine_info()})


if __name__ == "__main__":
    main()
