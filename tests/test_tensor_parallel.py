"""Tensor parallelism (engine.parallel, models.parallel) against the same engine on one process: greedy tokens
identical and logits within 1e-4, for TP=2 and TP=3, with Medusa, mixed LoRA batches and prefix adapters,
quantized weights (GGUF); clear errors for models that do not split; a killed worker turns the server unhealthy
(503) instead of hanging it; two "hosts" on loopback, each a launch of its own."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig
from test_adapters import build_peft, one_step_logits
from test_gguf import write_gguf
from test_medusa_paths import check_lossless, prompts
from test_server import serve

from engine import LLM, SamplingParams
from engine.parallel import WorkerFailure
from models.loader import load_model
from models.medusa import MedusaConfig, MedusaHeads, save_medusa_heads
from models.parallel import TensorParallel, shard_model
from models.quant import MixedQuantizedLinear, QType, QuantizedEmbedding, quantize

from conftest import hf_model, paged_logits, save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, use_medusa=False)
TOKENS = [(7 * i + 3) % 256 for i in range(28)]  # a prompt, then one token a step (conftest.paged_logits)
ADAPTERS = {"all": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]),
            "qv_down": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
            "prefix6": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)}  # a pinned block and a tail


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A model whose heads (12), KV heads (6) and MLP (192) split over 2 and 3 ranks, with biases on every
    projection (column- and row-parallel ones), random Medusa heads that share its LM head, and adapters."""
    root = tmp_path_factory.mktemp("tp")
    folder = save_tiny_model(root / "model", hidden_size=96, intermediate_size=192, num_attention_heads=12,
                             num_key_value_heads=6, attention_bias=True, mlp_bias=True)
    heads = root / "heads"
    save_medusa_heads(MedusaHeads(MedusaConfig(num_heads=4, num_layers=1, hidden_size=96, vocab_size=256,
                                               own_lm_head=False)), heads)
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        build_peft(folder, config, root / "adapters" / name, seed)
    return folder, heads, root / "adapters"


def engine_kwargs(model: tuple[Path, Path, Path]) -> dict:
    return dict(block_size=4, num_kv_blocks=160, adapter_root=str(model[2]), enable_prefix_caching=False)


def load_loras(llm: LLM) -> None:
    for name in ("all", "qv_down"):
        llm.load_adapter(name, name)


@pytest.fixture(scope="module")
def reference(model) -> LLM:
    llm = LLM(model[0], **engine_kwargs(model))
    load_loras(llm)
    return llm


@pytest.fixture(scope="class", params=[2, 3], ids=["tp2", "tp3"])
def tp(request, model):
    llm = LLM(model[0], tensor_parallel_size=request.param, medusa=str(model[1]), medusa_tree="cpu6",
              **engine_kwargs(model))
    load_loras(llm)
    yield llm
    workers = llm.parallel.workers
    llm.close()
    assert [w.exitcode for w in workers] == [0] * len(workers)  # a clean shutdown
    with pytest.raises(WorkerFailure, match="closed"):
        llm.generate([1, 2, 3], GREEDY)


