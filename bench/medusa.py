"""`gorgon bench medusa`: plain greedy decoding vs Medusa speculation, both with our engine, on the same prompts.

Batch 1 and batch 4: tokens/s, speedup, mean tokens per decode step, the accept-length histogram,
per-head acceptance and how much the answers repeat themselves (a loop, which speculation copies, flatters
it); then the same for every shipped tree the heads can serve (speedup against tree size). Every Medusa output
is compared token for token with the plain one ("lossless"). Then batch 1 and 4 again with
sampled requests (temperature 0.7, seeded): Medusa verifies them by rejection sampling, which draws what plain
sampling draws, so there too "lossless" means the same tokens as the seeded plain run. Plain and Medusa runs
of a prompt group alternate, and each keeps its best time over --repeats, so load from other processes
hits both alike.

A group of 4 prompts starts together and ends with its slowest answer: with Medusa its sequences end at different
steps, and its last steps verify trees for fewer of them. So batch 4 is also measured as a server with 4 clients runs
it ("steady"): all prompts, 4 requests in flight, the next one started as soon as one ends, both modes timed until
the last request starts (the end of the run, where fewer requests remain, left out).

`--baseline llama.cpp` (a GGUF model; needs the `bench` extra) also runs llama.cpp on the same file, prompts
and thread count, interleaved with the greedy runs of the main tree: greedy decoding of as many tokens per
prompt group as Medusa emitted, so the table gives Medusa's and plain decoding's tok/s against llama.cpp's."""
from __future__ import annotations

import argparse
import time
from collections import Counter, deque
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import add_out_flag, cpu_isa, machine_info, print_table, write_json
from bench.llamacpp import LlamaCpp, require_llama_cpp
from engine import LLM, RequestOutput, SamplingParams
from engine.config import EngineConfig
from engine.medusa.speculator import LOOKUP_ONLY
from engine.medusa.tree import DEFAULT_TREE, TREES, load_tree
from engine.prompt_files import chat_prompt_ids, is_record_file, read_prompt_records
from models.gguf import find_gguf
from models.named import medusa_heads_for, resolve_model
from server.flags import positive_int

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    def __init__(self):\n",
    "    for i in range(len(items)):\n",
    "def read_config(path):\n    with open(path) as f:\n",
    "try:\n    import json\nexcept ImportError:\n",
    "    def __repr__(self):\n        return ",
    "if __name__ == '__main__':\n",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon bench medusa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a named model (smollm2), an HF checkpoint folder or a .gguf (default: the shipped model)")
    parser.add_argument("--medusa", default=None,
                        help="Medusa heads folder (default: the model's own: a named model's, else MODEL/medusa), or "
                             "'lookup': no heads, prompt-lookup drafts alone (any model)")
    parser.add_argument("--tree", default=None,
                        help=f"tree for the batch 1/4 runs: {', '.join(TREES)} or a JSON file "
                             f"(default: the engine's: the tree measured for the heads, else {DEFAULT_TREE} cut to "
                             "their depth)")
    parser.add_argument("--ngram-tokens", type=int, default=EngineConfig.medusa_ngram_tokens,
                        help="prompt-lookup drafts of at most N tokens (default: as many as the heads' tree "
                             "drafts, up to 8), verified in place of the heads' tree where the last tokens occurred "
                             "before (0: the heads alone)")
    parser.add_argument("--new-tokens", type=int, default=128, help="the most tokens per request")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="generate --new-tokens past the end of the answer (default: stop there, as a chat does)")
    parser.add_argument("--prompts", default=None,
                        help="your prompts: a .jsonl or .json file of records (a string, or an object with \"prompt\", "
                             "\"messages\" or ShareGPT's \"conversations\"), or a text file with one prompt per "
                             "line; chat-templated for chat models (default: "
                             f"{len(PROMPTS)} built-in code prompts)")
    parser.add_argument("--num-prompts", type=positive_int, default=None, help="use only the first N prompts")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per prompt group; the best counts")
    parser.add_argument("--no-sweep", action="store_true", help="only --tree, not every shipped tree")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (in bfloat16 unless the model says otherwise)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads make timings erratic)")
    parser.add_argument("--baseline", choices=["llama.cpp"], default=None,
                        help="also time llama.cpp's greedy decoding of the same GGUF file and prompts (batch 1 and 4)")
    add_out_flag(parser, "medusa")
    parser.add_argument("--plot", default=None, help="PNG: speedup vs tree size, and the accept-length histogram")
    return parser.parse_args(argv)


