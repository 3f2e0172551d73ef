"""Shared fixtures: tiny random HF checkpoints built in-process and saved to a temp folder, and a probe
of our engine's logits."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels are tested in Triton's interpreter. The switch must be set before
# anything imports triton (transformers does, below), so it lives here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# trees re-timed for this machine (engine.medusa.tree.machine_tree_file) by a user's runs must not reach tests
os.environ["GORGON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gorgon-tests-")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from bench.common import byte_tokenizer
from engine import LLM, SamplingParams
from engine.medusa.payoff import StepClock
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

atexit.register(shutil.rmtree, os.environ["GORGON_CACHE_DIR"], ignore_errors=True)

VOCAB = 256


@pytest.fixture(autouse=True)
def no_step_timing(request, monkeypatch):
    """Medusa's engines judge their drafts by wall-clock step times (StepClock), which differ from run to run;
    elsewhere the tests' tree steps must not depend on them. Tests marked step_timing feed the clock times."""
    if request.node.get_closest_marker("step_timing") is None:
        monkeypatch.setattr(StepClock, "record", lambda self, batch_size, tree, seconds: None)


def save_tiny_model(folder: Path, arch: str = "LlamaForCausalLM", seed: int = 0, **overrides) -> Path:
    """Random model of `arch` with a 256-token byte vocabulary, saved as an HF folder."""
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                  "MistralForCausalLM": "mistral"}[arch]
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF's init is tiny; widen it so greedy paths are not all ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def save_tiny_qwen3(folder: Path, **overrides) -> Path:
    """A tiny Qwen3 whose q/k norm weights are not HF's fresh ones (all ones would hide a norm misplaced)."""
    save_tiny_model(folder, "Qwen3ForCausalLM", **overrides)
    model, generator = hf_model(folder), torch.Generator().manual_seed(0)
    with torch.no_grad():  # each norm its own weights: a q/k swap shows
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5, generator=generator)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def hf_model(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


PROMPT_LEN = 21


def paged_logits(llm: LLM, tokens: list[int]) -> torch.Tensor:
    """Logits of our engine for every position: one paged prefill of PROMPT_LEN tokens, then one token per step."""
    seq = Sequence("probe", tokens[:PROMPT_LEN], SamplingParams())
    rows = []

    def run(n: int, all_rows: bool) -> None:
        assert llm.block_manager.allocate(seq, seq.num_computed_tokens + n)
        inputs = llm.runner.prepare(ScheduledBatch([seq], [n]))
        hidden = llm.runner.forward(inputs)
        rows.append(llm.runner.logits(hidden, torch.arange(n) if all_rows else inputs.sample_rows))
        seq.num_computed_tokens += n

    run(PROMPT_LEN, all_rows=True)
    for token in tokens[PROMPT_LEN:]:
        seq.token_ids.append(token)
        run(1, all_rows=False)
    llm.block_manager.free_sequence(seq)
    return torch.cat(rows)




def adjusted_by_hand(row: list[float], params: SamplingParams, history: list[int], generated: list[int]) -> list[float]:
    """The sampler's logit_bias and penalties, one logit at a time: the oracle of engine.sampler.adjust_logits.
    history: prompt and generated tokens (repetition penalty); generated: the generated ones (presence, frequency)."""
    row = list(row)
    for t, b in params.logit_bias.items():
        row[t] += b
    for t in set(history):
        row[t] = row[t] / params.repetition_penalty if row[t] > 0 else row[t] * params.repetition_penalty
    for t in set(generated):
        row[t] -= params.presence_penalty + params.frequency_penalty * generated.count(t)
    return row


def use_oracle_drafts(llm: LLM, futures: dict[str, list[int]]) -> None:
    """Replace the heads' proposals by drafts read from a plain run (request id -> prompt + output): the
    right token for each depth sits at a rank that varies with position (mostly 0, sometimes 1 or 2,
    sometimes absent). So runs are long, and accepted paths often leave the tree's first branch (the
    K/V must move)."""
    top_k = llm.medusa.tree_for(1).tree.top_k
    rank_of_right_token = [0, 0, 0, 0, 0, 0, 1, 1, 2, top_k]  # top_k: absent

    def propose(seqs, hidden, num_running):
        for seq in seqs:
            if not llm.medusa.can_speculate(seq):
                seq.draft_token_ids = None
                continue
            future = futures[seq.request_id]
            root = len(seq) - 1
            drafts = []
            for d in range(1, llm.medusa.tree_for(1).tree.depth + 1):
                right = future[root + d] if root + d < len(future) else 0
                ranks = [(right + 1 + r) % 256 for r in range(top_k)]
                rank = rank_of_right_token[(7 * root + 3 * d) % 10]
                if rank < top_k:
                    ranks[rank] = right
                drafts.append(ranks)
            seq.draft_token_ids, seq.draft_tree = drafts, llm.medusa.tree_for(1).verify

    llm.medusa.propose = propose
