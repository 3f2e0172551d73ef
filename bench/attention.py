"""`gorgon bench attention`: the attention backends on a paged KV cache, time and peak memory.

Cases: causal prefill (a fresh prompt of L tokens) and paged decode (one new token over a context of
L), each at batch 1 and 8, every sequence's KV blocks scattered over the pool. Backends, all called
through the same interface (store the new K/V, then attend):
  naive   the reference backend: per sequence, gather K/V and materialise the full score matrix
  sdpa    gather every sequence's K/V out of the pool, then torch scaled_dot_product_attention
  dense   the same SDPA call on K/V already contiguous (a dense cache: the gather made once, untimed), the bound
          a paged kernel reaches when reading its scattered blocks costs nothing
  flash   engine/attention/flash.py, tiled online softmax in plain torch
  cpu     engine/attention/cpu.py, the fused C++/OpenMP kernel (on CPU)
  triton  engine/attention/triton.py (on CUDA)

Time: the fastest of a few calls after a warm-up (the call least disturbed by other load on a shared
machine; every backend is measured the same way, case by case, in the same run). Peak memory: on CUDA,
torch's peak allocated bytes above the inputs; on CPU, the process's peak resident memory (VmHWM, reset through
/proc/self/clear_refs) above its resident size before the call, with malloc told to return every
allocation of 64 KiB or more to the OS on free, so that the figure covers every buffer a call touches
(torch tensors, the C++ kernel's scratch, library workspaces); Linux updates resident-size counters
in batches, so figures below about 1 MiB are not exact. A backend whose single call exceeds
--slow-limit seconds is skipped at longer lengths, and naive where its score matrices would exceed
--naive-limit-gb."""
from __future__ import annotations

import argparse
import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.common import add_out_flag, machine_info, print_table, write_json
from engine.attention import get_backend, store_kv
from models.context import ForwardContext

SUMMARY_LENGTH = 4096