def load_prompts(path: str | None, tokenizer, limit: int | None = None, max_len: int | None = None) -> list[list[int]]:
    """The benchmark's first `limit` prompts (None: all) as token ids: --prompts (see --help), each in the model's
    chat format where it has a chat template (engine.prompt_files.chat_prompt_ids), else the built-in code prompts,
    continued as they are. Prompts longer than max_len tokens (the model's context less the answer's) are left out,
    and counted, as vLLM's benchmarks leave them out."""
    if path is None:
        return [tokenizer(p)["input_ids"] for p in PROMPTS[:limit]]
    file = Path(path)
    if is_record_file(file):
        chats = read_prompt_records(file)
    else:
        chats = [line for line in file.read_text().splitlines() if line.strip()]
    prompts, too_long = [], 0
    for chat in chats:
        if len(prompts) == limit:
            break
        ids = chat_prompt_ids(tokenizer, chat)
        if max_len is not None and len(ids) > max_len:
            too_long += 1
        else:
            prompts.append(ids)
    if too_long:
        print(f"{file}: left out {too_long} prompts longer than {max_len} tokens (the model's context less the "
              "answer's tokens)")
    if not prompts:
        raise ValueError(f"{file} holds no prompts" + (f" of at most {max_len} tokens" if too_long else ""))
    return prompts


SAMPLED_TEMPERATURE = 0.7
LOOPING = 0.25  # answers with a larger share of repeated 8-grams read as loops


def timed_pair(llm: LLM, prompts: list[list[int]], new_tokens: int, repeats: int, temperature: float = 0.0,
               ignore_eos: bool = False, baseline: LlamaCpp | None = None) -> dict:
    """Best-of-`repeats` wall time of generating for `prompts` together, plain and with Medusa (alternating),
    and with the llama.cpp baseline (greedy) when given: as many tokens per prompt as the longest Medusa answer."""
    def params(use_medusa: bool) -> list[SamplingParams]:  # sampled: seeded, so both modes emit the same tokens
        return [SamplingParams(max_tokens=new_tokens, temperature=temperature, seed=i if temperature else None,
                               ignore_eos=ignore_eos, use_medusa=use_medusa) for i in range(len(prompts))]

    plain_params, medusa_params = params(False), params(True)
    best = {mode: float("inf") for mode in ("plain", "medusa", *(["llama.cpp"] if baseline else []))}
    outputs: dict[str, list[RequestOutput]] = {}
    baseline_tokens = 0
    for _ in range(repeats):
        for mode, params in (("plain", plain_params), ("medusa", medusa_params)):
            start = time.perf_counter()
            outputs[mode] = llm.generate(prompts, params)
            best[mode] = min(best[mode], time.perf_counter() - start)
        if baseline:
            length = max(len(o.token_ids) for o in outputs["medusa"])
            start = time.perf_counter()
            baseline.generate(prompts, length)
            best["llama.cpp"] = min(best["llama.cpp"], time.perf_counter() - start)
            baseline_tokens = length * len(prompts)
    return {"seconds": best, "outputs": outputs, "baseline_tokens": baseline_tokens}


def in_flight(llm: LLM, prompts: list[list[int]], params: list[SamplingParams],
              batch_size: int) -> tuple[float, int, list[RequestOutput]]:
    """Every prompt with batch_size requests in flight, the next one added as soon as one ends -> (seconds until the
    last request was added, the tokens emitted until then, the outputs in prompt order)."""
    waiting = deque(zip(prompts, params))
    ids: list[str] = []
    finished: dict[str, RequestOutput] = {}
    start, steady, tokens = time.perf_counter(), None, 0
    while len(finished) < len(prompts):
        while waiting and len(ids) - len(finished) < batch_size:
            ids.append(llm.add_request(*waiting.popleft()))
        if not waiting and steady is None:
            steady = time.perf_counter() - start
        for out in llm.step():
            tokens += len(out.new_token_ids) if steady is None else 0
            if out.finished:
                finished[out.request_id] = out
    return steady, tokens, [finished[i] for i in ids]


def steady_pair(llm: LLM, prompts: list[list[int]], batch_size: int, args: argparse.Namespace) -> dict:
    """Greedy plain and Medusa decoding with batch_size requests in flight (in_flight), alternating, each the best
    of --repeats: tok/s until the last request starts, and whether Medusa gave plain decoding's tokens."""
    rate, outputs = {}, {}
    for _ in range(args.repeats):
        for mode in ("plain", "medusa"):
            params = [SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=args.ignore_eos,
                                     use_medusa=mode == "medusa")] * len(prompts)
            seconds, tokens, outputs[mode] = in_flight(llm, prompts, params, batch_size)
            rate[mode] = max(rate.get(mode, 0.0), tokens / seconds)
    return {"batch_size": batch_size, "steady_plain_tok_s": rate["plain"], "steady_medusa_tok_s": rate["medusa"],
            "steady_speedup": rate["medusa"] / rate["plain"],
            "lossless": [o.token_ids for o in outputs["plain"]] == [o.token_ids for o in outputs["medusa"]]}