class TestAgainstOneProcess:
    """Each engine in turn (one torch.distributed group per process at a time)."""

    def test_greedy_tokens_and_logits(self, tp, reference):
        ps = prompts(3)
        assert [o.token_ids for o in tp.generate(ps, GREEDY)] == [o.token_ids for o in reference.generate(ps, GREEDY)]
        torch.testing.assert_close(paged_logits(tp, TOKENS), paged_logits(reference, TOKENS), atol=1e-4, rtol=0)

    def test_mixed_adapter_batch(self, tp, reference):
        """Two LoRAs (column- and row-parallel projections) and a prefix adapter (virtual K/V split by KV head)
        beside the base model, in one forward."""
        ps, adapters = prompts(4), [None, "all", "qv_down", "prefix6"]
        for llm in (tp, reference):
            llm.load_adapter("prefix6", "prefix6")
        try:
            for ours, want in zip(one_step_logits(tp, ps, adapters), one_step_logits(reference, ps, adapters)):
                torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
            assert ([o.token_ids for o in tp.generate(ps, GREEDY, adapter=adapters)]
                    == [o.token_ids for o in reference.generate(ps, GREEDY, adapter=adapters)])
        finally:
            for llm in (tp, reference):
                llm.unload_adapter("prefix6")

    def test_medusa_drafts_from_the_whole_lm_head_and_stays_lossless(self, tp, reference):
        """Drafting projects onto the LM head gathered from the ranks; tree verification (with LoRA rows, and
        the accepted K/V moved on every rank) gives plain greedy decoding's tokens."""
        assert tp.medusa.model.model.embed_tokens is None  # Medusa heads read no embedding: none gathered
        drafting = tp.medusa.draft_weights  # the whole LM head, in Q8_0 blocks as the CPU kernels draft over it
        assert drafting.projection_qtype == QType.Q8_0
        assert torch.equal(drafting.projections[0], quantize(reference.model.lm_head.weight, QType.Q8_0).data)
        ps = prompts(2)
        propose, compact = tp.medusa.propose, tp.medusa._compact
        try:
            paths = check_lossless(reference, tp, [(ps[0], "all"), (ps[1], None)])
        finally:
            tp.medusa.propose, tp.medusa._compact = propose, compact
        assert any(node != depth for path in paths for depth, node in enumerate(path))  # K/V really moved


def test_hydra_heads_draft_from_the_whole_embedding(model, reference, tmp_path):
    """Hydra heads read the drafted tokens' embeddings: rank 0 drafts from the embedding gathered from the ranks
    (its drafting base had none, and every tree step failed)."""
    save_medusa_heads(MedusaHeads(MedusaConfig(num_heads=3, num_layers=1, hidden_size=96, vocab_size=256,
                                               own_lm_head=False, sequential=True)), tmp_path / "hydra")
    ps = prompts(2)
    want = [o.token_ids for o in reference.generate(ps, GREEDY)]
    with LLM(model[0], tensor_parallel_size=2, medusa=str(tmp_path / "hydra"), medusa_guard=False,
             **engine_kwargs(model)) as tp:
        assert torch.equal(tp.medusa.model.model.embed_tokens.weight, reference.model.model.embed_tokens.weight)
        out = tp.generate(ps, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert [o.token_ids for o in out] == want
        assert all(o.accepted_lengths for o in out)  # tree steps ran


def test_models_that_do_not_split_are_refused(model, tiny_model_dir):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=5 must divide .*attention heads \(12\), KV heads "
                                         r"\(6\), intermediate features \(192\)"):
        LLM(model[0], tensor_parallel_size=5)
    with pytest.raises(ValueError, match=r"must divide the model's KV heads \(2\)"):
        LLM(tiny_model_dir, tensor_parallel_size=4)


def test_quantized_weights_split_on_block_boundaries(tmp_path):
    """A Q8_0 GGUF file with tied embeddings, and v and up in Q4_0 as Q4_K_M files keep some of them in
    another type: the quantized embedding and LM head are split over the vocabulary, q/k/v and gate/up part by
    part, o_proj and down on whole blocks; a cut that would fall inside a block is refused."""
    folder = save_tiny_model(tmp_path / "hf", tie_word_embeddings=True)
    file = write_gguf(hf_model(folder), tmp_path / "mixed.gguf",
                      qtype_of=lambda name, w: QType.Q4_0 if "attn_v" in name or "ffn_up" in name else QType.Q8_0)
    want = LLM(file)
    with LLM(file, tensor_parallel_size=2) as tp:
        assert isinstance(tp.model.model.embed_tokens.embedding, QuantizedEmbedding)
        assert isinstance(tp.model.model.layers[0].self_attn.qkv_proj, MixedQuantizedLinear)
        assert tp.model.model.layers[0].self_attn.o_proj.in_features == 32  # one Q8_0 block of each row
        # at most 32 rows a step: the quantized kernels' own path (more rows run bf16 GEMMs where the CPU has
        # them, whose rounding differs when row-parallel partial sums are added: README, Tensor parallelism)
        ps = [p[:8] for p in prompts(3)]
        assert [o.token_ids for o in tp.generate(ps, GREEDY)] == [o.token_ids for o in want.generate(ps, GREEDY)]
        torch.testing.assert_close(paged_logits(tp, TOKENS), paged_logits(want, TOKENS), atol=1e-4, rtol=0)
    folder = save_tiny_model(tmp_path / "kv4", num_key_value_heads=4)  # 4 ranks: o_proj's 64 inputs in parts of 16
    with pytest.raises(ValueError, match="parts of 16, which cut its Q8_0 blocks of 32 weights"):
        shard_model(load_model(folder, torch.float32, "cpu", "int8"), TensorParallel(0, 4))


