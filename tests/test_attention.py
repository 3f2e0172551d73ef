"""Every attention backend against the reference on random paged inputs: block sizes 1 and 16, odd
lengths, GQA, prefill / decode / mixed batches, tree masks, split keys, fp32 and bf16.

The Triton kernel runs on the GPU where torch sees one, else in Triton's interpreter (conftest.py sets
TRITON_INTERPRET)."""
from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.attention import available_backends, get_backend
from engine.attention.reference import ReferenceAttention
from engine.medusa.tree import TREES, build_tree
from models.context import ForwardContext

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install gorgon[triton])")

HAS_CPU_KERNEL = "cpu" in available_backends("cpu")
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="the fused CPU attention kernel could not be built")

BACKENDS = ["flash", pytest.param("cpu", marks=needs_cpu_kernel), pytest.param("triton", marks=needs_triton)]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # bf16: a couple of ulps at |out| ~ 2
TREE = torch.tensor([[1, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [1, 0, 1, 0, 0],
                     [1, 1, 0, 1, 0],
                     [1, 0, 1, 0, 1]], dtype=torch.bool)
CHAIN = torch.tensor([[1, 0, 0, 0, 0],  # another tree of 5 nodes: a root with a child and a chain of three
                      [1, 1, 0, 0, 0],
                      [1, 0, 1, 0, 0],
                      [1, 0, 1, 1, 0],
                      [1, 0, 1, 1, 1]], dtype=torch.bool)
CAUSAL = torch.ones(5, 5, dtype=torch.bool).tril()  # a sequence beside the trees that verifies none

# name -> (query_lens, context_lens, num_heads, num_kv_heads, head_dim, tree masks: one per sequence)
CASES = {
    "prefill_odd": ([37], [37], 4, 2, 16, None),
    "decode_batch": ([1, 1, 1], [1, 17, 300], 4, 2, 16, None),
    "mixed_chunk_and_decodes": ([40, 1, 1], [56, 5, 70], 4, 2, 16, None),
    "mha_head_dim_24": ([9, 1], [9, 40], 2, 2, 24, None),
    "gqa_4_to_1": ([21], [50], 8, 2, 16, None),
    "tree_verify": ([5, 7], [5, 23], 4, 2, 16, [TREE, TREE]),
    # trees of different shapes beside a prefill chunk, a prompt shorter than the trees and a decode step
    "trees_beside_prefill_and_decode": ([5, 40, 3, 1, 5], [30, 56, 3, 70, 9], 4, 2, 16,
                                        [TREE, CAUSAL, CAUSAL, CAUSAL, CHAIN]),
    # head_dim a multiple of 32: on CPUs with AMX-BF16 the cpu kernel's bf16 scores are tile products
    "head_dim_64_prefill_and_decodes": ([70, 1, 1], [70, 9, 130], 6, 2, 64, None),
    "head_dim_64_tree_verify": ([5, 5], [40, 100], 6, 2, 64, [TREE, CHAIN]),
}


def paged_inputs(query_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int,
                 head_dim: int, block_size: int, dtype: torch.dtype, tree_masks: list[torch.Tensor] | None = None,
                 seed: int = 0):
    """Random q/k/v for the new tokens and a random cache, each sequence's blocks scattered over it."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in blocks_per_seq:
        tables.append(order[used:used + n])
        used += n
    max_blocks = max(blocks_per_seq)
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    num_tokens = sum(query_lens)
    q = randn(num_tokens, num_heads, head_dim)
    k, v = randn(num_tokens, num_kv_heads, head_dim), randn(num_tokens, num_kv_heads, head_dim)
    slots = [t[p // block_size] * block_size + p % block_size
             for t, n, c in zip(tables, query_lens, context_lens) for p in range(c - n, c)]
    query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.tensor(query_lens).cumsum(0)
    ctx = ForwardContext(positions=torch.zeros(num_tokens, dtype=torch.long), slot_mapping=torch.tensor(slots),
                         query_start_loc=query_start_loc, context_lens=torch.tensor(context_lens, dtype=torch.int32),
                         block_tables=block_tables, query_lens_cpu=list(query_lens),
                         context_lens_cpu=list(context_lens),
                         tree_mask=None if tree_masks is None else torch.stack(tree_masks))
    return q, k, v, k_cache, v_cache, ctx


def device_of(backend) -> torch.device:
    """Where a backend's tests run: Triton's on the GPU when there is one, every other on the CPU."""
    return torch.device("cuda" if backend.name == "triton" and torch.cuda.is_available() else "cpu")


def run_backend(backend, inputs, scale: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backend's output and the caches it wrote to, computed on its device and returned on the CPU."""
    device = device_of(backend)
    q, k, v, k_cache, v_cache = (t.to(device, copy=True) for t in inputs[:5])
    out = backend.forward(q, k, v, k_cache, v_cache, inputs[5].to(device), scale)
    return out.cpu(), k_cache.cpu(), v_cache.cpu()


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_matches_reference(name, case, block_size, dtype):
    inputs = paged_inputs(*CASES[case][:5], block_size, dtype, CASES[case][5])
    expected, k_ref, v_ref = run_backend(ReferenceAttention(), inputs)
    out, k_cache, v_cache = run_backend(get_backend(name, "cpu"), inputs)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert max_error(out, expected) <= TOLERANCE[dtype]
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)  # new K/V stored in their slots


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["reference", *BACKENDS])
def test_fp32_queries_over_a_16bit_cache(name, case, cache_dtype):
    """An fp32 model with kv_cache_dtype bf16/fp16: the new K/V are stored rounded, and attention computes in fp32
    over the cache's values, exactly as over an fp32 cache that holds those rounded values (the cpu kernel: bitwise)."""
    q, k, v, k_cache, v_cache, ctx = paged_inputs(*CASES[case][:5], 16, torch.float32, CASES[case][5])
    rounded = [t.to(cache_dtype) for t in (k, v, k_cache, v_cache)]
    backend = get_backend(name, "cpu")
    expected, k_ref, v_ref = run_backend(backend, (q, *(t.float() for t in rounded), ctx))
    out, k_cache, v_cache = run_backend(backend, (q, k, v, *rounded[2:], ctx))
    assert out.dtype == torch.float32 and k_cache.dtype == cache_dtype
    assert torch.equal(k_cache.float(), k_ref) and torch.equal(v_cache.float(), v_ref)
    if name == "cpu":
        assert torch.equal(out, expected)
    else:
        assert max_error(out, expected) <= TOLERANCE[torch.float32]


