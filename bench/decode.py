"""`gorgon bench decode`: greedy decode speed of gorgon vs a baseline on the same weights.

Baseline transformers (HF folders or random weights): batch-1 tokens/s for both (same prompt, dtype and
number of new tokens, prefill included, warm-up excluded), gorgon's throughput at batch 8 and 32, and the
memory-bandwidth roofline: the machine's read bandwidth is measured in the same run (the faster of
torch.sum and our linear kernel streaming 1 GiB), and batch-1 decode steps (prefill and first token taken
off) are reported as weight bytes x tokens/s over it. `--device cuda` runs both on the GPU (bfloat16 by default),
the bandwidth being the GPU memory's, and gorgon's batch 1 also without its decode graphs.

Baseline llama.cpp (`--model X.gguf --baseline llama.cpp`, needs the `bench` extra): both engines on the
same file with the same threads, prompts and token counts, interleaved in one run: batch-1 decode tok/s,
prefill tok/s of a 512-token prompt, batch-1 decode after that prompt (its generation less its prefill: where
the KV cache's bytes count), and the throughput at each of --batch-sizes; the CPU's instruction sets are
reported. Each engine keeps its default KV cache (fp16 for both, on GGUF files under fp32 activations).

Tensor parallelism (`--tensor-parallel-size N`): gorgon on N processes against gorgon on one, same weights and
prompts, measured alternately in one run: batch-1 tok/s and the batch sizes' throughput, and whether the greedy
tokens agree. The one process uses all the threads (--threads, default torch's); each of the N ranks 1/N of
them, so both runs have the same cores. This measures the cost of the collectives; a speedup needs ranks
on cores (or devices) of their own."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from bench.common import (
    CONFIGS,
    add_out_flag,
    baseline_dtype,
    best_of,
    cpu_isa,
    machine_info,
    print_table,
    random_checkpoint,
    write_json,
)
from bench.llamacpp import LlamaCpp, require_llama_cpp
from engine import LLM, SamplingParams
from models.gguf import find_gguf
from models.kernels import decode as cpu_decode
from models.named import resolve_model

PROMPT_LEN = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon bench decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a named model (smollm2), an HF checkpoint folder or a .gguf file")
    source.add_argument("--config", choices=sorted(CONFIGS), default="small", help="random weights of this shape")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: gorgon's (bfloat16 for bf16 checkpoints, else float32)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (against transformers only)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 is steadier on a shared machine")
    parser.add_argument("--baseline", choices=["transformers", "llama.cpp"], default="transformers")
    parser.add_argument("--prefill-len", type=int, default=512, help="prompt length of the llama.cpp prefill test")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="compare gorgon on N processes (tensor parallelism) with gorgon on one, in one run")
    add_out_flag(parser, "decode")
    return parser.parse_args(argv)


def read_bandwidth(device: torch.device, num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s read from the device's memory: on the CPU the faster of torch's sum and gorgon's one-row linear
    kernel over a buffer far beyond the caches (torch's sum alone reads slower than the kernel does)."""
    buf = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    seconds = best_of(lambda: buf.sum().item(), repeats)  # .item(): the time includes the device's work
    if device.type == "cpu" and cpu_decode.compiled() is not None:
        matrix, row = buf.view(-1, 4096), torch.ones(1, 4096)
        seconds = min(seconds, best_of(lambda: cpu_decode.compiled().small_batch_linear(row, matrix, None), repeats))
    return num_bytes / seconds


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_isa()})"


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row is read),
    unless the table is also the LM head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    if model.lm_head.weight is embed:
        return total
    return total - embed.numel() * embed.element_size()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gorgon bench decode: error: --device cuda, but torch sees no CUDA device")
    if args.device != "cpu" and (args.baseline == "llama.cpp" or args.tensor_parallel_size > 1):
        raise SystemExit("--device applies to the transformers baseline; llama.cpp and tensor parallelism are "
                         "measured on the CPU")
    if args.model:
        try:
            args.model = str(resolve_model(args.model))  # a named model (smollm2) is the file its package ships
        except ValueError as e:
            raise SystemExit(f"gorgon bench decode: error: {e}") from None
    if args.baseline == "llama.cpp":
        if not (args.model and find_gguf(args.model)):
            raise SystemExit("--baseline llama.cpp runs both engines on one GGUF file: give --model X.gguf")
        require_llama_cpp("decode")
        return run_llamacpp(args, find_gguf(args.model))
    if args.model and find_gguf(args.model) and args.tensor_parallel_size == 1:
        raise SystemExit("gorgon bench decode: a GGUF model's baseline is llama.cpp on the same file "
                         "(--baseline llama.cpp): transformers runs HF checkpoint folders")
    with tempfile.TemporaryDirectory(prefix="gorgon-bench-") as tmp:
        folder = Path(args.model) if args.model else random_checkpoint(args.config, args.dtype or "float32", Path(tmp))
        if args.tensor_parallel_size > 1:
            return run_tensor_parallel(args, folder)
        run(args, folder)