def repeated_share(outputs: list[RequestOutput], n: int = 8) -> float:
    """The share of the answers' tokens that end an n-gram their answer already held: near 0 for text that goes
    on, near 1 for answers caught in a loop, which any drafter copies (a speedup measured on loops does not hold
    for text that goes on)."""
    repeated = total = 0
    for out in outputs:
        seen: set[tuple[int, ...]] = set()
        for i in range(n, len(out.token_ids) + 1):
            gram = tuple(out.token_ids[i - n:i])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else 0.0


def run_batch(llm: LLM, prompts: list[list[int]], batch_size: int, args: argparse.Namespace, bar: tqdm,
              temperature: float = 0.0, baseline: LlamaCpp | None = None) -> dict:
    """All prompts in groups of batch_size: tokens/s of both modes (and of the baseline), acceptance
    statistics, losslessness."""
    seconds: Counter[str] = Counter()
    steps: list[int] = []
    answers: list[RequestOutput] = []
    lossless, tokens, baseline_tokens, forwards = True, 0, 0, 0
    for i in range(0, len(prompts), batch_size):
        pair = timed_pair(llm, prompts[i:i + batch_size], args.new_tokens, args.repeats, temperature, args.ignore_eos,
                          baseline)
        seconds.update(pair["seconds"])
        baseline_tokens += pair["baseline_tokens"]
        plain, medusa = pair["outputs"]["plain"], pair["outputs"]["medusa"]
        lossless &= all(p.token_ids == m.token_ids for p, m in zip(plain, medusa))
        answers += plain
        tokens += sum(len(o.token_ids) for o in medusa)
        steps += [n for o in medusa for n in o.accepted_lengths]
        # a sequence's forward passes: its tree steps, and a plain step for each of its other tokens
        forwards += sum(len(o.accepted_lengths) + len(o.token_ids) - sum(o.accepted_lengths) for o in medusa)
        bar.update()
    depth = llm.medusa.max_depth  # of the heads' tree and the prompt-lookup chains
    plain_tps, medusa_tps = tokens / seconds["plain"], tokens / seconds["medusa"]
    histogram = Counter(steps)
    row = {
        "batch_size": batch_size, "temperature": temperature, "tree": tree_name(llm),
        "tree_size": (llm.medusa.max_tree_size if llm.medusa.heads is None
                      else llm.medusa.tree_for(batch_size).tree.size),
        "plain_tok_s": plain_tps, "medusa_tok_s": medusa_tps, "speedup": medusa_tps / plain_tps,
        # None: no tree step ran (more sequences than the tree's max_batch_size: the engine decoded plainly)
        "mean_accepted": sum(steps) / len(steps) if steps else None, "num_steps": len(steps), "lossless": lossless,
        "repeated_8grams": repeated_share(answers),
        # mean_accepted counts the tree steps alone; this, every forward pass (steps the engine made plain too)
        "tokens_per_forward": tokens / forwards if forwards else None,
        # tokens emitted per tree step: the accepted path plus the base model's bonus token
        "accept_length_histogram": {n: histogram.get(n, 0) for n in range(1, depth + 2)},
        # the depth-(k+1) draft (head k's, or lookup's) was accepted in a step iff it emitted at least k + 2 tokens
        "head_acceptance": [sum(n >= k + 2 for n in steps) / len(steps) for k in range(depth)] if steps else [],
        # a step verifying the heads' tree against a plain step, as the engine timed its own last steps at this batch
        # size (None: not timed); the speedup is about mean_accepted / tree_step_cost, less the steps made plain
        "tree_step_cost": (llm.medusa.step_clock.ratio(batch_size, llm.medusa.tree_for(batch_size).verify)
                           if llm.medusa.trees else None),
    }
    if baseline:
        llamacpp_tps = baseline_tokens / seconds["llama.cpp"]
        row |= {"llamacpp_tok_s": llamacpp_tps, "medusa_vs_llamacpp": medusa_tps / llamacpp_tps,
                "plain_vs_llamacpp": plain_tps / llamacpp_tps}
    return row