@dataclass
class Shape:
    """Attention shape of one layer: num_heads query heads share num_kv_heads K/V heads (GQA)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon bench attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_flag(parser, "attention")
    parser.add_argument("--plot", help="PNG of time and peak memory against length")
    parser.add_argument("--quick", action="store_true", help="fewer lengths (prefill <= 4096, decode <= 8192)")
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--decode-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--slow-limit", type=float, default=5.0, help="seconds; skip a backend at longer lengths after")
    parser.add_argument("--naive-limit-gb", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.prefill_lens = [n for n in args.prefill_lens if n <= 4096]
        args.decode_lens = [n for n in args.decode_lens if n <= 8192]
    return args


def paged_inputs(shape: Shape, batch: int, query_len: int, context_len: int, seed: int = 0):
    """Random q/k/v for the new tokens and a random pool; each sequence's blocks are scattered."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = -(-context_len // shape.block_size)
    num_blocks = batch * blocks_per_seq
    block_tables = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_seq).to(torch.int32)
    num_tokens = batch * query_len

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(shape.dtype).to(shape.device)

    cache_shape = (num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    k_cache, v_cache = randn(*cache_shape), randn(*cache_shape)
    q = randn(num_tokens, shape.num_heads, shape.head_dim)
    k = randn(num_tokens, shape.num_kv_heads, shape.head_dim)
    v = randn(num_tokens, shape.num_kv_heads, shape.head_dim)
    positions = torch.arange(context_len - query_len, context_len).repeat(batch)
    seq_index = torch.arange(batch).repeat_interleave(query_len)
    slot_mapping = (block_tables[seq_index, positions // shape.block_size] * shape.block_size
                    + positions % shape.block_size)
    to = dict(device=shape.device)
    ctx = ForwardContext(positions=positions.to(**to), slot_mapping=slot_mapping.to(**to),
                         query_start_loc=torch.arange(0, num_tokens + 1, query_len, dtype=torch.int32).to(**to),
                         context_lens=torch.full((batch,), context_len, dtype=torch.int32).to(**to),
                         block_tables=block_tables.to(**to), query_lens_cpu=[query_len] * batch,
                         context_lens_cpu=[context_len] * batch)
    return q, k, v, k_cache, v_cache, ctx


class GatherSdpa:
    """Baseline: copy every sequence's K/V out of the pool, then one batched torch SDPA call
    (all sequences of a benchmark case have the same lengths)."""

    name = "sdpa"

    def forward(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        return self.attend(q, *self.gather(k_cache, v_cache, ctx), ctx, scale)

    @staticmethod
    def gather(k_cache, v_cache, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's K/V out of the pool: [batch, num_kv_heads, context_len, head_dim] each."""
        blocks, context_len = ctx.block_tables.long(), ctx.context_lens_cpu[0]
        return tuple(cache[blocks].flatten(1, 2)[:, :context_len].transpose(1, 2) for cache in (k_cache, v_cache))

    @staticmethod
    def attend(q, keys, values, ctx: ForwardContext, scale: float) -> torch.Tensor:
        batch, query_len = ctx.num_seqs, ctx.query_lens_cpu[0]
        queries = q.view(batch, query_len, *q.shape[1:]).transpose(1, 2)  # [batch, num_heads, query_len, head_dim]
        # a prefill's rows are the whole context (causal); a decode row sees everything
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=query_len > 1, scale=scale,
                                             enable_gqa=q.shape[1] != keys.shape[1])
        return out.transpose(1, 2).reshape(q.shape)


class DenseSdpa(GatherSdpa):
    """Bound: the same SDPA call on K/V already contiguous per sequence, as a dense (unpaged) cache holds them: their
    copy out of the pool, which gather+SDPA times, is made once, in the warm-up call, and reused. A paged kernel as
    fast as this reads its scattered blocks for free; against gather+SDPA alone it also gains the copy."""

    name = "dense"

    def __init__(self) -> None:
        self._for: ForwardContext | None = None
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        if self._for is not ctx:
            self._for, self._kv = ctx, tuple(t.contiguous() for t in self.gather(k_cache, v_cache, ctx))
        return self.attend(q, *self._kv, ctx, scale)


class PeakMemory:
    """Peak memory of one call above what was in use before it (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated() above memory_allocated() before the call"
        else:
            M_MMAP_THRESHOLD = -3
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
            self.method = ("peak resident memory (VmHWM after a /proc/self/clear_refs reset) above VmRSS before "
                           "the call; malloc returns allocations >= 64 KiB to the OS on free")

    def __call__(self, fn: Callable[[], object]) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        base = _proc_status("VmRSS")
        fn()
        return _proc_status("VmHWM") - base


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(fn: Callable[[], object], device: torch.device, peak_memory: PeakMemory, repeats: int,
            slow_limit: float) -> tuple[float, int]:
    """(fastest seconds, peak bytes): a warm-up, a call under the memory probe, then the repeats
    (none when a call already took more than slow_limit)."""
    warmup = timed(fn, device)
    start = time.perf_counter()
    peak = peak_memory(fn)
    times = [time.perf_counter() - start]
    if warmup <= slow_limit:
        times += [timed(fn, device) for _ in range(repeats - 1)]
    return min(times), peak


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    shape = Shape(args.num_heads, args.num_kv_heads, args.head_dim, args.block_size, dtype, device)
    backends = {"naive": get_backend("reference", device), "sdpa": GatherSdpa(), "dense": DenseSdpa(),
                "flash": get_backend("flash", device),
                "cpu" if device.type == "cpu" else "triton": get_backend("auto", device)}
    fast = list(backends)[-1]
    if backends[fast].name != fast:
        raise SystemExit(f"the {fast} backend is not available on {device} (got {backends[fast].name})")
    scale = args.head_dim ** -0.5
    peak_memory = PeakMemory(device)
    cases = [("prefill", b, n) for b in args.batch_sizes for n in args.prefill_lens]
    cases += [("decode", b, n) for b in args.batch_sizes for n in args.decode_lens]

    rows, skipped_after = [], {}
    with tqdm(total=len(cases) * len(backends), desc="bench attention") as bar:
        for kind, batch, length in cases:
            inputs = paged_inputs(shape, batch, length if kind == "prefill" else 1, length)
            results = {}
            # the naive backend holds scores, mask and probabilities of one sequence at a time
            score_bytes = 3 * args.num_heads * (length if kind == "prefill" else 1) * length * 4
            for name, backend in backends.items():
                bar.set_postfix_str(f"{kind} b{batch} L{length} {name}")
                bar.update()
                if (kind, batch, name) in skipped_after:
                    results[name] = {
                        "skipped": f"took over {args.slow_limit:g} s at L={skipped_after[kind, batch, name]}"}
                    continue
                if name == "naive" and score_bytes > args.naive_limit_gb * 2**30:
                    results[name] = {"skipped": f"would materialise {score_bytes / 2**30:.1f} GiB of scores"}
                    continue
                seconds, peak = measure(lambda backend=backend, inputs=inputs: backend.forward(*inputs, scale),
                                        device, peak_memory, args.repeats, args.slow_limit)
                if seconds > args.slow_limit:
                    skipped_after[kind, batch, name] = length
                results[name] = {"time_s": seconds, "peak_bytes": peak}
            base, dense = results["sdpa"].get("time_s"), results["dense"].get("time_s")
            for name, r in results.items():
                rows.append({"case": kind, "batch": batch, "length": length, "backend": name, **r,
                             "time_ms": r["time_s"] * 1e3 if "time_s" in r else None,
                             "peak_MiB": r["peak_bytes"] / 2**20 if "peak_bytes" in r else None,
                             "speedup_vs_sdpa": base / r["time_s"] if base and "time_s" in r else None,
                             "speedup_vs_dense": dense / r["time_s"] if dense and "time_s" in r else None})
            del inputs
            backends["dense"] = DenseSdpa()  # (its copy of this case's K/V let go)

    print(f"\n{shape.num_heads} query heads, {shape.num_kv_heads} KV heads, head_dim {shape.head_dim}, "
          f"block_size {shape.block_size}, {args.dtype or dtype}, {device}")
    print_table(rows, ["case", "batch", "length", "backend", "time_ms", "peak_MiB", "speedup_vs_sdpa",
                       "speedup_vs_dense", "skipped"])
    summary = summarise(rows, fast)
    for key, value in summary.items():
        print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")
    write_json(args.out, {
        "benchmark": "attention", "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim, "block_size": shape.block_size, "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "memory_method": peak_memory.method,
        "results": [{k: v for k, v in r.items() if k not in ("time_ms", "peak_MiB")} for r in rows],
        "machine": machine_info(), "summary": summary,
    })
    if args.plot:
        plot(rows, args.plot, list(backends))


def summarise(rows: list[dict], fast: str) -> dict:
    def get(kind: str, batch: int, length: int, backend: str, key: str) -> float | None:
        return next((r.get(key) for r in rows
                     if (r["case"], r["batch"], r["length"], r["backend"]) == (kind, batch, length, backend)), None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    n = SUMMARY_LENGTH
    summary = {
        f"decode_speedup_{fast}_vs_sdpa_ctx{n}_b8": ratio(get("decode", 8, n, "sdpa", "time_s"),
                                                          get("decode", 8, n, fast, "time_s")),
        # against SDPA over K/V already contiguous: what paging costs the kernel (1.0: nothing)
        f"decode_speedup_{fast}_vs_dense_ctx{n}_b8": ratio(get("decode", 8, n, "dense", "time_s"),
                                                           get("decode", 8, n, fast, "time_s")),
        f"prefill_speedup_{fast}_vs_naive_{n}": ratio(get("prefill", 1, n, "naive", "time_s"),
                                                      get("prefill", 1, n, fast, "time_s")),
        f"prefill_speedup_{fast}_vs_sdpa_{n}": ratio(get("prefill", 1, n, "sdpa", "time_s"),
                                                     get("prefill", 1, n, fast, "time_s")),
        f"prefill_peakmem_naive_over_{fast}_{n}": ratio(get("prefill", 1, n, "naive", "peak_bytes"),
                                                        get("prefill", 1, n, fast, "peak_bytes")),
        # linear memory: doubling the prompt should double the peak, not quadruple it
        f"prefill_peakmem_{fast}_{n}_over_{n // 2}": ratio(get("prefill", 1, n, fast, "peak_bytes"),
                                                           get("prefill", 1, n // 2, fast, "peak_bytes")),
    }
    return summary


def plot(rows: list[dict], path: str, backends: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for col, kind in enumerate(["prefill", "decode"]):
        for row, (key, label) in enumerate([("time_s", "time (s)"),
                                            ("peak_bytes", "peak memory (bytes, floor 4 KiB)")]):
            ax = axes[row][col]
            for i, name in enumerate(backends):
                for batch, style in zip(sorted({r["batch"] for r in rows}), ["-", "--", ":"]):
                    # a peak below one page reads as 0 (VmHWM counts pages): plot it at 4 KiB
                    points = [(r["length"], max(r[key], 4096) if key == "peak_bytes" else r[key]) for r in rows
                              if (r["case"], r["backend"], r["batch"]) == (kind, name, batch) and key in r]
                    if points:
                        ax.plot(*zip(*points), style, marker="o", color=f"C{i}", label=f"{name} b{batch}")
            ax.set(xscale="log", yscale="log", xlabel="prompt length" if kind == "prefill" else "context length",
                   ylabel=label, title=f"{kind}: {label.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
