"""The CUDA path, where torch sees a GPU (skipped, saying so, elsewhere: CI has none). The oracles are the CPU
suite's: every architecture's logits against transformers, bf16 as close as transformers' own bf16, a quantized
GGUF file against its dequantized path, LoRA and prefix adapters in one batch against PEFT, Medusa greedy token
for token against plain greedy, decode steps replayed from CUDA graphs against eager ones; and no host-device
sync inside a forward. The Triton kernel's own tests (test_attention.py, test_engine_features.py) run on the GPU
there too."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from gguf import GGMLQuantizationType as QType
from test_adapters import ADAPTERS, PROMPTS, make_llm, one_step_logits, setup  # noqa: F401 (setup: a fixture)
from test_gguf import our_logits, write_gguf
from test_models import MODEL_CASES, check_against_hf
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from models import DEFAULT_MODEL_DIR

from conftest import PROMPT_LEN, hf_model, paged_logits, save_tiny_model

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device here: the CUDA path is checked on a GPU machine"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed: CUDA attends with its kernel (pip install gorgon[triton])"),
]
CODE_PROMPTS = ["def fibonacci(n):\n", "import numpy as np\n\n\ndef", "class Stack:\n    def __init__(self):",
                "for i in range(10):\n"]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_architectures_match_hf_on_cuda(tmp_path, case):
    arch, overrides = MODEL_CASES[case]
    check_against_hf(save_tiny_model(tmp_path, arch, **overrides), device="cuda")


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.float() - reference).norm() / reference.norm()).item()


def test_bf16_on_cuda_is_as_close_as_transformers_bf16(tiny_model_dir):
    """Our bf16 logits (prefill and paged decode steps) stay as close to the fp32 model's as transformers' own
    bf16 forward on the GPU does."""
    tokens = torch.randint(3, 256, (PROMPT_LEN + 16,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = paged_logits(LLM(tiny_model_dir, device="cuda", dtype="bfloat16", num_kv_blocks=32, block_size=4), tokens)
    with torch.no_grad():
        exact = hf_model(tiny_model_dir)(torch.tensor([tokens])).logits[0]
        hf_bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda().eval()
        theirs = hf_bf16(torch.tensor([tokens], device="cuda")).logits[0]
    assert ours.dtype == torch.bfloat16
    assert relative_error(ours.cpu(), exact) <= max(2 * relative_error(theirs.cpu(), exact), 1e-2)


def test_a_quantized_gguf_file_on_cuda_is_its_dequantized_model(tmp_path, tiny_model_dir):
    """Off the CPU, quantized tensors are dequantized at load: the same function as the CPU's exact path."""
    types = {"attn_q": QType.Q8_0, "attn_k": QType.Q5_0, "attn_v": QType.Q5_1, "attn_output": QType.Q4_0,
             "ffn_gate": QType.Q4_1, "ffn_up": QType.Q4_1, "ffn_down": QType.Q8_0, "output": QType.Q8_0}
    file = write_gguf(hf_model(tiny_model_dir), tmp_path / "q.gguf",
                      qtype_of=lambda name, w: types.get(name.split(".")[-2]))
    tokens = torch.randint(3, 256, (PROMPT_LEN + 8,), generator=torch.Generator().manual_seed(3)).tolist()
    llm = LLM(file, device="cuda", dtype="float32", num_kv_blocks=32, block_size=4)
    assert llm.config.kv_cache_dtype == "float16"  # a GGUF file's cache, as on the CPU
    llm = LLM(file, device="cuda", dtype="float32", kv_cache_dtype="float32", num_kv_blocks=32, block_size=4)
    expected = our_logits(file, torch.tensor([tokens]))[0]
    assert (paged_logits(llm, tokens).cpu() - expected).abs().max().item() <= 1e-4


def test_lora_and_prefix_adapters_in_one_batch_match_peft_on_cuda(setup):  # noqa: F811
    llm = make_llm(setup, device="cuda", dtype="float32", enable_prefix_caching=False)
    adapters = ["all", None, "prefix5", "rs_qv", "prefix8", "mlp"]
    assert set(adapters) - {None} <= set(ADAPTERS)
    free = llm.num_free_blocks
    for i, (ours, adapter) in enumerate(zip(one_step_logits(llm, PROMPTS, adapters), adapters)):
        assert (ours.cpu() - setup[2][adapter][i]).abs().max().item() <= 1e-4, adapter
    assert llm.num_free_blocks == free


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "medusa").is_dir(), reason="the default model's heads are not shipped")
def test_medusa_greedy_equals_plain_greedy_on_cuda():
    """The shipped model and heads in fp32 (where a tree step's rows and a decode step's agree to rounding):
    four requests of different lengths at once, token for token, every KV block back."""
    llm = LLM(medusa=str(DEFAULT_MODEL_DIR / "medusa"), device="cuda", dtype="float32")
    lengths = [48, 31, 40, 17]
    plain = llm.generate(CODE_PROMPTS, [SamplingParams(max_tokens=n, temperature=0, use_medusa=False)
                                        for n in lengths])
    medusa = llm.generate(CODE_PROMPTS, [SamplingParams(max_tokens=n, temperature=0) for n in lengths])
    assert [o.token_ids for o in medusa] == [o.token_ids for o in plain]
    steps = [n for o in medusa for n in o.accepted_lengths]
    assert sum(steps) / len(steps) > 1.5
    assert llm.num_free_blocks == llm.block_manager.num_blocks


def test_decode_graphs_replay_eager_decoding_token_for_token(tiny_model_dir):
    """Five requests of different lengths finish at different steps, so the decode batches shrink through padded
    graph sizes (8, 4, 2, 1); a prompt chunk beside decodes runs eagerly. fp32: the same tokens, every block back."""
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 2, 30, 9)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (20, 7, 33, 12, 25)]
    kwargs = dict(device="cuda", dtype="float32", block_size=4, num_kv_blocks=128, max_num_seqs=8,
                  max_num_batched_tokens=16)
    eager = LLM(tiny_model_dir, cuda_graphs=False, **kwargs)
    graphed = LLM(tiny_model_dir, **kwargs)
    assert eager.runner.graphs is None and graphed.runner.graphs.sizes == [1, 2, 4, 8]
    expected = [o.token_ids for o in eager.generate(prompts, params)]
    assert [o.token_ids for o in graphed.generate(prompts, params)] == expected
    assert graphed.runner.graphs.num_replays >= 30
    assert graphed.num_free_blocks == 128


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "medusa").is_dir(), reason="the default model's heads are not shipped")
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_no_forward_syncs_the_host_with_the_device(monkeypatch, cuda_graphs):
    """Prefills, decode steps (replayed from graphs, or eager) and Medusa tree steps, in bf16: every forward runs
    under CUDA's sync check, which raises at any operation that waits for the device (.item(), a device-to-host
    copy, nonzero)."""
    llm = LLM(medusa=str(DEFAULT_MODEL_DIR / "medusa"), device="cuda", cuda_graphs=cuda_graphs)
    forward, trees = llm.runner.forward, []

    def checked_forward(inputs):
        trees.append(inputs.ctx.tree_mask is not None)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return forward(inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(llm.runner, "forward", checked_forward)
    llm.generate(CODE_PROMPTS, SamplingParams(max_tokens=24, temperature=0))
    llm.generate(CODE_PROMPTS, SamplingParams(max_tokens=8, temperature=0, use_medusa=False))
    assert True in trees and False in trees
    assert (llm.runner.graphs is not None and llm.runner.graphs.num_replays > 0) == cuda_graphs
