"""`gorgon bench adapters`: how fast adapters load, and what serving them costs.

- Load and unload latency of a LoRA and a prefix-tuning adapter (the shipped examples when the model
  is the default one, else random PEFT adapters of the same kind), median of --repeats after a warm-up.
- Greedy throughput of one batch of --batch-size requests, in interleaved rounds (the best of --repeats,
  since other work on the machine only ever slows a run down):
  base model only; a mixed batch, round-robin over 4 LoRA adapters and the base model; one LoRA merged
  into the weights (PEFT merge_and_unload, served as a plain model); every request through that LoRA
  unmerged; every request through the prefix adapter.
- With Medusa heads (--medusa, or <model>/medusa): tokens per speculative step for the base model and
  through each timed adapter (greedy output is the same either way; the heads were trained on the base
  model, so acceptance may drop).
Targets: loading the LoRA takes <= 100 ms; the mixed batch reaches >= 0.8x the base-only throughput.
Runs on one torch thread by default: on a small shared machine, more threads mostly measure the
neighbours (pass --threads to change it)."""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import CONFIGS, add_out_flag, machine_info, print_table, random_checkpoint, write_json
from engine import LLM, SamplingParams
from models import DEFAULT_MODEL_DIR
from models.loader import model_config

SHIPPED = {"lora": "licenses-lora", "prefix": "licenses-prefix"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUM_MIXED_LORAS = 4
MEDUSA_PROMPTS = ["def main(argv=None):\n", "import os\nimport sys\n\n", "This License applies to",
                  "Permission is hereby granted, free of charge,"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon bench adapters", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="HF checkpoint folder (default: the shipped model if present)")
    source.add_argument("--config", choices=sorted(CONFIGS), help="random weights of this shape")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--virtual-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--medusa", type=Path, help="Medusa heads folder (default: <model>/medusa if present)")
    add_out_flag(parser, "adapters")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="gorgon-bench-") as tmp:
        tmp = Path(tmp)
        if args.config or (args.model is None and not (DEFAULT_MODEL_DIR / "config.json").is_file()):
            folder, source = random_checkpoint(args.config or "small", "float32", tmp / "model"), "random weights"
        else:
            folder = args.model or DEFAULT_MODEL_DIR
            source = str(folder)
        run(args, folder, source, tmp)


def random_adapter(model_folder: Path, config, out: Path, seed: int) -> None:
    """A PEFT adapter with random non-zero weights (PEFT initialises LoRA's B to zero)."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "prompt_encoder" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(out)


def make_adapters(args: argparse.Namespace, folder: Path, root: Path) -> tuple[dict[str, str], list[str]]:
    """Fill `root`; returns the adapters to time loading ({kind: name}) and the LoRAs of the mixed batch."""
    timed = {}
    for kind, name in SHIPPED.items():
        shipped = folder / "adapters" / name
        if (shipped / "adapter_config.json").is_file():
            shutil.copytree(shipped, root / name)
            timed[kind] = name
    if "prefix" not in timed:
        random_adapter(folder, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.virtual_tokens),
                       root / "prefix", seed=0)
        timed["prefix"] = "prefix"
    mixed = [f"lora{i}" for i in range(NUM_MIXED_LORAS)]
    for seed, name in enumerate(mixed):
        random_adapter(folder, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=LORA_TARGETS),
                       root / name, seed=seed)
    timed.setdefault("lora", mixed[0])
    return timed, mixed


def merged_checkpoint(folder: Path, adapter: Path, out: Path) -> Path:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), adapter)
    model.merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


def medusa_tokens_per_step(folder: Path, heads: Path, engine_kwargs: dict, timed: dict[str, str],
                           new_tokens: int) -> dict[str, float]:
    """Mean tokens emitted per speculative step over a few text prompts, base model vs each adapter."""
    llm = LLM(folder, medusa=str(heads), **{**engine_kwargs, "max_model_len": 512, "num_kv_blocks": 256})
    for name in timed.values():
        llm.load_adapter(name, name)
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    result = {}
    for label, adapter in {"base": None, **timed}.items():
        outs = llm.generate(MEDUSA_PROMPTS, greedy, adapter=adapter)
        steps = [n for o in outs for n in o.accepted_lengths]
        result[label] = sum(steps) / max(1, len(steps))
    return result


def run(args: argparse.Namespace, folder: Path, source: str, tmp: Path) -> None:
    root = tmp / "adapters"
    root.mkdir()
    timed, mixed_loras = make_adapters(args, folder, root)
    merged = merged_checkpoint(folder, root / mixed_loras[0], tmp / "merged")
    block_size = 16
    blocks_per_request = -(-(args.virtual_tokens + args.prompt_len + args.new_tokens) // block_size) + 1
    engine_kwargs = dict(block_size=block_size, max_num_seqs=args.batch_size, enable_prefix_caching=False,
                         max_model_len=min(blocks_per_request * block_size, model_config(folder).max_model_len),
                         num_kv_blocks=(args.batch_size + 2) * blocks_per_request, adapter_root=str(root))
    llm = LLM(folder, **engine_kwargs)
    merged_llm = LLM(merged, **engine_kwargs)

    def load_unload(name: str) -> tuple[float, float]:
        loads, unloads = [], []
        for _ in range(args.repeats + 1):  # the first round warms up (and installs the LoRA wrappers)
            start = time.perf_counter()
            llm.load_adapter("timed", name)
            loads.append(time.perf_counter() - start)
            start = time.perf_counter()
            llm.unload_adapter("timed")
            unloads.append(time.perf_counter() - start)
        return 1000 * statistics.median(loads[1:]), 1000 * statistics.median(unloads[1:])

    latency = {kind: load_unload(name) for kind, name in timed.items()}
    for name in mixed_loras:
        llm.load_adapter(name, name)
    llm.load_adapter("prefix", timed["prefix"])

    prompts = torch.randint(3, 200, (args.batch_size, args.prompt_len),
                            generator=torch.Generator().manual_seed(0)).tolist()
    greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    round_robin = [None, *mixed_loras]
    runs = {  # name -> (engine, adapter per request)
        "base only": (llm, [None] * args.batch_size),
        f"mixed: {NUM_MIXED_LORAS} LoRAs + base": (
            llm, [round_robin[i % len(round_robin)] for i in range(args.batch_size)]),
        "one LoRA, merged": (merged_llm, [None] * args.batch_size),
        "one LoRA, unmerged": (llm, [mixed_loras[0]] * args.batch_size),
        "prefix adapter": (llm, ["prefix"] * args.batch_size),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for engine, adapters in runs.values():  # warm-up
        engine.generate(prompts[:2], greedy, adapter=adapters[:2])
    with tqdm(total=args.repeats * len(runs), desc="bench adapters") as bar:
        for _ in range(args.repeats):
            for name, (engine, adapters) in runs.items():
                start = time.perf_counter()
                engine.generate(prompts, greedy, adapter=adapters)
                times[name].append(time.perf_counter() - start)
                bar.update()
    tok_s = {name: args.batch_size * args.new_tokens / min(t) for name, t in times.items()}
    base = tok_s["base only"]

    print(f"\n{source}, float32, batch {args.batch_size}, {args.prompt_len}-token prompts, "
          f"{args.new_tokens} new tokens, "
          f"LoRA rank {args.lora_rank}, attention backend {llm.runner.backend.name}")
    print_table([{"adapter": f"{kind} ({timed[kind]})", "load ms": load, "unload ms": unload}
                 for kind, (load, unload) in latency.items()], ["adapter", "load ms", "unload ms"])
    print()
    print_table([{"batch": name, "tok/s": t, "vs base only": t / base} for name, t in tok_s.items()],
                ["batch", "tok/s", "vs base only"])
    summary = {
        "load_ms_lora": latency["lora"][0],
        "load_ms_prefix": latency["prefix"][0],
        "unload_ms_lora": latency["lora"][1],
        "unload_ms_prefix": latency["prefix"][1],
        "mixed_batch_throughput_ratio": tok_s[f"mixed: {NUM_MIXED_LORAS} LoRAs + base"] / base,
        "merged_lora_throughput_ratio": tok_s["one LoRA, merged"] / base,
        "unmerged_lora_throughput_ratio": tok_s["one LoRA, unmerged"] / base,
        "prefix_throughput_ratio": tok_s["prefix adapter"] / base,
    }
    summary["targets_met"] = summary["load_ms_lora"] <= 100 and summary["mixed_batch_throughput_ratio"] >= 0.8
    heads = args.medusa or (folder / "medusa" if (folder / "medusa").is_dir() else None)
    if heads is not None:
        per_step = medusa_tokens_per_step(folder, heads, engine_kwargs, timed, args.new_tokens)
        print()
        print_table([{"Medusa": label, "tokens/step": t, "vs base": t / per_step["base"]}
                     for label, t in per_step.items()],
                    ["Medusa", "tokens/step", "vs base"])
        summary.update({f"medusa_tokens_per_step_{label}": t for label, t in per_step.items()})
    print(f"\ntargets: LoRA load {summary['load_ms_lora']:.1f} ms (<= 100), mixed batch "
          f"{summary['mixed_batch_throughput_ratio']:.2f}x base only (>= 0.8)")
    write_json(args.out, {
        "benchmark": "adapters", "model": source, "batch_size": args.batch_size, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "lora_rank": args.lora_rank, "adapters_timed": timed,
        "attention_backend": llm.runner.backend.name, "tokens_per_s": tok_s, "machine": machine_info(),
        "summary": summary,
    })


if __name__ == "__main__":
    main()