def test_a_killed_worker_turns_the_server_unhealthy(tiny_model_dir):
    llm = LLM(tiny_model_dir, tensor_parallel_size=2, num_kv_blocks=64, block_size=8)
    running = serve(llm)
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 4, "temperature": 0}
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            assert client.post("/v1/completions", json=body).status_code == 200
            slow = {}  # a long request in flight when the worker dies fails at once, with a 503
            thread = threading.Thread(target=lambda: slow.update(r=client.post(
                "/v1/completions", json=body | {"max_tokens": 400, "ignore_eos": True})))
            thread.start()
            time.sleep(0.5)
            llm.parallel.workers[0].kill()
            thread.join(timeout=30)
            assert not thread.is_alive() and slow["r"].status_code == 503
            health = client.get("/health")
            assert health.status_code == 503 and "exited with code -9" in health.json()["error"]["message"]
            refused = client.post("/v1/completions", json=body)
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "service_unavailable"
            assert "the engine is down: " in refused.json()["error"]["message"]
    finally:
        running.stop()
        llm.close()


def test_ctrl_c_leaves_the_workers_to_rank_0(tiny_model_dir):
    """Ctrl-C reaches every process of the terminal's group: the workers died at once, and the requests the server
    was draining for --shutdown-timeout failed."""
    with LLM(tiny_model_dir, tensor_parallel_size=2, num_kv_blocks=64, block_size=8) as llm:
        want = llm.generate([1, 2, 3], GREEDY)[0].token_ids
        worker = llm.parallel.workers[0]
        os.kill(worker.pid, signal.SIGINT)
        worker.join(1)
        assert worker.is_alive()
        assert llm.generate([1, 2, 3], GREEDY)[0].token_ids == want


def test_two_hosts_each_a_launch_of_its_own(tiny_model_dir):
    """Two processes started apart, as torchrun starts one per host (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), both running `gorgon generate` with the same flags: rank 0 answers, rank 1 serves it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "server.cli", "generate", "--model", str(tiny_model_dir), "--prompt", "def f(x):",
            "--max-tokens", "12", "--temperature", "0", "--ignore-eos", "--json", "--tensor-parallel-size", "2"]
    hosts = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                                "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": "0"})
             for rank in (0, 1)]
    outputs = [host.communicate(timeout=120) for host in hosts]
    assert [host.returncode for host in hosts] == [0, 0], [err[-2000:] for _, err in outputs]
    want = LLM(tiny_model_dir).generate("def f(x):", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert json.loads(outputs[0][0])["token_ids"] == want[0].token_ids
    assert outputs[1][0] == ""  # rank 1 printed nothing: it served rank 0's calls


def test_decode_benchmark_compares_with_one_process(tiny_model_dir, tmp_path):
    """`gorgon bench decode --tensor-parallel-size 2`: TP=2 against TP=1 in one run, tiny settings."""
    from bench import decode

    out = tmp_path / "decode_tp2.json"
    decode.main(["--model", str(tiny_model_dir), "--tensor-parallel-size", "2", "--new-tokens", "2", "--repeats", "1",
                 "--batch-sizes", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    rate = data["tok_s"]
    assert data["summary"] == {"tp2_vs_tp1_bs1": pytest.approx(rate["TP=2"]["1"] / rate["TP=1"]["1"]),
                               "tp2_vs_tp1_bs2": pytest.approx(rate["TP=2"]["2"] / rate["TP=1"]["2"]),
                               "greedy_tokens_identical": True}
    assert data["threads_per_rank"] == max(1, data["threads_tp1"] // 2)
