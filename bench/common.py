"""Helpers every benchmark shares: named model shapes, random checkpoints, timing, tables, JSON."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from models.kernels.decode import bf16_gemm

# Model shapes for random-weight runs, by name.
CONFIGS: dict[str, dict] = {
    # about the shipped default model's size
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True),
    # TinyLlama-1.1B's shape
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                           tie_word_embeddings=False),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def baseline_dtype(dtype: str, device: str) -> str:
    """The dtype transformers runs in as the baseline of gorgon in `dtype`: the same, but float32 for bfloat16 on a
    CPU without bf16 GEMM, where torch's bf16 matmuls run at a few percent of its fp32 ones (gorgon widens bf16
    weights to fp32 there too: models.layers.widened_linear). The baseline at its best on the machine."""
    return "float32" if dtype == "bfloat16" and device == "cpu" and not bf16_gemm() else dtype


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer over ids 0..255 (ids 1/2 double as BOS/EOS): random models need no training."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def random_checkpoint(name: str, dtype: str, folder: Path) -> Path:
    """Save a random-weight Llama of shape CONFIGS[name] as an HF folder (with a byte tokenizer)."""
    config = LlamaConfig(**CONFIGS[name], bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def add_out_flag(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", default=f"bench_{name}.json", help=f"JSON result file (default: bench_{name}.json)")


def write_json(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def machine_info() -> dict:
    """What a figure was measured on: the software (gorgon's commit, torch), the CPU and its vector instructions, and
    how busy the machine was (the load average over the last minute, against its CPU count)."""
    import os
    import platform

    return {"gorgon_commit": gorgon_commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "cpu_isa": cpu_isa(),
            "load_average_1min": os.getloadavg()[0],
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def gorgon_commit() -> str | None:
    """The checkout's commit, with "+changes" where its tracked files differ from it (None outside a git checkout)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def cpu_isa() -> str:
    """The vector instruction sets this CPU has, of those the kernels care about (Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return "unknown"
    flags = set(next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split())
    names = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx512_bf16": "AVX512-BF16",
             "amx_tile": "AMX"}
    return " ".join(name for flag, name in names.items() if flag in flags) or "none of AVX2 / AVX-512 / AMX"