def plot(path: str, sweep: list[dict], main_row: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for batch_size in (1, 4):
        points = [r for r in sweep if r["batch_size"] == batch_size]
        left.plot([r["tree_size"] for r in points], [r["speedup"] for r in points], "o-", label=f"batch {batch_size}")
        for r in points:
            left.annotate(r["tree"], (r["tree_size"], r["speedup"]), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
    sizes = sorted({r["tree_size"] for r in sweep})
    left.set_xscale("log")
    left.set_xticks(sizes, [str(n) for n in sizes])
    left.minorticks_off()
    left.axhline(1.0, color="grey", lw=0.8)
    left.legend()
    left.set(xlabel="tree size (nodes, incl. root)", ylabel="speedup vs plain decode",
             title="Medusa speedup vs tree size")
    hist = main_row["accept_length_histogram"]
    right.bar(list(hist), list(hist.values()))
    right.set(xlabel="tokens emitted per step", ylabel="steps",
              title=f"accept lengths, tree {main_row['tree']}, batch 1 (mean {main_row['mean_accepted']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def tree_name(llm: LLM) -> str:
    """The engine's heads' trees' name, or "lookup" for prompt lookup alone (its chains, one per proposal length)."""
    return LOOKUP_ONLY if llm.medusa.heads is None else llm.medusa.trees[0].tree.name


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        model = resolve_model(args.model)
        medusa = Path(args.medusa) if args.medusa else medusa_heads_for(args.model)
        if args.medusa != LOOKUP_ONLY and not medusa.is_dir():
            raise ValueError(f"no Medusa heads at {medusa} (train some with `gorgon train-medusa`)")
        engine_kwargs = dict(medusa=str(medusa), enable_prefix_caching=False, medusa_ngram_tokens=args.ngram_tokens,
                             device=args.device)
        llm = LLM(model, medusa_tree=args.tree, **engine_kwargs)
        prompts = load_prompts(args.prompts, llm.tokenizer, args.num_prompts, llm.max_model_len - args.new_tokens)
        gguf_file = find_gguf(model)
        if args.baseline and args.device != "cpu":
            raise ValueError("--baseline llama.cpp runs on the CPU")
        if args.baseline and gguf_file is None:
            raise ValueError("--baseline llama.cpp runs both engines on one GGUF file: give a .gguf model (or smollm2)")
        if args.baseline:
            require_llama_cpp("medusa")
    except (ValueError, OSError) as e:
        raise SystemExit(f"gorgon bench medusa: error: {e}") from None
    if llm.medusa is None:
        raise SystemExit(f"gorgon bench medusa: {medusa}/tree.json says no tree pays here; name one with --tree")
    num_heads = 0 if llm.medusa.heads is None else llm.medusa.heads.config.num_heads  # lookup alone: no sweep
    sweep_trees = [n for n in TREES if n != tree_name(llm) and load_tree(n).depth <= num_heads]
    trees = [tree_name(llm)] + ([] if args.no_sweep else sweep_trees)
    with tqdm(total=(len(trees) + 1) * (len(prompts) + -(-len(prompts) // 4)) + 1, desc="bench medusa") as bar:
        llm.generate(prompts[0], SamplingParams(max_tokens=8, temperature=0))  # warm-up
        # (one cache for the 4 sequences of a batch: room for the longest prompt and its answer in each)
        n_ctx = 4 * (max(map(len, prompts)) + args.new_tokens + 16)
        baseline = LlamaCpp(gguf_file, args.threads, max_seqs=4, n_ctx=n_ctx) if args.baseline else None
        results = {}
        for name in trees:
            engine = llm if name == tree_name(llm) else LLM(model, medusa_tree=name, **engine_kwargs)
            results[name] = [run_batch(engine, prompts, bs, args, bar, baseline=baseline if engine is llm else None)
                             for bs in (1, 4)]
        if baseline:
            baseline.close()
        sampled = [run_batch(llm, prompts, bs, args, bar, SAMPLED_TEMPERATURE) for bs in (1, 4)]
        steady = steady_pair(llm, prompts, 4, args) if len(prompts) > 4 else None
        bar.update()
    rows = results[tree_name(llm)] + sampled
    sweep = sorted((r for name in trees for r in results[name]), key=lambda r: (r["batch_size"], r["tree_size"]))

    draft_vocab_size = None if llm.medusa.heads is None else llm.medusa.heads.num_draft_tokens
    if llm.medusa.max_batch_size is not None:
        print(f"\nthe engine speculates while at most {llm.medusa.max_batch_size} sequences decode (the tree's "
              "measured limit): above it Medusa rows are plain decoding")
    spine = llm.medusa.tree_for(1).spine if llm.medusa.trees else None
    if spine is not None:
        print(f"\na sequence decoding alone drafts spine trees of {spine.size} nodes in place of the {tree_name(llm)} "
              "tree (shaped each step by the drafts' probabilities)")
    print(f"\n{model}, heads {medusa} (drafting from {draft_vocab_size} tokens), {args.new_tokens} new tokens per "
          f"prompt, {len(prompts)} prompts, greedy and t={SAMPLED_TEMPERATURE}, "
          f"{args.threads} thread(s), {llm.config.dtype} on {args.device}, attention backend {llm.runner.backend.name}")
    columns = ["batch_size", "temperature", "tree", "tree_size", "plain_tok_s",
               "medusa_tok_s", "speedup", "mean_accepted", "tokens_per_forward", "tree_step_cost", "repeated_8grams",
               "lossless"]
    print_table(rows, columns)
    if rows[0]["repeated_8grams"] > LOOPING:
        print(f"\nthe greedy answers repeat themselves ({rows[0]['repeated_8grams']:.0%} of their tokens end an 8-gram "
              "seen before in the answer): speculation copies loops, so this speedup overstates what text that goes "
              "on gets; see the sampled rows, or give prompts the model answers without looping (--prompts)")
    if args.baseline:
        print(f"\nagainst llama.cpp on {gguf_file.name}, greedy, {args.threads} thread(s), CPU {cpu_isa()}:")
        print_table(rows[:2], ["batch_size", "llamacpp_tok_s", "plain_tok_s", "medusa_tok_s", "plain_vs_llamacpp",
                               "medusa_vs_llamacpp"])
    if steady is not None:
        print(f"\nsteady, 4 requests in flight until the last of the {len(prompts)} starts: plain "
              f"{steady['steady_plain_tok_s']:.1f} tok/s, Medusa {steady['steady_medusa_tok_s']:.1f} tok/s, "
              f"speedup {steady['steady_speedup']:.2f}, lossless {steady['lossless']}")
    print("\naccept-length histogram (batch 1):", rows[0]["accept_length_histogram"])
    print("acceptance by depth (batch 1; beyond the heads', prompt lookup's):",
          [round(a, 3) for a in rows[0]["head_acceptance"]])
    if len(trees) > 1:
        print("\nsweep over the shipped trees:")
        print_table(sweep, columns)
    summary = {
        "speedup_bs1": rows[0]["speedup"], "speedup_bs4": rows[1]["speedup"],
        "mean_accepted_bs1": rows[0]["mean_accepted"], "tokens_per_forward_bs1": rows[0]["tokens_per_forward"],
        # the share of the greedy answers' tokens that repeat an 8-gram of their answer (loops: above LOOPING)
        "repeated_8grams_bs1": rows[0]["repeated_8grams"], "sampled_repeated_8grams_bs1": sampled[0]["repeated_8grams"],
        # sampled requests (temperature SAMPLED_TEMPERATURE), verified by rejection sampling: tokens per tree step
        "sampled_speedup_bs1": sampled[0]["speedup"], "sampled_speedup_bs4": sampled[1]["speedup"],
        "sampled_tokens_per_step_bs1": sampled[0]["mean_accepted"],
        "sampled_tokens_per_step_bs4": sampled[1]["mean_accepted"],
        "sampled_lossless": all(r["lossless"] for r in sampled),
        "lossless": all(r["lossless"] for r in sweep) and (steady is None or steady["lossless"]),
        "tree": tree_name(llm),
        "max_batch_size": llm.medusa.max_batch_size, "ngram_tokens": args.ngram_tokens,
        # 4 requests in flight, until the last starts (None: 4 prompts or fewer)
        "steady_speedup_bs4": steady and steady["steady_speedup"],
    }
    if args.baseline:
        summary |= {f"{mode}_speedup_vs_llamacpp_bs{r['batch_size']}": r[f"{mode}_vs_llamacpp"]
                    for r in rows[:2] for mode in ("medusa", "plain")}
    write_json(args.out, {"benchmark": "medusa", "model": str(model), "medusa": str(medusa),
                          "draft_vocab_size": draft_vocab_size,
                          "new_tokens": args.new_tokens, "prompts": prompts, "threads": args.threads,
                          "device": args.device, "dtype": llm.config.dtype,
                          "cpu_isa": cpu_isa(), "baseline": args.baseline, "llama_cpp": baseline and baseline.build,
                          "attention_backend": llm.runner.backend.name, "runs": rows, "sweep": sweep, "steady": steady,
                          "machine": machine_info(), "summary": summary})
    if args.plot:
        plot(args.plot, sweep, rows[0])


if __name__ == "__main__":
    main()
