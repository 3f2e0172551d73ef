"""The CPU decode kernels vs torch's operators."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine import LLM
from models.kernels import decode as cpu_decode
from models.layers import Linear
from models.quant import QType, quantize

from conftest import PROMPT_LEN, paged_logits, save_tiny_model, save_tiny_qwen3

kernel = cpu_decode.compiled()
pytestmark = pytest.mark.skipif(kernel is None, reason="the CPU kernel could not be built here (no compiler?)")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 20, 32])
@pytest.mark.parametrize("in_features", [16, 77, 256])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_matches_torch(rows, in_features, bias):
    gen = torch.Generator().manual_seed(rows * in_features)
    x = torch.randn(rows, in_features, generator=gen)
    w = torch.randn(40, in_features, generator=gen)
    b = torch.randn(40, generator=gen) if bias else None
    assert (kernel.small_batch_linear(x, w, b) - torch.nn.functional.linear(x, w, b)).abs().max() <= 1e-4


def test_bf16_weights_accumulate_in_fp32():
    x = torch.randn(3, 256).bfloat16()
    w = torch.randn(64, 256).bfloat16()
    ref = torch.nn.functional.linear(x.float(), w.float())
    out = kernel.small_batch_linear(x, w, None)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_linear_without_bf16_gemm_widens_tiles_to_fp32(monkeypatch, bias):
    """A prefill-sized bf16 Linear on a CPU without bf16 GEMM instructions: fp32 products of widened tiles of
    rows (three tiles here), rounded once to bf16, as torch's bf16 GEMM rounds its fp32 sums."""
    import models.layers as layers

    monkeypatch.setattr(layers, "bf16_gemm", lambda: False)
    monkeypatch.setattr(layers, "WIDEN_TILE_ELEMENTS", 24 * 64)
    calls = []
    widened = layers.widened_linear
    monkeypatch.setattr(layers, "widened_linear", lambda *args: calls.append(1) or widened(*args))
    linear = Linear(64, 70, bias=bias).to(torch.bfloat16)
    x = torch.randn(2, 40, 64).bfloat16()
    out = linear(x)
    assert calls == [1]
    b = None if linear.bias is None else linear.bias.float()
    ref = torch.nn.functional.linear(x.float(), linear.weight.float(), b)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 40, 70)
    assert (out.float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()  # one bf16 rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_features", [16, 77, 258, 576])
def test_packed_float_weights_match_torch_and_never_depend_on_the_batch(dtype, in_features):
    """repack_float's layout (16 rows interleaved): y = x W^T + b within fp32 rounding (fp16 weights widen
    exactly), or for bf16 weights
    within bf16's rounding of x (vdpbf16ps takes x in bf16, as torch's bf16 linear does); and each row's
    result is bitwise the same computed alone or with others, whatever their number."""
    in_features += dtype == torch.bfloat16 and in_features % 2  # bf16 pairs need an even width
    gen = torch.Generator().manual_seed(in_features)
    w = torch.randn(48, in_features, generator=gen).to(dtype)
    b = torch.randn(48, generator=gen)
    packed = kernel.repack_float(w)
    assert packed is not None and packed.dtype == dtype and packed.dim() == 3
    x = torch.randn(37, in_features, generator=gen)
    out = kernel.small_batch_linear(x, packed, b)
    ref = x.double() @ w.double().T + b.double()
    bound = (x.abs().double() @ w.abs().double().T) * (2 ** -8 if dtype == torch.bfloat16 else 1e-6) + 1e-5
    assert ((out.double() - ref).abs() <= bound).all()
    for rows in (1, 3, 4, 5, 8, 9, 12):
        assert torch.equal(kernel.small_batch_linear(x[:rows], packed, b), out[:rows])
    assert torch.equal(kernel.small_batch_linear(x[7:8], packed, b), out[7:8])


def test_bf16_weights_on_amx_tiles_match_the_vector_path():
    """On CPUs with AMX-BF16, bf16 weights of a multiple of 32 inputs go through tiles at any number of token
    rows (the test above checks their accuracy and batch invariance at 576 inputs): within bf16's rounding of
    the AVX-512 path, whose two chains sum in another order."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "amx_bf16" not in cpuinfo or not kernel.set_amx(True):
        pytest.skip("this CPU (or its OS) gives no AMX-BF16 tiles")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 1024, generator=gen).bfloat16()
    x = torch.randn(20, 1024, generator=gen)
    packed = kernel.repack_float(w)
    tiles = kernel.small_batch_linear(x, packed, None)
    try:
        kernel.set_amx(False)
        vectors = kernel.small_batch_linear(x, packed, None)
    finally:
        kernel.set_amx(True)
    assert not torch.equal(tiles, vectors)  # the tiles ran
    bound = (x.abs().double() @ w.abs().double().T) * 2 ** -8 + 1e-5
    assert ((tiles.double() - vectors.double()).abs() <= bound).all()


@pytest.mark.skipif("avx2" not in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else True,
                    reason="needs an x86 CPU with AVX2 (Linux)")
def test_the_avx2_build_of_the_packed_float_kernels():
    """The float kernels as an AVX2-only CPU builds them (x86-64-v3: other tiles than AVX-512's), run on this
    CPU in a process of their own: the test above."""
    if kernel.isa() != "avx512":  # the build (2.5 min of CI's 2 cores) would be the one the test above ran
        pytest.skip(f"this CPU's own build is the {kernel.isa()} one: the test above ran it")
    test = f"{__file__}::test_packed_float_weights_match_torch_and_never_depend_on_the_batch"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                         env={**os.environ, "GORGON_CPU_ISA": "avx2"}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_repack_float_declines_shapes_it_cannot_lay_out():
    assert kernel.repack_float(torch.randn(40, 64)) is None  # rows not a multiple of 16
    assert kernel.repack_float(torch.randn(32, 63).bfloat16()) is None  # bf16 pairs need an even width
    assert kernel.repack_float(torch.randn(32, 64).to(torch.int8)) is None
    layer = Linear(64, 40)
    cpu_decode.set_decode_kernels(layer, cpu_decode.DecodeKernels(kernel))
    assert layer.packed is None and layer.kernel_weight is layer.weight
    x = torch.randn(2, 64)
    assert (layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)).abs().max() <= 1e-5


def test_weights_are_laid_out_for_the_kernels_only_while_the_copies_fit_the_memory_given(tmp_path, caplog,
                                                                                         monkeypatch):
    """Each packed copy is a second copy of a linear's weights: a model of half the host's memory must still load.
    Past the budget the layers read their weights as they are; an engine's budget is what the host has free, less
    its KV cache's and a headroom; its answers are the same either way."""
    folder = save_tiny_model(tmp_path / "m", hidden_size=64, intermediate_size=128)
    llm = LLM(folder, medusa=None)
    linears = [m for m in llm.model.modules() if hasattr(m, "pack")]
    sizes = [m.weight.numel() * m.weight.element_size() for m in linears]
    assert all(m.packed is not None for m in linears)
    prompt = list(range(3, 3 + PROMPT_LEN))
    packed = paged_logits(llm, prompt)
    budget = sum(sizes[:3])  # the first three fit, then none
    with caplog.at_level("WARNING", logger="gorgon"):
        cpu_decode.set_decode_kernels(llm.model, llm.kernels, budget)
    assert [m.packed is not None for m in linears] == [True] * 3 + [False] * (len(linears) - 3)
    assert f"the weights of {len(linears) - 3} linears ({sum(sizes[3:]) / 2**30:.2f} GiB)" in caplog.text
    assert (paged_logits(llm, prompt) - packed).abs().max() <= 1e-4 * packed.abs().max()
    # the engine's budget: MemAvailable less the KV cache's and the headroom
    monkeypatch.setattr("engine.config.available_memory", lambda device: (1 << 30) + (1 << 30) + 100)
    starved = LLM(folder, medusa=None, kv_cache_memory=1 << 30)
    assert not any(m.packed is not None for m in starved.model.modules() if hasattr(m, "pack"))
    monkeypatch.setattr("engine.config.available_memory", lambda device: None)  # an OS that does not tell: no limit
    assert all(m.packed is not None for m in LLM(folder, medusa=None).model.modules() if hasattr(m, "pack"))


def test_kernel_policy_is_decided_once_and_only_for_small_batches():
    layer = Linear(32, 8)
    assert layer.kernels is None  # a fresh model (training) runs torch's operators, with autograd
    assert cpu_decode.load_decode_kernels(layer) is not None
    assert cpu_decode.load_decode_kernels(Linear(32, 8).double()) is None  # fp64 weights: no kernel
    rows_seen = []

    def spy(x, weight, bias):
        rows_seen.append(len(x))
        return kernel.small_batch_linear(x, weight, bias)

    ops = SimpleNamespace(small_batch_linear=spy, repack_float=kernel.repack_float)
    cpu_decode.set_decode_kernels(layer, cpu_decode.DecodeKernels(ops))
    with torch.inference_mode():
        for rows in (4, cpu_decode.MAX_ROWS, cpu_decode.MAX_ROWS + 1):
            x = torch.randn(rows, 32)
            assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
    assert rows_seen == [4, cpu_decode.MAX_ROWS]  # a larger batch goes to torch's GEMM


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fused_decoder_layers_match_the_operator_path(tmp_path, dtype, arch):
    """Prefill (21 rows) and decode steps through the fused kernels vs through torch's operators, on a
    model with every optional bias and a head_dim that is not a multiple of the vector width, and on Qwen3's
    q/k norms."""
    folder = (save_tiny_model(tmp_path, attention_bias=True, mlp_bias=True, head_dim=24) if arch == "llama"
              else save_tiny_qwen3(tmp_path, head_dim=24))
    tokens = torch.randint(3, 256, (PROMPT_LEN + 8,), generator=torch.Generator().manual_seed(2)).tolist()
    fused = paged_logits(LLM(folder, dtype=dtype, num_kv_blocks=16, block_size=4), tokens).float()
    plain = paged_logits(LLM(folder, dtype=dtype, num_kv_blocks=16, block_size=4, cpu_kernels=False), tokens).float()
    tolerance = 1e-4 if dtype == "float32" else 0.03 * plain.abs().max().item()
    assert (fused - plain).abs().max().item() <= tolerance


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_decoder_stack_is_the_layer_calls_made_one_by_one(tmp_path, dtype, monkeypatch, arch):
    """LlamaForCausalLM runs its layers as one C++ call (DecoderStack); the same steps through forward_fused
    layer by layer from Python give bitwise the same logits, prefill and decode."""
    folder = (save_tiny_model(tmp_path, attention_bias=True, head_dim=24) if arch == "llama"
              else save_tiny_qwen3(tmp_path, head_dim=24))
    tokens = torch.randint(3, 256, (PROMPT_LEN + 8,), generator=torch.Generator().manual_seed(3)).tolist()
    llm = LLM(folder, dtype=dtype, num_kv_blocks=16, block_size=4, attention_backend="cpu")
    stacked = paged_logits(llm, tokens)
    assert llm.model._stack is not None
    monkeypatch.setattr(type(llm.model), "_decoder_stack", lambda self: None)
    assert torch.equal(paged_logits(llm, tokens), stacked)


@pytest.mark.parametrize("rows", [1, 3, 12])
def test_medusa_drafts_and_rms_norm_match_torch(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=gen)
    weights = [torch.randn(48, 48, generator=gen) / 7 for _ in range(6)]  # 3 heads x 2 blocks
    biases = [torch.randn(48, generator=gen) for _ in range(6)]
    projections = [torch.randn(100, 48, generator=gen) for _ in range(3)]
    states = []
    for h in range(3):
        state = x
        for w, b in zip(weights[2 * h:2 * h + 2], biases[2 * h:2 * h + 2]):
            state = state + torch.nn.functional.silu(torch.nn.functional.linear(state, w, b))
        states.append(state)
    shared = torch.stack([torch.nn.functional.linear(s, projections[0]) for s in states])
    own = torch.stack([torch.nn.functional.linear(s, p) for s, p in zip(states, projections)])
    for logits, given in ((shared, projections[:1]), (own, projections)):
        for k in (1, 4):
            drafts = kernel.medusa_top_k(x, weights, biases, 3, given, k)
            assert drafts.shape == (3, rows, k)
            # the drafts are the top-k (a tie-safe check: their logits are the k largest, largest first)
            picked = logits.gather(-1, drafts)
            assert (picked - logits.topk(k, dim=-1).values).abs().max() <= 1e-4
            same, logprobs = kernel.medusa_top_k_logprobs(x, weights, biases, 3, given, k)
            assert torch.equal(same, drafts)
            assert (logprobs - logits.log_softmax(dim=-1).gather(-1, drafts)).abs().max() <= 1e-4
    assert torch.equal(kernel.medusa_top_k(x, weights, biases, 3, projections[:1], 1)[..., 0], shared.argmax(-1))
    w = biases[0]
    assert (kernel.rms_norm(x, w, 1e-6) - torch.nn.functional.rms_norm(x, (48,), w, 1e-6)).abs().max() <= 1e-4


@pytest.mark.parametrize("q8", [False, True])
@pytest.mark.parametrize("rows", [1, 5])
def test_hydra_level_matches_torch(rows, q8):
    """One level of Hydra drafting in one call: x = state + W_in [state, embedding] + b_in, then the blocks,
    the projection, the top-k and their log-probabilities, as the heads compute them in torch. The weights float,
    or in Q8_0 blocks as drafting keeps them on a CPU (laid out for the kernels, which quantize the activations
    too): against the weights dequantized."""
    gen = torch.Generator().manual_seed(rows)
    h = 64 if q8 else 48  # Q8_0 blocks hold 32 weights
    states, embeddings = torch.randn(rows, h, generator=gen), torch.randn(rows, h, generator=gen)
    input_weight, input_bias = torch.randn(h, 2 * h, generator=gen) / 10, torch.randn(h, generator=gen)
    weights = [torch.randn(h, h, generator=gen) / 7 for _ in range(2)]
    biases = [torch.randn(h, generator=gen) for _ in range(2)]
    projection = torch.randn(100, h, generator=gen)
    given = [input_weight, weights, projection]
    if q8:
        def q8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            blocks = quantize(w, QType.Q8_0)
            packed = kernel.repack(blocks.data, int(QType.Q8_0), w.shape[1])
            return blocks.data if packed is None else packed, blocks.dequantize()
        (given_input, input_weight), (given_projection, projection) = map(q8_blocks, (input_weight, projection))
        given_weights, weights = map(list, zip(*map(q8_blocks, weights)))
        given = [given_input, given_weights, given_projection]
    x = states + torch.nn.functional.linear(torch.cat([states, embeddings], dim=-1), input_weight, input_bias)
    state = x
    for w, b in zip(weights, biases):
        state = state + torch.nn.functional.silu(torch.nn.functional.linear(state, w, b))
    logits = torch.nn.functional.linear(state, projection)
    qtype = int(QType.Q8_0) if q8 else 0
    got_x, top, logprobs = kernel.hydra_level(states, embeddings, given[0], input_bias, given[1], biases, given[2], 3,
                                              qtype, qtype)
    assert (got_x - x).abs().max() <= (0.03 if q8 else 1e-4)
    assert top.shape == logprobs.shape == (rows, 3)
    picked = logits.gather(-1, top).sort(dim=-1, descending=True).values  # near-ties may swap in Q8_0
    assert (picked - logits.topk(3, dim=-1).values).abs().max() <= (0.1 if q8 else 1e-3)
    # the log-probabilities of the tokens picked, under the softmax over all 100 rows, largest first (Q8_0: these
    # random logits span ~60, and the kernel quantizes the activations too)
    assert (logprobs - logits.log_softmax(dim=-1).gather(-1, top)).abs().max() <= (1.0 if q8 else 1e-4)
    assert (logprobs.diff(dim=-1) <= 0).all()


@pytest.mark.parametrize("columns", [1, 7, 16, 100, 49152])
def test_argmax_rows_matches_torch(columns):
    """The first largest entry of each row, as torch.argmax: random rows, rows of many ties, -inf rows."""
    gen = torch.Generator().manual_seed(columns)
    for x in (torch.randn(5, columns, generator=gen), torch.randint(0, 3, (33, columns), generator=gen).float(),
              torch.full((2, columns), float("-inf"))):
        assert torch.equal(kernel.argmax_rows(x), x.argmax(dim=-1))
        assert torch.equal(kernel.argmax_rows(x.bfloat16()), x.bfloat16().argmax(dim=-1))


def test_a_build_killed_midway_does_not_stall_the_next_load():
    """torch's `lock` file, which a build killed midway leaves behind, made every later load wait forever."""
    build_dir = Path(kernel.__file__).parent
    (build_dir / "lock").touch()
    load = "from models.kernels import build; build('gorgon_cpu_decode', 'decode.cpp', python_module=True)"
    done = subprocess.run([sys.executable, "-c", load], cwd=Path(__file__).parents[1], timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (build_dir / "lock").exists()


def test_two_environments_keep_separate_builds(monkeypatch):
    """ninja rebuilds when a compile command changes, and the command names the environment's include folders:
    a clean clone's venv sharing the working tree's build recompiled it, silently, on every alternate load."""
    import sysconfig

    from models.kernels import build_folder

    here = build_folder("gorgon_cpu_decode", "decode.cpp")
    assert build_folder("gorgon_cpu_decode", "decode.cpp") == here
    paths = {**sysconfig.get_paths(), "include": "/elsewhere/include/python3.11"}
    monkeypatch.setattr(sysconfig, "get_paths", lambda: paths)
    assert build_folder("gorgon_cpu_decode", "decode.cpp") != here


def test_a_finished_build_on_a_read_only_mount_loads_without_its_locks(tmp_path):
    """A cache baked into a container image, or shared read-only: the lock files could not be opened, and gorgon
    fell back to torch's operators and the flash backend; with no build there, the error names the way out."""
    from engine.attention.cpu import load_extension
    from models.kernels import build_folder

    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespace here (unshare -m) to mount the build cache read-only")
    assert load_extension()
    cache, empty = tmp_path / "cache", tmp_path / "empty"
    for name, source in [("gorgon_cpu_decode", "decode.cpp"), ("gorgon_attention", "attention.cpp")]:
        built = build_folder(name, source)
        shutil.copytree(built, cache / built.name)
    empty.mkdir()
    load = ("import sys; from models.kernels import build; "
            "build('gorgon_attention', 'attention.cpp', python_module=False); "
            "print(build('gorgon_cpu_decode', 'decode.cpp', python_module=True).quantized_linear.__name__)")
    script = (f"mount --bind -o ro {cache} {cache} && mount --bind -o ro {empty} {empty} && "
              f"GORGON_EXTENSIONS_DIR={cache} {sys.executable} -c \"{load}\" && "
              f"GORGON_EXTENSIONS_DIR={empty} {sys.executable} -c \"{load}\"")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=Path(__file__).parents[1], timeout=300,
                          capture_output=True, text=True)
    assert done.stdout.splitlines() == ["quantized_linear"], done.stderr
    assert "Read-only file system" in done.stderr and "set GORGON_EXTENSIONS_DIR to a writable folder" in done.stderr


def test_a_new_build_removes_builds_left_unused_for_a_month(tmp_path):
    """Each source change left a build folder behind for ever (40 of them here, 120 MB)."""
    from models.kernels import remove_unused_builds

    folders = {age: tmp_path / f"gorgon_cpu_decode-{age}" for age in ("new", "recent", "old", "no_lock")}
    for age, folder in folders.items():
        folder.mkdir()
        if age != "no_lock":
            (folder / "gorgon.lock").touch()
    month = 31 * 86400
    os.utime(folders["old"] / "gorgon.lock", (time.time() - month, time.time() - month))
    other_kernel = tmp_path / "gorgon_attention-old"
    other_kernel.mkdir()
    (other_kernel / "gorgon.lock").touch()
    os.utime(other_kernel / "gorgon.lock", (time.time() - month, time.time() - month))
    remove_unused_builds("gorgon_cpu_decode", folders["new"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gorgon_attention-old", "gorgon_cpu_decode-new", "gorgon_cpu_decode-no_lock", "gorgon_cpu_decode-recent"]