def run(args: argparse.Namespace, folder: Path) -> None:
    source = str(folder) if args.model else f"random weights, {args.config} shape"
    n = args.new_tokens
    greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    max_batch = max([1, *args.batch_sizes])
    prompts = torch.randint(3, 200, (max_batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0)).tolist()

    device = torch.device(args.device)
    with tqdm(total=4, desc="bench decode") as bar:
        bandwidth = read_bandwidth(device)
        bar.update()
        llm = LLM(folder, device=args.device, dtype=args.dtype, max_num_seqs=max_batch, enable_prefix_caching=False)
        ours_s = best_of(lambda: llm.generate(prompts[0], greedy), args.repeats)
        # the roofline takes decode steps alone: the prefill and first token are timed apart and taken off
        first_s = best_of(lambda: llm.generate(prompts[0], SamplingParams(max_tokens=1, temperature=0)), args.repeats)
        eager_s = None
        if llm.runner.graphs is not None:  # what the decode graphs gain, measured beside them
            eager = LLM(folder, device=args.device, dtype=args.dtype, max_num_seqs=1, enable_prefix_caching=False,
                        cuda_graphs=False)
            eager_s = best_of(lambda: eager.generate(prompts[0], greedy), args.repeats)
            del eager
        bar.update()
        hf_dtype = baseline_dtype(llm.config.dtype, device.type)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, hf_dtype)).to(device).eval()
        prompt = torch.tensor([prompts[0]], device=device)

        def hf_generate(model: torch.nn.Module) -> list[int]:  # (token ids on the host: the device's work is done)
            with torch.inference_mode():
                return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)[0].tolist()

        hf_s = best_of(partial(hf_generate, hf), args.repeats)
        del hf
        bar.update()
        throughput = {}
        for bs in args.batch_sizes:
            start = time.perf_counter()
            llm.generate(prompts[:bs], greedy)
            throughput[bs] = bs * n / (time.perf_counter() - start)
        bar.update()

    ours_tok_s, hf_tok_s = n / ours_s, n / hf_s
    decode_tok_s = (n - 1) / (ours_s - first_s)
    bytes_per_token = weight_bytes_per_token(llm.model)
    rows = [{"engine": "transformers generate", "batch": 1, "tok/s": hf_tok_s, "vs HF": 1.0},
            {"engine": "gorgon", "batch": 1, "tok/s": ours_tok_s, "vs HF": ours_tok_s / hf_tok_s,
             "decode tok/s": decode_tok_s, "roofline": bytes_per_token * decode_tok_s / bandwidth}]
    if eager_s is not None:
        rows.insert(1, {"engine": "gorgon, no CUDA graphs", "batch": 1, "tok/s": n / eager_s,
                        "vs HF": hf_s / eager_s})
    rows += [{"engine": "gorgon", "batch": bs, "tok/s": tps} for bs, tps in throughput.items()]
    print(f"\n{source}, {llm.config.dtype} on {device_name(device)}"
          + (f" (transformers in {hf_dtype}: this CPU has no bf16 GEMM)" if hf_dtype != llm.config.dtype else "")
          + f", {n} new tokens after a {PROMPT_LEN}-token prompt, "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {bytes_per_token / 1e6:.1f} MB of weights per token")
    print_table(rows, ["engine", "batch", "tok/s", "vs HF", "decode tok/s", "roofline"])
    summary = {
        "speedup_vs_hf_bs1": ours_tok_s / hf_tok_s,
        "roofline_fraction_bs1": bytes_per_token * decode_tok_s / bandwidth,
        **{f"throughput_bs{bs}_tok_s": tps for bs, tps in throughput.items()},
    }
    if eager_s is not None:
        summary["cuda_graphs_speedup_bs1"] = eager_s / ours_s
    write_json(args.out, {
        "benchmark": "decode", "model": source, "dtype": llm.config.dtype, "transformers_dtype": hf_dtype,
        "device": device_name(device),
        "new_tokens": n, "prompt_len": PROMPT_LEN,
        "attention_backend": llm.runner.backend.name, "read_bandwidth_bytes_s": bandwidth,
        "weight_bytes_per_token": bytes_per_token, "hf_tok_s_bs1": hf_tok_s, "gorgon_tok_s_bs1": ours_tok_s,
        "gorgon_decode_tok_s_bs1": decode_tok_s,
        "machine": machine_info(), "summary": summary,
    })


def run_tensor_parallel(args: argparse.Namespace, folder: Path) -> None:
    """TP=N against TP=1: each measurement alternates between the two engines, repeats times; medians."""
    n, size = args.new_tokens, args.tensor_parallel_size
    source = str(folder) if args.model else f"random weights, {args.config} shape"
    greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    max_batch = max([1, *args.batch_sizes])
    prompts = torch.randint(3, 200, (max_batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0)).tolist()
    batches = {1: prompts[:1], **{bs: prompts[:bs] for bs in args.batch_sizes}}
    threads = torch.get_num_threads()
    kwargs = dict(dtype=args.dtype, max_num_seqs=max_batch, enable_prefix_caching=False)
    one = LLM(folder, **kwargs)
    with LLM(folder, tensor_parallel_size=size, **kwargs) as parallel:
        rank_threads = torch.get_num_threads()  # each rank's share (engine.parallel.Driver.start)
        # name -> (engine, torch threads of this process while it runs: rank 0 of TP=N runs here too)
        engines = {"TP=1": (one, threads), f"TP={size}": (parallel, rank_threads)}

        def generate(name: str, batch: list[list[int]]) -> list[list[int]]:
            llm, engine_threads = engines[name]
            torch.set_num_threads(engine_threads)
            return [o.token_ids for o in llm.generate(batch, greedy)]

        tokens = {name: generate(name, batches[1]) for name in engines}  # also the warm-up
        times: dict[str, dict[int, list[float]]] = {name: {bs: [] for bs in batches} for name in engines}
        with tqdm(total=args.repeats * len(batches), desc=f"bench decode TP={size} vs TP=1") as bar:
            for _ in range(args.repeats):
                for bs, batch in batches.items():
                    for name in engines:
                        start = time.perf_counter()
                        generate(name, batch)
                        times[name][bs].append(time.perf_counter() - start)
                    bar.update()
        torch.set_num_threads(rank_threads)
    torch.set_num_threads(threads)

    rate = {name: {bs: bs * n / statistics.median(t) for bs, t in by_batch.items()} for name, by_batch in times.items()}
    rows = [{"engine": f"gorgon {name}", "processes": 1 if name == "TP=1" else size,
             "threads per process": engines[name][1], "batch": bs, "tok/s": rate[name][bs],
             "vs TP=1": rate[name][bs] / rate["TP=1"][bs]} for bs in batches for name in engines]
    identical = tokens["TP=1"] == tokens[f"TP={size}"]
    isa = cpu_isa()
    print(f"\n{source}, {one.config.dtype}, {n} new tokens after a {PROMPT_LEN}-token prompt; CPU: {isa}, "
          f"{os.cpu_count()} cores; greedy tokens identical at TP=1 and TP={size}: {identical}")
    print_table(rows, ["engine", "processes", "threads per process", "batch", "tok/s", "vs TP=1"])
    summary = {f"tp{size}_vs_tp1_bs{bs}": rate[f"TP={size}"][bs] / rate["TP=1"][bs] for bs in batches}
    summary["greedy_tokens_identical"] = identical
    write_json(args.out, {
        "benchmark": "decode", "baseline": "gorgon TP=1", "model": source, "dtype": one.config.dtype, "new_tokens": n,
        "prompt_len": PROMPT_LEN, "tensor_parallel_size": size, "threads_tp1": threads,
        "threads_per_rank": rank_threads, "cpu_isa": isa, "tok_s": rate, "seconds": times,
        "machine": machine_info(), "summary": summary,
    })


def run_llamacpp(args: argparse.Namespace, file: Path) -> None:
    """Both engines on one GGUF file, each measurement interleaved (gorgon, llama.cpp) repeats times; medians."""
    n, threads = args.new_tokens, torch.get_num_threads()
    batches = sorted({b for b in args.batch_sizes if b > 1})  # (batch 1 is always measured)
    max_batch = max([1, *batches])
    llm = LLM(file, dtype=args.dtype, max_num_seqs=max_batch, enable_prefix_caching=False,
              max_num_batched_tokens=max(2048, args.prefill_len + 1))
    vocab = llm.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, min(vocab, 20000), (max_batch, PROMPT_LEN), generator=gen).tolist()
    long_prompt = torch.randint(100, min(vocab, 20000), (args.prefill_len,), generator=gen).tolist()
    # llama.cpp splits n_ctx between its sequences: each must hold the long prompt and its answer
    baseline = LlamaCpp(file, threads, max_seqs=max_batch, n_ctx=max_batch * (args.prefill_len + n + 16))
    greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    first_token = SamplingParams(max_tokens=1, temperature=0)
    after = f"decode_bs1_after_{args.prefill_len}"  # decode over a long context: the prompt and n tokens, less prefill
    tests = {  # name -> (tokens produced or read, gorgon, llama.cpp)
        "decode_bs1": (n, lambda: llm.generate(prompts[:1], greedy), lambda: baseline.generate(prompts[:1], n)),
        f"prefill_{args.prefill_len}": (args.prefill_len, lambda: llm.generate([long_prompt], first_token),
                                        lambda: baseline.generate([long_prompt], 1)),
        after: (n - 1, lambda: llm.generate([long_prompt], greedy), lambda: baseline.generate([long_prompt], n)),
        **{f"decode_bs{b}": (b * n, partial(llm.generate, prompts[:b], greedy),
                             partial(baseline.generate, prompts[:b], n)) for b in batches},
    }
    times: dict[str, dict[str, list[float]]] = {name: {"gorgon": [], "llama.cpp": []} for name in tests}
    with tqdm(total=len(tests) * (args.repeats + 1), desc="bench decode vs llama.cpp") as bar:
        for rep in range(args.repeats + 1):  # the first round warms up both engines
            for name, (_, ours, theirs) in tests.items():
                for engine, fn in (("gorgon", ours), ("llama.cpp", theirs)):
                    start = time.perf_counter()
                    fn()
                    if rep:
                        times[name][engine].append(time.perf_counter() - start)
                bar.update()
    ours_tokens = [o.token_ids for o in llm.generate(prompts[:1], greedy)][0]
    agree = sum(a == b for a, b in zip(ours_tokens, baseline.generate(prompts[:1], n)[0]))
    baseline.close()

    for engine, prefill in times[f"prefill_{args.prefill_len}"].items():
        times[after][engine] = [t - statistics.median(prefill) for t in times[after][engine]]
    rate = {name: {engine: tokens / statistics.median(times[name][engine]) for engine in times[name]}
            for name, (tokens, _, _) in tests.items()}
    rows = [{"test": name, "gorgon tok/s": r["gorgon"], "llama.cpp tok/s": r["llama.cpp"],
             "gorgon / llama.cpp": r["gorgon"] / r["llama.cpp"]} for name, r in rate.items()]
    isa = cpu_isa()
    ops = cpu_decode.compiled()
    kernels = "unavailable" if ops is None else ops.isa() + (" + AMX tiles" if ops.amx() else "")
    print(f"\n{file.name}, gorgon dtype {llm.config.dtype} (KV cache {llm.config.kv_cache_dtype}), {threads} "
          f"thread(s), {n} new tokens after a {PROMPT_LEN}-token prompt ({after}: after the prefill's); CPU: {isa}; "
          f"gorgon's quantized kernels: {kernels}; "
          f"greedy tokens agreeing with llama.cpp at batch 1: {agree}/{n}")
    print_table(rows, ["test", "gorgon tok/s", "llama.cpp tok/s", "gorgon / llama.cpp"])
    summary = {
        "decode_speedup_vs_llamacpp_bs1": rate["decode_bs1"]["gorgon"] / rate["decode_bs1"]["llama.cpp"],
        f"decode_speedup_vs_llamacpp_bs1_after_{args.prefill_len}": rate[after]["gorgon"] / rate[after]["llama.cpp"],
        f"prefill_speedup_vs_llamacpp_{args.prefill_len}": (rate[f"prefill_{args.prefill_len}"]["gorgon"] /
                                                           rate[f"prefill_{args.prefill_len}"]["llama.cpp"]),
    }
    for b in batches:
        ours, theirs = rate[f"decode_bs{b}"]["gorgon"], rate[f"decode_bs{b}"]["llama.cpp"]
        summary[f"throughput_speedup_vs_llamacpp_bs{b}"] = ours / theirs
        summary[f"gorgon_bs{b}_vs_bs1"] = ours / rate["decode_bs1"]["gorgon"]
    write_json(args.out, {
        "benchmark": "decode", "baseline": "llama.cpp", "model": str(file), "dtype": llm.config.dtype,
        "kv_cache_dtype": llm.config.kv_cache_dtype, "new_tokens": n,
        "prompt_len": PROMPT_LEN, "prefill_len": args.prefill_len, "threads": threads, "cpu_isa": isa,
        "gorgon_kernel_isa": ops.isa() if ops else None, "tok_s": rate, "seconds": times,
        "greedy_agreement_bs1": agree, "llama_cpp": baseline.build, "machine": machine_info(), "summary": summary,
    })


if __name__ == "__main__":
    main()