@needs_cpu_kernel
def test_the_cpu_kernel_refuses_a_cache_wider_than_its_queries():
    q, k, v, k_cache, v_cache, ctx = paged_inputs([3], [9], 4, 2, 16, 16, torch.bfloat16)
    with pytest.raises(RuntimeError, match="bf16/fp16 for an fp32 q"):
        get_backend("cpu", "cpu").forward(q, k, v, k_cache.float(), v_cache.float(), ctx, 0.3)


@pytest.mark.parametrize("name", ["flash", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_long_context_decode_with_split_keys(name):
    """A long context's keys are split (flash-decoding; the cpu kernel: every 512 positions) and the parts
    combined."""
    inputs = paged_inputs([1], [2500], 4, 2, 16, 16, torch.float32)
    expected, _, _ = run_backend(ReferenceAttention(), inputs)
    out, _, _ = run_backend(get_backend(name, "cpu"), inputs)
    assert max_error(out, expected) <= TOLERANCE[torch.float32]


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_split_keys_combine_exactly(num_splits):
    from engine.attention.triton import paged_attention

    masks = [TREE[:4, :4], CAUSAL[:4, :4], CHAIN[:4, :4]]
    inputs = paged_inputs([4, 4, 6], [300, 7, 140], 4, 2, 16, 16, torch.float32, masks)
    expected, k_cache, v_cache = run_backend(ReferenceAttention(), inputs)
    device = device_of(get_backend("triton", "cpu"))
    q, ctx = inputs[0].to(device), inputs[5].to(device)
    out = paged_attention(q, k_cache.to(device), v_cache.to(device), ctx, 0.3, num_splits=num_splits).cpu()
    assert max_error(out, expected) <= TOLERANCE[torch.float32]


def test_registry_prefers_the_fused_kernel_on_cpu():
    from engine.attention.cpu import load_extension

    if not load_extension():
        pytest.skip("no C++ compiler here: the cpu kernel cannot be built")
    names = available_backends("cpu")
    assert names[0] == "cpu" and names[-2:] == ["flash", "reference"]
    assert get_backend("auto", "cpu").name == "cpu"
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend("nope", "cpu")


def test_without_a_compiler_auto_picks_flash_once_warned_and_cpu_is_refused(monkeypatch, tmp_path):
    from engine.attention import cpu

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GORGON_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "load_extension", functools.cache(cpu.load_extension.__wrapped__))
    with pytest.warns(RuntimeWarning, match="could not be built") as warned:
        names = [get_backend("auto", "cpu").name for _ in range(3)]
    assert names == ["flash"] * 3 and len(warned) == 1
    with pytest.raises(ValueError, match="'cpu' attention backend cannot run"):
        get_backend("cpu", "cpu")


def test_attention_benchmark_writes_its_json_and_plot(tmp_path):
    """`gorgon bench attention` end to end, tiny. In a child process: its memory probe retunes malloc."""
    out, plot = tmp_path / "attention.json", tmp_path / "attention.png"
    subprocess.run([sys.executable, "-m", "server.cli", "bench", "attention", "--out", str(out), "--plot", str(plot),
                    "--prefill-lens", "48", "--decode-lens", "48", "--batch-sizes", "2", "--num-heads", "2",
                    "--num-kv-heads", "1", "--head-dim", "16", "--repeats", "1"],
                   check=True, capture_output=True, cwd=Path(__file__).parents[1])
    result = json.loads(out.read_text())
    assert {(r["case"], r["backend"]) for r in result["results"]} == {
        (case, name) for case in ("prefill", "decode") for name in ("naive", "sdpa", "dense", "flash", "cpu")}
    assert all(r["time_s"] > 0 and r["peak_bytes"] >= 0 for r in result["results"])
    assert {"decode_speedup_cpu_vs_sdpa_ctx4096_b8", "decode_speedup_cpu_vs_dense_ctx4096_b8",
            "prefill_speedup_cpu_vs_naive_4096",
            "prefill_speedup_cpu_vs_sdpa_4096", "prefill_peakmem_naive_over_cpu_4096"} <= set(result["summary"])
    assert plot.stat().st_size > 0


def attend_one_sequence(backend, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        tree_mask: torch.Tensor | None = None, block_size: int = 16) -> torch.Tensor:
    """Attention of one sequence whose cache holds `keys`/`values` [n, kv heads, D] in order, the last
    len(q) of them new this step."""
    n, new = keys.shape[0], q.shape[0]
    num_blocks = -(-n // block_size)
    k_cache = torch.zeros(num_blocks * block_size, *keys.shape[1:], dtype=keys.dtype)
    v_cache = torch.zeros_like(k_cache)
    k_cache[:n - new], v_cache[:n - new] = keys[:n - new], values[:n - new]
    ctx = ForwardContext(positions=torch.zeros(new, dtype=torch.long), slot_mapping=torch.arange(n - new, n),
                         query_start_loc=torch.tensor([0, new], dtype=torch.int32),
                         context_lens=torch.tensor([n], dtype=torch.int32),
                         block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
                         query_lens_cpu=[new], context_lens_cpu=[n],
                         tree_mask=None if tree_mask is None else tree_mask[None])
    return backend.forward(q, keys[n - new:], values[n - new:], k_cache.view(num_blocks, block_size, *keys.shape[1:]),
                           v_cache.view(num_blocks, block_size, *keys.shape[1:]), ctx, 0.25)


@needs_cpu_kernel
@pytest.mark.parametrize("head_dim", [16, 64])  # 64: the bf16 scores on AMX tiles, where the CPU has them
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("prefix", [5, 58, 62, 130, 1020])  # the tree within a key tile or split, or across
def test_branching_tree_rows_are_bitwise_plain_decode_of_their_paths(dtype, prefix, head_dim):
    """Batch invariance on a branching tree: node i's row equals a plain decode step over the prefix and i's
    ancestors laid out in order, although its siblings sit between them in the cache."""
    tree = build_tree(TREES["cpu12"])
    gen = torch.Generator().manual_seed(prefix)
    keys, values = (torch.randn(prefix + tree.size, 2, head_dim, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(tree.size, 6, head_dim, generator=gen).to(dtype)
    backend = get_backend("cpu", "cpu")
    tree_rows = attend_one_sequence(backend, q, keys, values, tree.mask)
    for node in range(tree.size):
        path = [node]
        while path[-1]:
            path.append(tree.parents[path[-1]])
        seen = torch.tensor([prefix + i for i in reversed(path)])
        plain = attend_one_sequence(backend, q[node:node + 1], torch.cat([keys[:prefix], keys[seen]]),
                                    torch.cat([values[:prefix], values[seen]]))
        assert torch.equal(plain[0], tree_rows[node]), f"node {node} (depth {tree.depths[node]})"


@needs_cpu_kernel
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_of_a_long_prefill_are_bitwise_decode_steps(dtype, head_dim):
    """The keys are split at fixed positions, so a row past a split point is the same whether its position is
    computed in a prefill (many rows, many units) or in a decode step alone."""
    gen = torch.Generator().manual_seed(1)
    keys, values = (torch.randn(1100, 2, head_dim, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(1100, 4, head_dim, generator=gen).to(dtype)
    backend = get_backend("cpu", "cpu")
    prefill = attend_one_sequence(backend, q, keys, values)
    for position in (100, 511, 512, 1023, 1099):
        n = position + 1
        decode = attend_one_sequence(backend, q[position:n], keys[:n], values[:n])
        assert torch.equal(decode[0], prefill[position]), f"position {position}"


def test_the_triton_backend_off_cuda_is_refused_at_load(monkeypatch):
    """Outside Triton's interpreter (TRITON_INTERPRET=1, which the tests set), Triton's kernels need CUDA: a server
    asked for them on the CPU is refused at start, rather than fail every request."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="'triton' attention backend cannot run on cpu"):
        get_backend("triton", "cpu")
