"""Medusa: tree buffers, head loading, acceptance rules, lossless greedy speculation in batches, KV
compaction (head training: test_medusa_training.py). Tiny random models; the heads are trained for a few
seconds on the model's own greedy text, so that trees are really accepted."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from itertools import accumulate
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.common import byte_tokenizer
from bench.medusa import in_flight, repeated_share
from bench.medusa import main as bench_main
from bench.prediction import main as prediction_main
from engine import LLM, RequestOutput, SamplingParams
from engine.attention import available_backends
from engine.kv_cache import slots
from engine.medusa.acceptance import Acceptance, typical_acceptance
from engine.medusa.ngram import NgramIndex, PredictionIndex
from engine.medusa.payoff import MAX_PAUSE, MIN_SAMPLES, PAUSE, PROBE_EVERY, PROBE_SOON, WINDOW, Payoff, StepClock
from engine.medusa.speculator import Medusa
from engine.medusa.tree import (
    DEFAULT_TREE,
    TREE_FILE,
    TREES,
    BatchTree,
    TreeChoice,
    build_tree,
    load_tree,
    spine_paths,
    spine_tree,
)
from engine.prompt_files import chat_prompt_ids
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.training import medusa as medusa_training
from engine.training.medusa import TrainConfig, build_cache, draft_vocabulary, self_distill, train_heads
from models import DEFAULT_MODEL_DIR
from models.kernels.decode import load_decode_kernels, set_decode_kernels
from models.loader import load_model
from models.medusa import (
    DRAFT_VOCAB_FILE,
    WEIGHTS_FILE,
    MedusaConfig,
    MedusaHeads,
    load_medusa_heads,
    save_medusa_heads,
)
from models.quant import QType, quantize
from server.generate_cli import main as generate_main

from conftest import use_oracle_drafts

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="session")
def distilled(tiny_model_dir):
    """Windows of the tiny model's own greedy text: (train [N, S], held out [M, S])."""
    windows = self_distill(tiny_model_dir, num_samples=20, seq_len=48, prefix_tokens=4, temperature=0.0, seed=0)
    return windows[4:], windows[:4]


@pytest.fixture(scope="session")
def trained(tiny_model_dir, distilled):
    """(frozen base model, heads trained for a few seconds on its own text, their loss per step)."""
    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    config = TrainConfig(num_heads=4, head_kind="medusa", steps=40, batch_size=8 * 48, seq_len=48, lr=1e-2)
    heads, history = train_heads(model, build_cache(model, distilled[0], 4), config, progress=False)
    return model, heads, history


@pytest.fixture(scope="session")
def heads_dir(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("medusa")
    save_medusa_heads(trained[1], folder)
    return folder


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = (int(torch.randint(2, 30, (1,), generator=g)) for _ in range(n))
    return [torch.randint(3, 250, (length,), generator=g).tolist() for length in lengths]


def run_to_end(llm: LLM) -> dict[str, RequestOutput]:
    finished = {}
    while llm.has_unfinished():
        finished.update({o.request_id: o for o in llm.step() if o.finished})
    return finished


# ---- trees -----------------------------------------------------------------------------------------
def test_tree_buffers_by_hand():
    tree = build_tree([[1], [0], [0, 0], [0, 1], [0, 0, 0]])
    # nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [0,1], 5 [0,0,0]
    assert tree.paths == [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    assert tree.size == 6 and tree.depth == 3 and tree.top_k == 2
    assert tree.mask.int().tolist() == [[1, 0, 0, 0, 0, 0],
                                        [1, 1, 0, 0, 0, 0],
                                        [1, 0, 1, 0, 0, 0],
                                        [1, 1, 0, 1, 0, 0],
                                        [1, 1, 0, 0, 1, 0],
                                        [1, 1, 0, 1, 0, 1]]
    assert tree.depths == [0, 1, 1, 2, 2, 3]
    assert tree.parents == [0, 0, 0, 1, 1, 3]
    # [root, head0 rank0, head0 rank1, head1 rank0, head1 rank1, head2 rank0, head2 rank1]
    assert tree.candidate_index == [0, 1, 2, 3, 4, 5]
    assert tree.leaf_paths == [[0, 2], [0, 1, 4], [0, 1, 3, 5]]


def test_chain_tree_and_shipped_trees():
    chain = load_tree("chain3")
    assert chain.mask.tolist() == torch.ones(4, 4).tril().bool().tolist()
    assert chain.candidate_index == [0, 1, 2, 3] and chain.leaf_paths == [[0, 1, 2, 3]]
    big = load_tree("mc_sim_7b_63")
    assert big.size == 64 and big.top_k == 10 and big.depth == 4
    for name in TREES:
        tree = load_tree(name)
        # every node sees exactly its ancestors and itself: depth + 1 entries in its mask row
        assert tree.mask.sum(dim=1).tolist() == [d + 1 for d in tree.depths]


def test_tree_from_json_and_errors(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps([[0], [1], [0, 0]]))
    assert load_tree(str(f)).size == 4
    with pytest.raises(ValueError, match="not connected"):
        build_tree([[0], [1, 0]])
    with pytest.raises(ValueError, match="twice"):
        build_tree([[0], [0]])
    with pytest.raises(ValueError, match="unknown medusa tree"):
        load_tree("no-such-tree")


def test_a_tree_deeper_than_the_heads(tiny_model_dir, tmp_path):
    save_medusa_heads(MedusaHeads(MedusaConfig(2, 1, 64, 256, False)), tmp_path)
    with pytest.raises(ValueError, match="only 2 heads"):
        LLM(tiny_model_dir, medusa=str(tmp_path), medusa_tree="chain3")
    # the default tree is cut to fit the heads
    default = LLM(tiny_model_dir, medusa=str(tmp_path)).medusa.tree_for(1).tree
    assert default.depth == 2 and default.name == f"{DEFAULT_TREE}[:2]"


# ---- loading and saving ------------------------------------------------------------------------------
@pytest.mark.parametrize("own_lm_head", [False, True])
def test_heads_round_trip(tmp_path, own_lm_head):
    heads = MedusaHeads(MedusaConfig(3, 2, 64, 256, own_lm_head))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_medusa_heads(heads, tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS_FILE))
    assert "2.1.linear.bias" in keys and ("0.2.weight" in keys) == own_lm_head
    loaded = load_medusa_heads(tmp_path, 64, 256)
    assert loaded.config == heads.config
    lm_head = torch.nn.Linear(64, 256, bias=False)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, lm_head), heads(x, lm_head), rtol=0, atol=0)


@pytest.mark.parametrize("own_lm_head", [False, True])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_draft_vocab_round_trip_and_drafts(tmp_path, own_lm_head, use_kernel):
    """With a draft vocabulary the heads propose the top-k of their logits over those tokens only. The CPU kernels
    draft from Q8_0 blocks: their oracle is the weights dequantized, and ties within the blocks' rounding may go
    either way."""
    heads = MedusaHeads(MedusaConfig(3, 2, 64, 256, own_lm_head))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.1)
    vocab = torch.tensor([7, 3, 200, 64, 5, 255, 0])
    heads.draft_vocab = vocab
    save_medusa_heads(heads, tmp_path)
    loaded = load_medusa_heads(tmp_path, 64, 256)
    if use_kernel:
        kernels = load_decode_kernels(loaded)
        if kernels is None:
            pytest.skip("the CPU decode kernels could not be built here")
        set_decode_kernels(loaded, kernels)
    assert torch.equal(loaded.draft_vocab, vocab)
    lm_head = torch.nn.Linear(64, 256, bias=False)
    x = torch.randn(4, 64)
    projected = torch.nn.Linear(64, 256, bias=False)  # the projection as drafting reads it
    with torch.inference_mode():
        drafts = loaded.top_k(x, loaded.draft_weights(lm_head), 2, 3)  # [2 heads, 4 rows, 3]
        logits = loaded(x, lm_head, 2)
        if use_kernel:  # every weight drafting reads in Q8_0 blocks
            projected.weight.copy_(quantize(lm_head.weight, QType.Q8_0).dequantize())
            for head in loaded.heads:
                layers = [block.linear for block in head[:loaded.config.num_layers]]
                for layer in layers + ([head[-1]] if own_lm_head else []):
                    layer.weight.copy_(quantize(layer.weight, QType.Q8_0).dequantize())
        else:
            projected.weight.copy_(lm_head.weight)
        oracle = loaded(x, projected, 2)
    outside = torch.ones(256, dtype=torch.bool)
    outside[vocab] = False
    best = oracle.masked_fill(outside, float("-inf")).topk(3, dim=-1)
    assert torch.isin(drafts, vocab).all()
    assert (oracle.gather(-1, drafts) - best.values).abs().max() <= (0.02 if use_kernel else 0.0)
    assert not torch.equal(drafts, logits.topk(3, dim=-1).indices)  # the restriction mattered
    loaded.draft_vocab = None
    save_medusa_heads(loaded, tmp_path)  # over the folder: the old vocabulary must not outlive its heads
    assert load_medusa_heads(tmp_path, 64, 256).draft_vocab is None


def test_head_count_comes_from_the_tensors(tmp_path):
    save_medusa_heads(MedusaHeads(MedusaConfig(3, 1, 64, 256, False)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "medusa_num_heads": 5}))
    with pytest.warns(UserWarning, match="using 3"):
        assert load_medusa_heads(tmp_path, 64, 256).config.num_heads == 3


def test_loader_is_strict(tmp_path):
    save_medusa_heads(MedusaHeads(MedusaConfig(2, 1, 64, 256, True)), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="vocabulary 257 needs \\[257, 64\\]"):
        load_medusa_heads(tmp_path, 64, 256 + 1)  # another vocabulary
    save_file({**tensors, "0.0.linear.scale": torch.zeros(64)}, tmp_path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="0.0.linear.scale"):
        load_medusa_heads(tmp_path, 64, 256)
    save_file({k: v for k, v in tensors.items() if k != "1.0.linear.bias"}, tmp_path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="missing \\['1.0.linear.bias'\\]"):
        load_medusa_heads(tmp_path, 64, 256)
    save_file({**tensors, "0.0.linear.weight": torch.zeros(64, 32)}, tmp_path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="0.0.linear.weight has shape \\[64, 32\\]"):
        load_medusa_heads(tmp_path, 64, 256)
    save_file(tensors, tmp_path / WEIGHTS_FILE)
    for bad in ({"token_ids": torch.tensor([3, 256])}, {"token_ids": torch.tensor([3, 3])},
                {"token_ids": torch.tensor([3.0])}, {"ids": torch.tensor([3])}):
        save_file(bad, tmp_path / DRAFT_VOCAB_FILE)
        with pytest.raises(ValueError, match=DRAFT_VOCAB_FILE):
            load_medusa_heads(tmp_path, 64, 256)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_medusa_heads(tmp_path, 64, 256)


# ---- acceptance ----------------------------------------------------------------------------------------
def test_typical_acceptance_property():
    """Every node is accepted iff its token's probability at the parent beats min(eps, delta*exp(-H));
    and as the temperature goes to 0 the rule becomes greedy acceptance. (It reads each node's distribution
    as the request's filters leave it; here, temperature only.)"""
    g = torch.Generator().manual_seed(0)
    tree = load_tree("cpu12")
    batch, vocab = 6, 20
    logits = torch.randn(batch, tree.size, vocab, generator=g) * 3
    candidates = torch.randint(vocab, (batch, tree.size), generator=g)
    temperature = torch.tensor([0.5, 0.7, 1.0, 1.3, 2.0, 1.0])
    accepted, log_p = typical_acceptance(candidates, (logits / temperature[:, None, None]).softmax(-1), tree.parents,
                                         0.09, 0.3)
    for b in range(batch):
        for node in range(1, tree.size):
            probs = torch.softmax(logits[b, tree.parents[node]] / temperature[b], dim=-1)
            entropy = -sum(p * math.log(p) for p in probs.tolist() if p > 0)
            p = probs[candidates[b, node]].item()
            assert accepted[b, node].item() == (p > min(0.09, 0.3 * math.exp(-entropy)))
            assert log_p[b, node].item() == pytest.approx(math.log(p), abs=1e-5)
    assert accepted[:, 1:].any() and not accepted[:, 1:].all()

    argmax_candidates = logits.argmax(dim=-1)[:, tree.parents]
    candidates = torch.where(torch.rand(candidates.shape, generator=g) < 0.5, argmax_candidates, candidates)
    cold, _ = typical_acceptance(candidates, (logits / 1e-3).softmax(-1), tree.parents, 0.09, 0.3)
    assert torch.equal(cold[:, 1:], (candidates == argmax_candidates)[:, 1:])


def test_seeded_sampled_medusa_equals_seeded_plain_sampling(tiny_model_dir, heads_dir):
    """Sampled verification draws once per emitted token from the request's generator, as plain decoding
    does, so a seeded request gives the same tokens with Medusa (test_medusa_sampling.py tests the
    distribution itself)."""
    params = [SamplingParams(max_tokens=30, temperature=t, top_p=0.9, seed=i, ignore_eos=True)
              for i, t in enumerate([0.2, 0.5, 1.0])]
    plain = LLM(tiny_model_dir).generate(prompts(3), params)
    llm = LLM(tiny_model_dir, medusa=str(heads_dir), medusa_tree="cpu12")
    outs = llm.generate(prompts(3), params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert all(sum(o.accepted_lengths) == 29 for o in outs)  # the first token comes from the prefill
    assert any(n > 1 for o in outs for n in o.accepted_lengths)
    assert llm.num_free_blocks == llm.block_manager.num_blocks


def test_logprobs_under_speculation_are_plain_decodings(tiny_model_dir, heads_dir):
    """Requests that ask for logprobs speculate too: each emitted token's logprob and top alternatives are read
    from the logits of the tree node before it, where plain decoding reads them from its step's row."""
    params = [SamplingParams(max_tokens=30, logprobs=3, **GREEDY),
              SamplingParams(max_tokens=30, logprobs=0, temperature=0.8, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=30, **GREEDY)]
    plain = LLM(tiny_model_dir).generate(prompts(3), params)
    llm = LLM(tiny_model_dir, medusa=str(heads_dir), medusa_tree="cpu12")
    outs = llm.generate(prompts(3), params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert all(o.accepted_lengths for o in outs) and max(outs[0].accepted_lengths) > 1  # (tree steps)
    assert outs[2].logprobs is None and [len(o.logprobs) for o in outs[:2]] == [30, 30]
    for out, ref in zip(outs[:2], plain):
        for (logprob, alternatives), (ref_logprob, ref_alternatives) in zip(out.logprobs, ref.logprobs):
            assert logprob == pytest.approx(ref_logprob, abs=1e-5) and alternatives.keys() == ref_alternatives.keys()
            assert list(alternatives.values()) == pytest.approx(list(ref_alternatives.values()), abs=1e-5)
    assert len(outs[0].logprobs[0][1]) == 3 and outs[1].logprobs[0][1] == {}


def test_requests_that_opt_out_cost_no_drafting(tiny_model_dir, heads_dir):
    llm = LLM(tiny_model_dir, medusa=str(heads_dir))
    calls = []
    top_k = llm.medusa.heads.top_k_logprobs  # (each sequence drafts a spine tree)
    llm.medusa.heads.top_k_logprobs = lambda *args: calls.append(len(args[0])) or top_k(*args)
    llm.generate(prompts(2), SamplingParams(max_tokens=8, use_medusa=False, **GREEDY))
    assert calls == []
    kept = llm.generate(prompts(2), SamplingParams(max_tokens=8, return_hidden_states=True, **GREEDY))
    assert calls == [] and all(o.accepted_lengths == [] and len(o.hidden_states) == 8 for o in kept)
    outs = llm.generate(prompts(2), SamplingParams(max_tokens=8, **GREEDY))
    # one drafted row per tree step, none for a finished request
    assert calls[0] == 2 and sum(calls) == sum(len(o.accepted_lengths) for o in outs)


def test_a_sequence_whose_drafts_do_not_pay_pauses_them():
    payoff = Payoff()
    for _ in range(WINDOW - 1):
        payoff.record(1)
    assert payoff.pays(clock=40, break_even=1.2)  # not judged before a full window
    payoff.record(2)  # 17 tokens in 16 steps: below 1.2 a step
    assert not payoff.pays(clock=41, break_even=1.2)
    assert not payoff.pays(clock=41 + PAUSE - 1, break_even=1.2)
    assert payoff.pays(clock=41 + PAUSE, break_even=1.2) and not payoff.emitted  # judged afresh
    clock = 41 + PAUSE
    for pause in (2 * PAUSE, 4 * PAUSE):  # failing again and again: each pause twice the last
        for _ in range(WINDOW):
            payoff.record(1)
        assert not payoff.pays(clock, break_even=1.2)
        assert not payoff.pays(clock + pause - 1, break_even=1.2) and payoff.pays(clock + pause, break_even=1.2)
        clock += pause
    for _ in range(WINDOW):
        payoff.record(2)
    assert payoff.pays(clock, break_even=1.2) and payoff.pause == PAUSE  # a window that pays: pauses start short
    for _ in range(10):  # never longer than MAX_PAUSE
        for _ in range(WINDOW):
            payoff.record(1)
        assert not payoff.pays(clock, break_even=1.2)
        clock = payoff.resume_at
    assert payoff.pause == MAX_PAUSE


@pytest.mark.step_timing
def test_the_step_clock_times_plain_steps_among_tree_steps():
    clock, tree = StepClock(), object()
    for _ in range(1, PROBE_SOON):
        clock.record(1, tree, 0.012)
        assert clock.ratio(1, tree) is None and not clock.wants_plain(1)
    clock.record(1, tree, 0.030)  # an outlier: a median ignores it
    assert clock.wants_plain(1) and not clock.wants_plain(1)  # asking starts the count again
    for _ in range(MIN_SAMPLES):
        assert clock.ratio(1, tree) is None
        clock.record(1, None, 0.010)
    assert clock.ratio(1, tree) == pytest.approx(1.2) and clock.ratio(2, tree) is None  # per batch size
    for _ in range(PROBE_EVERY - 1):
        clock.record(1, tree, 0.012)
    assert not clock.wants_plain(1)
    clock.record(1, tree, 0.012)
    assert clock.wants_plain(1)


@pytest.mark.step_timing
def test_a_steps_cost_is_its_forward_and_the_drafting_of_the_tree_it_verifies(tiny_model_dir, heads_dir):
    """Drafting happens at the end of a step, for the next one: a plain step's time leaves out the drafting it did,
    a tree step's takes in the drafting that made its tree in place of its own. Steps with prefill are not timed."""
    medusa = LLM(tiny_model_dir, medusa=str(heads_dir)).medusa
    seq = Sequence("r", [1, 2, 3], SamplingParams())
    tree = medusa.tree_for(1).verify
    medusa._drafting = 0.002  # this plain step drafted the tree the next one verifies
    medusa.record_step(ScheduledBatch([seq], [1]), 0.010)
    medusa._drafting, medusa._verified = 0.003, tree
    medusa.record_step(ScheduledBatch([], [], tree_seqs=[seq]), 0.020)
    medusa._drafting = 0.003
    medusa.record_step(ScheduledBatch([seq], [3]), 0.050)  # a prefill chunk
    times = {key: [round(t, 9) for t in samples] for key, samples in medusa.step_clock.times.items()}
    assert times == {(1, None): [0.008], (1, tree): [0.019]}


@pytest.mark.step_timing
@pytest.mark.parametrize("num_seqs", [1, 2])
@pytest.mark.parametrize("stored", [True, False])
def test_the_heads_pause_where_the_engines_own_steps_say_they_lose(tiny_model_dir, heads_dir, tmp_path, num_seqs,
                                                                   stored):
    """Timed by train-medusa at half a plain step (stored), or not timed at all (a tree named), the tree's steps
    take 100 plain ones in the engine: once it has timed both kinds of step (plain ones made to be timed among the
    tree steps) the heads pause, for a sequence alone and for a batch."""
    folder = tmp_path / "heads"
    shutil.copytree(heads_dir, folder)
    timing = {"tree": [[0]], "step_ms_bs1": 0.5, "plain_step_ms_bs1": 1.0, "step_ms_bs2": 0.5,
              "plain_step_ms_bs2": 1.0}
    TreeChoice([BatchTree([[0]], 2)], "measured", {"candidates": [timing]}).save(folder / TREE_FILE)
    params = SamplingParams(max_tokens=120, **GREEDY)
    plain = LLM(tiny_model_dir).generate(prompts(num_seqs), params)
    llm = LLM(tiny_model_dir, medusa=str(folder), medusa_ngram_tokens=0, medusa_tree=None if stored else "chain2")
    record = llm.medusa.step_clock.record
    timed = []
    llm.medusa.step_clock.record = lambda b, tree, seconds: timed.append(tree) or record(b, tree, 1.0 if tree is None
                                                                                         else 100.0)
    outs = llm.generate(prompts(num_seqs), params)
    assert [o.token_ids for o in outs] == [p.token_ids for p in plain]
    # plain steps made to be timed among the tree steps (the step after the PROBE_SOON-th: it asked before that one
    # was timed), then the pause's
    assert timed.index(None) == PROBE_SOON + 1 and timed.count(None) >= PAUSE
    for out in outs:
        decoded_plainly = 119 - sum(out.accepted_lengths)
        assert decoded_plainly >= PAUSE + MIN_SAMPLES - 1 and len(out.accepted_lengths) >= WINDOW
    assert llm.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.step_timing
def test_without_the_guard_the_heads_draft_at_every_step(tiny_model_dir, heads_dir):
    """medusa_guard=False (how train-medusa times its trees): tree steps that cost 100 plain ones go on, and no step
    is made plain to be timed, so a timed run's steps are all tree steps."""
    params = SamplingParams(max_tokens=120, **GREEDY)
    plain = LLM(tiny_model_dir).generate(prompts(2), params)
    for num_seqs in (1, 2):
        llm = LLM(tiny_model_dir, medusa=str(heads_dir), medusa_ngram_tokens=0, medusa_tree="chain2",
                  medusa_guard=False)
        record = llm.medusa.step_clock.record
        llm.medusa.step_clock.record = lambda b, tree, seconds, record=record: record(b, tree, 1.0 if tree is None
                                                                                     else 100.0)
        outs = llm.generate(prompts(num_seqs), params)
        assert [o.token_ids for o in outs] == [p.token_ids for p in plain[:num_seqs]]
        assert all(sum(out.accepted_lengths) == 119 for out in outs)  # every token after the prefill's
        assert llm.medusa.step_clock.times.get((num_seqs, None)) is None


@pytest.mark.step_timing
def test_train_medusa_times_trees_with_every_decode_step_a_tree_step(tiny_model_dir, heads_dir, monkeypatch):
    """train-medusa's tree timing (choose_tree): the engine's own step times, which say here that a tree step costs
    100 plain ones, must not pause the heads, or the paused steps would be missing from the tree steps timed."""
    record = StepClock.record
    monkeypatch.setattr(StepClock, "record", lambda clock, b, tree, seconds: record(clock, b, tree, 1.0 if tree is None
                                                                                     else 100.0))
    every_step = []

    def checked_run(llm, prompts, new_tokens, use_medusa):
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, use_medusa=use_medusa)
        outs = llm.generate(prompts, params)
        if use_medusa:
            every_step.append(all(sum(o.accepted_lengths) == new_tokens - 1 for o in outs))
        return 1.0, max(len(o.accepted_lengths) for o in outs) if use_medusa else new_tokens - 1

    monkeypatch.setattr(medusa_training, "timed_run", checked_run)
    medusa_training.choose_tree(tiny_model_dir, heads_dir, [([[0]], 2.0)], 100, prompts(8), 60, 1)
    assert every_step and all(every_step)


def test_train_medusa_times_a_tree_only_if_it_would_end_by_the_deadline(tiny_model_dir, heads_dir, monkeypatch):
    """Each timed run takes a unit of a fake clock; a candidate is timed only if it would end by the deadline,
    judged by how long the one before it took, with a margin for its larger rows. The first is always timed."""
    clock = [0.0]

    def one_unit_run(llm, prompts, new_tokens, use_medusa):
        clock[0] += 1.0
        return 1.0, 10  # the same step times: each tree pays its tokens per step

    monkeypatch.setattr(medusa_training, "timed_run", one_unit_run)
    monkeypatch.setattr(medusa_training, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    candidates = [([[0]], 2.0), ([[0], [1]], 2.1), ([[0], [1], [2]], 2.2)]

    def timed_within(budget: float) -> int:
        clock[0] = 0.0
        choice = medusa_training.choose_tree(tiny_model_dir, heads_dir, candidates, 100, prompts(8), 4, 1,
                                             deadline=budget)
        return len(choice.measurements["candidates"])

    took = 2 * len(medusa_training.TIMING_BATCHES)  # plain and tree runs at each batch size
    assert timed_within(0.0) == 1
    second_ends = took + medusa_training.NEXT_TREE_MARGIN * took
    assert timed_within(2 * took) == 1  # it would end in time were it to cost what the first did
    assert timed_within(second_ends - 0.1) == 1
    assert timed_within(second_ends) == 2


def test_break_even_is_the_measured_tree_step_against_a_plain_one():
    rows = [{"tree": [[0]], "step_ms_bs1": 6.0, "plain_step_ms_bs1": 5.0, "step_ms_bs2": 12.0,
             "plain_step_ms_bs2": 6.0},
            {"tree": [[0], [1]], "step_ms_bs1": 9.0, "plain_step_ms_bs1": 5.0}]
    assert TreeChoice([BatchTree([[0]])], "", {"candidates": rows}).break_even() == {1: 1.2, 2: 2.0}
    assert TreeChoice([BatchTree([[0], [1]])], "", {"candidates": rows}).break_even() == {1: 9.0 / 5.0}
    assert TreeChoice([BatchTree([[0]])], "", {}).break_even() == {}


@pytest.mark.parametrize("step_cost", [0.5, 100.0])
def test_the_heads_stop_drafting_for_a_sequence_where_they_do_not_pay(tiny_model_dir, heads_dir, tmp_path,
                                                                       step_cost):
    """A tree measured to cost 100 plain steps never pays: after WINDOW tree steps the sequence decodes
    PAUSE tokens plainly, then the heads draft again. One measured at half a plain step always pays."""
    folder = tmp_path / "heads"
    shutil.copytree(heads_dir, folder)
    timing = {"tree": [[0]], "step_ms_bs1": step_cost, "plain_step_ms_bs1": 1.0}
    TreeChoice([BatchTree([[0]], 1)], "measured", {"candidates": [timing]}).save(folder / TREE_FILE)
    params = SamplingParams(max_tokens=90, **GREEDY)
    plain = LLM(tiny_model_dir).generate(prompts(1), params)[0]
    llm = LLM(tiny_model_dir, medusa=str(folder), medusa_ngram_tokens=0)
    out = llm.generate(prompts(1), params)[0]
    assert out.token_ids == plain.token_ids
    decoded_plainly = 89 - sum(out.accepted_lengths)  # the first token is the prefill's
    if step_cost > 1:
        assert decoded_plainly >= PAUSE and len(out.accepted_lengths) > WINDOW  # paused, then drafted again
    else:
        assert decoded_plainly == 0
    assert llm.num_free_blocks == llm.block_manager.num_blocks


def test_a_sequence_after_ones_the_heads_failed_on_starts_paused(tiny_model_dir, heads_dir, tmp_path):
    """A sequence decoding alone starts from the engine's last window of tree steps: after one whose tree steps did
    not pay, the next decodes its first PAUSE tokens plainly (the first drafted for a window of its own)."""
    folder = tmp_path / "heads"
    shutil.copytree(heads_dir, folder)
    timing = {"tree": [[0]], "step_ms_bs1": 100.0, "plain_step_ms_bs1": 1.0}
    TreeChoice([BatchTree([[0]], 1)], "measured", {"candidates": [timing]}).save(folder / TREE_FILE)
    llm = LLM(tiny_model_dir, medusa=str(folder), medusa_ngram_tokens=0)
    first = llm.generate(prompts(2)[:1], SamplingParams(max_tokens=90, **GREEDY))[0]
    second = llm.generate(prompts(2)[1:], SamplingParams(max_tokens=PAUSE + 1, **GREEDY))[0]
    assert len(first.accepted_lengths) >= WINDOW and second.accepted_lengths == []
    fresh = LLM(tiny_model_dir, medusa=str(folder), medusa_ngram_tokens=0)
    assert fresh.generate(prompts(2)[1:], SamplingParams(max_tokens=PAUSE + 1, **GREEDY))[0].accepted_lengths


@pytest.mark.parametrize("step_cost", [0.5, 100.0])
def test_the_heads_stop_drafting_for_a_batch_where_they_do_not_pay(tiny_model_dir, heads_dir, tmp_path, step_cost):
    """In a batch the heads pause for all its sequences at once, judged on the tokens the batch's tree steps emit
    per sequence against the break-even timed at its size (here 100 plain steps at 2 sequences, while a sequence
    alone would pay): after WINDOW tree steps the batch decodes PAUSE steps plainly, then drafts again."""
    folder = tmp_path / "heads"
    shutil.copytree(heads_dir, folder)
    timing = {"tree": [[0]], "step_ms_bs1": 0.5, "plain_step_ms_bs1": 1.0, "step_ms_bs2": step_cost,
              "plain_step_ms_bs2": 1.0}
    TreeChoice([BatchTree([[0]], 2)], "measured", {"candidates": [timing]}).save(folder / TREE_FILE)
    params = SamplingParams(max_tokens=90, **GREEDY)
    plain = LLM(tiny_model_dir).generate(prompts(2), params)
    llm = LLM(tiny_model_dir, medusa=str(folder), medusa_ngram_tokens=0)
    outs = llm.generate(prompts(2), params)
    assert [o.token_ids for o in outs] == [p.token_ids for p in plain]
    for out in outs:
        decoded_plainly = 89 - sum(out.accepted_lengths)
        if step_cost > 1:
            assert decoded_plainly >= PAUSE and len(out.accepted_lengths) > WINDOW
        else:
            assert decoded_plainly == 0
    assert llm.num_free_blocks == llm.block_manager.num_blocks


# ---- lossless greedy speculation ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_greedy_medusa_equals_plain_greedy_batch1(tiny_model_dir, heads_dir, backend):
    params = SamplingParams(max_tokens=40, **GREEDY)
    plain = LLM(tiny_model_dir, attention_backend=backend).generate(prompts(1), params)[0]
    llm = LLM(tiny_model_dir, attention_backend=backend, medusa=str(heads_dir), medusa_tree="cpu12")
    medusa = llm.generate(prompts(1), params)[0]
    assert medusa.token_ids == plain.token_ids
    assert sum(medusa.accepted_lengths) == 39  # the first token comes from the prefill step
    assert max(medusa.accepted_lengths) > 1
    assert llm.num_free_blocks == llm.block_manager.num_blocks

    request = llm.add_request(prompts(1)[0], params)
    use_oracle_drafts(llm, {request: prompts(1)[0] + plain.token_ids})
    oracle = run_to_end(llm)[request]
    assert oracle.token_ids == plain.token_ids and max(oracle.accepted_lengths) >= 4
    assert llm.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_prefills_join_the_trees_forward(tiny_model_dir, heads_dir, backend):
    """Requests that arrive while others verify trees are prefilled in the same forward as those trees, each
    sequence under its own mask (the prefills' causal): every step is one forward, some of them mixed, and greedy
    output is plain decoding's. Each sequence verifies its own tree: a tree step has as many rows as its trees have
    nodes."""
    params = SamplingParams(max_tokens=24, **GREEDY)
    ps = prompts(4)
    plain = LLM(tiny_model_dir, attention_backend=backend).generate(ps, params)
    llm = LLM(tiny_model_dir, attention_backend=backend, medusa=str(heads_dir), medusa_tree="cpu6")
    forward, forwards = llm.runner.forward, []

    def recording_forward(inputs):
        ctx = inputs.ctx
        trees = [] if ctx.tree_mask is None else [not bool(m.equal(torch.ones_like(m).tril())) for m in ctx.tree_mask]
        forwards.append((ctx.query_lens_cpu, trees))
        return forward(inputs)

    llm.runner.forward = recording_forward
    ids, steps, finished = [], 0, {}
    while len(ids) < len(ps) or llm.has_unfinished():
        if len(ids) < len(ps) and steps % 3 == 0:  # a new request every third step
            ids.append(llm.add_request(ps[len(ids)], params))
        finished.update({o.request_id: o for o in llm.step() if o.finished})
        steps += 1
    assert [finished[i].token_ids for i in ids] == [o.token_ids for o in plain]
    assert len(forwards) == steps
    mixed = [(lens, trees) for lens, trees in forwards if any(trees) and not all(trees)]
    assert any(lens[0] > 1 for lens, _ in mixed)  # a prefill beside trees
    for lens, trees in forwards:
        assert all(n == 7 for n, tree in zip(lens, trees) if tree)  # cpu6: its own 7 nodes
    assert llm.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.parametrize("use_kernel", [True, False])
def test_medusa_heads_draft_spine_trees(tiny_model_dir, use_kernel):
    """A sequence decoding alone drafts a spine tree: its depth-d nodes are head d-1's likeliest tokens, as many as
    the likeliest paths take (the spine: each head's top token), by the heads' own probabilities."""
    llm = LLM(tiny_model_dir, dtype="float32")
    heads = MedusaHeads(MedusaConfig(4, 1, 64, 256, False))
    generator = torch.Generator().manual_seed(0)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.1, generator=generator)
    heads.draft_vocab = torch.arange(3, 250, 2)
    kernels = load_decode_kernels(heads) if use_kernel else None
    if use_kernel and kernels is None:
        pytest.skip("the CPU decode kernels could not be built here")
    set_decode_kernels(heads.eval(), kernels)
    model, tree = llm.model, build_tree(TREES["cpu6"], "cpu6")
    medusa = Medusa(heads, [(tree, None)], model, llm.runner.kv_cache, 256, Acceptance("rejection", 0.09, 0.3),
                    spine=True)
    spine = medusa.tree_for(1).spine
    hidden = torch.randn(1, 64, generator=generator)
    with torch.inference_mode():
        [(drafts, vt)] = medusa._draft_spines(hidden, [5], spine)
        if use_kernel:  # (the kernels draft from Q8_0 weights: their own top-k, checked against torch elsewhere)
            top = heads.top_k(hidden, medusa.draft_weights, 4, 6)[:, 0]
            logprobs = heads.top_k_logprobs(hidden, medusa.draft_weights, 4, 6)[1][:, 0]
        else:
            logits = heads(hidden, model.lm_head)[:, 0, heads.draft_vocab].log_softmax(dim=-1)  # [4 heads, vocab]
            logprobs, top = logits.topk(6)
            top = heads.draft_vocab[top]
    counts = spine_tree(logprobs.tolist(), 7)
    assert vt.tree.paths == [tuple(p) for p in spine_paths(counts)] and vt.tree.size == 7
    assert drafts == [top[d, :n].tolist() for d, n in enumerate(counts)]


@pytest.mark.parametrize("tree", ["cpu12", None])
def test_greedy_medusa_on_spine_trees_equals_plain_greedy(tiny_model_dir, heads_dir, tree):
    """Alone, on a spine tree (None: the default tree's size) or a named one; then in a batch."""
    params = SamplingParams(max_tokens=40, **GREEDY)
    plain = LLM(tiny_model_dir).generate(prompts(3), params)
    llm = LLM(tiny_model_dir, medusa=str(heads_dir), medusa_tree=tree)
    assert (llm.medusa.tree_for(1).spine is None) == (tree is not None)
    alone = [llm.generate([p], params)[0] for p in prompts(3)]
    together = llm.generate(prompts(3), params)
    assert [o.token_ids for o in alone] == [o.token_ids for o in together] == [o.token_ids for o in plain]
    assert max(n for o in alone for n in o.accepted_lengths) > 1
    assert llm.num_free_blocks == llm.block_manager.num_blocks


def test_greedy_medusa_with_a_draft_vocab_is_lossless(tiny_model_dir, heads_dir, distilled, tmp_path):
    shutil.copytree(heads_dir, tmp_path, dirs_exist_ok=True)
    vocab = draft_vocabulary(distilled[0], 256, 0.8)
    save_file({"token_ids": vocab}, tmp_path / DRAFT_VOCAB_FILE)
    params = SamplingParams(max_tokens=40, **GREEDY)
    plain = LLM(tiny_model_dir).generate(prompts(2), params)
    llm = LLM(tiny_model_dir, medusa=str(tmp_path), medusa_tree="cpu12")
    drafted: set[int] = set()
    propose = llm.medusa.propose

    def recording_propose(seqs, hidden, num_running):
        propose(seqs, hidden, num_running)
        drafted.update(t for s in seqs if s.draft_token_ids and s.draft_tree not in llm.medusa.chains
                       for rank in s.draft_token_ids for t in rank)

    llm.medusa.propose = recording_propose
    medusa = llm.generate(prompts(2), params)
    assert [o.token_ids for o in medusa] == [o.token_ids for o in plain]
    assert drafted and drafted <= set(vocab.tolist()) and max(n for o in medusa for n in o.accepted_lengths) > 1
    save_file({"token_ids": vocab[:2]}, tmp_path / DRAFT_VOCAB_FILE)
    with pytest.raises(ValueError, match="only 2 tokens"):
        LLM(tiny_model_dir, medusa=str(tmp_path), medusa_tree="cpu12")


def stop_string_inside_a_run(out, tokenizer) -> str | None:
    """Two characters whose first occurrence in out.text ends at a token in the middle of an accepted run."""
    ends = list(accumulate([1, *out.accepted_lengths]))  # output tokens after each step (prefill gives the first)
    for start, end in zip(ends, ends[1:]):
        for j in range(max(start, 1), end - 1):  # token j is not the last of its run
            s = tokenizer.decode(out.token_ids[j - 1:j + 1])
            if len(s) == 2 and s.isascii() and s.isprintable() and \
                    out.text.find(s) == len(tokenizer.decode(out.token_ids[:j - 1])):
                return s
    return None


@pytest.mark.parametrize("tight_cache", [False, True])
def test_greedy_medusa_equals_plain_in_a_mixed_batch(tiny_model_dir, heads_dir, tight_cache):
    """8 requests: different prompt lengths (chunked prefill beside tree steps), stop strings and
    max_tokens that end a run mid-tree, a request that opts out, and (tight_cache) preemption."""
    kwargs = dict(max_num_batched_tokens=64, num_kv_blocks=24 if tight_cache else None, block_size=8)
    medusa_kwargs = dict(medusa=str(heads_dir), medusa_tree="cpu12", **kwargs)
    ps = prompts(8)
    max_tokens = (41, 17, 29, 33, 23, 37, 19, 45)
    no_stop_params = [SamplingParams(max_tokens=n, **GREEDY) for n in max_tokens]
    futures = {f"req-{i}": p + out.token_ids for i, (p, out) in
               enumerate(zip(ps, LLM(tiny_model_dir, **kwargs).generate(ps, no_stop_params)))}
    llm = LLM(tiny_model_dir, **medusa_kwargs)
    use_oracle_drafts(llm, futures)
    no_stops = llm.generate(ps, no_stop_params)
    params = []
    for i, (n, out) in enumerate(zip(max_tokens, no_stops)):
        stop = stop_string_inside_a_run(out, byte_tokenizer()) if i in (1, 2, 4, 5, 6) else None
        params.append(SamplingParams(max_tokens=n, stop=[stop] if stop else [], use_medusa=i != 3, **GREEDY))
    assert sum(bool(p.stop) for p in params) >= 2
    plain = LLM(tiny_model_dir, **kwargs).generate(ps, params)

    llm = LLM(tiny_model_dir, **medusa_kwargs)
    use_oracle_drafts(llm, futures)
    proposed: dict[str, int] = {}  # tokens the last tree step of each request offered
    verify = llm.medusa.verify

    def recording_verify(seqs, *args):
        tokens, logprobs, hidden = verify(seqs, *args)
        proposed.update({s.request_id: len(t) for s, t in zip(seqs, tokens)})
        return tokens, logprobs, hidden

    llm.medusa.verify = recording_verify
    ids = [llm.add_request(p, sp) for p, sp in zip(ps, params)]
    finished = run_to_end(llm)
    medusa = [finished[i] for i in ids]

    for i, (a, b) in enumerate(zip(plain, medusa)):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason, i
    assert medusa[3].accepted_lengths == []
    speculated = [o.accepted_lengths for j, o in enumerate(medusa) if j != 3]
    assert all(speculated) and sum(map(sum, speculated)) > 2 * sum(map(len, speculated))
    cut_short = [o.finish_reason for o, i in zip(medusa, ids)
                 if o.accepted_lengths and o.accepted_lengths[-1] < proposed[i]]
    assert "length" in cut_short and "stop" in cut_short  # a max_tokens and a stop string ended a run mid-tree
    assert llm.num_free_blocks == llm.block_manager.num_blocks
    if tight_cache:
        assert llm.scheduler.num_preemptions > 0


def test_a_cut_tree_is_the_first_nodes():
    tree = load_tree("cpu6")  # [0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0]
    cut = tree.cut(2)
    assert cut.paths == tree.paths[:4] and cut.size == 5 and cut.depth == 2 and cut.top_k == tree.top_k == 2
    assert torch.equal(cut.mask, tree.mask[:5, :5])
    assert cut.candidate_index == tree.candidate_index[:5] and cut.parents == tree.parents[:5]
    assert cut.leaf_paths == [[0, 2], [0, 1, 3], [0, 1, 4]]
    one = load_tree("chain3").cut(1)
    assert one.size == 2 and one.leaf_paths == [[0, 1]] and one.top_k == 1
    assert tree.cut(4) is tree
    with pytest.raises(ValueError, match="cannot be cut"):
        tree.cut(5)


def test_compacted_cache_equals_plain_cache(tiny_model_dir, heads_dir):
    prompt, params = prompts(1)[0], SamplingParams(max_tokens=60, **GREEDY)
    plain = LLM(tiny_model_dir, attention_backend="reference")
    future = prompt + plain.generate(prompt, params)[0].token_ids
    llm = LLM(tiny_model_dir, medusa=str(heads_dir), medusa_tree="cpu12", attention_backend="reference")
    use_oracle_drafts(llm, {"req-0": future})
    seq = llm.requests[llm.add_request(prompt, params)]
    while sum(seq.accepted_lengths) < 30:
        llm.step()
    assert max(seq.accepted_lengths) >= 3
    n = seq.num_computed_tokens

    oracle_id = plain.add_request(seq.token_ids[:n + 1], SamplingParams(max_tokens=5, **GREEDY))
    oracle = plain.requests[oracle_id]
    plain.step()  # prefill: the cache holds all n + 1 prompt tokens

    def cache_rows(engine: LLM, s, num_tokens: int) -> torch.Tensor:
        return engine.runner.kv_cache.read(slots(s.block_table, 0, num_tokens, engine.config.block_size))

    torch.testing.assert_close(cache_rows(llm, seq, n), cache_rows(plain, oracle, n), rtol=1e-4, atol=1e-5)
    # the blocks beyond the accepted run were released
    assert len(seq.block_table) == -(-n // llm.config.block_size)


# ---- shipped heads, commands ---------------------------------------------------------------------------
@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "medusa").is_dir(), reason="the default model's heads are not shipped")
def test_shipped_heads_speculate_losslessly():
    llm = LLM(medusa=str(DEFAULT_MODEL_DIR / "medusa"))
    prompt = "def fibonacci(n):\n"
    plain = llm.generate(prompt, SamplingParams(max_tokens=48, use_medusa=False, **GREEDY))[0]
    medusa = llm.generate(prompt, SamplingParams(max_tokens=48, **GREEDY))[0]
    assert medusa.token_ids == plain.token_ids
    assert sum(medusa.accepted_lengths) / len(medusa.accepted_lengths) > 1.5


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "medusa").is_dir(), reason="the default model's heads are not shipped")
def test_generate_command_reports_accepted_lengths(capsys):
    medusa = ["--prompt", "def fibonacci(n):", "--medusa", str(DEFAULT_MODEL_DIR / "medusa"), "--temperature", "0",
              "--max-tokens", "24"]
    generate_main([*medusa, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 24
    # the first token comes from the prompt's forward; speculative steps emit the rest
    assert out["accepted_lengths"] and sum(out["accepted_lengths"]) == 23
    generate_main(medusa)
    assert "tokens per Medusa step" in capsys.readouterr().err


def test_generate_command_drafts_a_prediction(capsys, tmp_path):
    args = ["--prompt", "def fibonacci(n):", "--temperature", "0", "--max-tokens", "32", "--json"]
    generate_main([*args, "--medusa", "none"])
    plain = json.loads(capsys.readouterr().out)
    (tmp_path / "answer.txt").write_text(plain["text"])
    for medusa in ([], ["--medusa", "prediction"]):  # the default: the model's own heads, which draft it as well
        generate_main([*args, *medusa, "--prediction", f"@{tmp_path / 'answer.txt'}"])
        predicted = json.loads(capsys.readouterr().out)
        assert predicted["token_ids"] == plain["token_ids"] and plain["accepted_lengths"] == []
        assert max(predicted["accepted_lengths"]) >= 4  # chains drafted from the prediction, accepted
    with pytest.raises(SystemExit, match="gorgon generate: error: .*missing.txt"):
        generate_main([*args, "--prediction", f"@{tmp_path / 'missing.txt'}"])


def test_generate_command_chats_through_the_template(capsys, tiny_model_dir):
    args = ["--prompt", "What is a list?", "--temperature", "0", "--max-tokens", "16", "--chat"]
    generate_main([*args, "--json"])
    out = json.loads(capsys.readouterr().out)
    llm = LLM(DEFAULT_MODEL_DIR)
    expected = llm.generate(chat_prompt_ids(llm.tokenizer, "What is a list?"), SamplingParams(max_tokens=16,
                                                                                               temperature=0))[0]
    assert out["token_ids"] == expected.token_ids
    generate_main(args)
    assert capsys.readouterr().out == expected.text + "\n"  # the answer, without the prompt
    with pytest.raises(SystemExit, match="--chat needs a chat model"):
        generate_main([*args, "--model", str(tiny_model_dir)])


def test_a_chat_template_given_replaces_the_tokenizers(capsys, tiny_model_dir):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    llm = LLM(tiny_model_dir, chat_template=template)  # (its tokenizer has no template of its own)
    assert chat_prompt_ids(llm.tokenizer, "hi") == llm.tokenizer("<user>hi<assistant>")["input_ids"]
    generate_main(["--model", str(tiny_model_dir), "--chat", "--chat-template", template, "--prompt", "hi",
                   "--max-tokens", "3", "--temperature", "0", "--ignore-eos", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == llm.generate(chat_prompt_ids(llm.tokenizer, "hi"),
                                            SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0].token_ids
    for broken in ("{{ messages | no_such_filter }}", "{{ raise_exception('no system message') }}"):
        with pytest.raises(ValueError, match="the chat template does not render a user's message"):
            LLM(tiny_model_dir, chat_template=broken)
    with pytest.raises(ValueError, match="the chat template leaves a user's message out"):
        LLM(tiny_model_dir, chat_template="{{ bos_token }}<assistant>")


def test_generate_command_refuses_a_prompt_too_long_before_printing_it(capsys):
    with pytest.raises(SystemExit, match="gorgon generate: error: the prompt has"):
        generate_main(["--prompt", "x " * 5000, "--max-tokens", "4"])
    assert capsys.readouterr().out == ""


def test_bench_keeps_batch_size_requests_in_flight_until_the_last_starts(tiny_model_dir):
    llm = LLM(tiny_model_dir, enable_prefix_caching=False)
    texts = ["def f(x):", "import os", "class A:", "for i in", "while True:", "x = [", "y = {"]
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True) for i in range(len(texts))]
    running, step = [], llm.step
    llm.step = lambda: (running.append(len(llm.scheduler.running)), step())[1]
    seconds, tokens, outputs = in_flight(llm, texts, params, 3)
    # a request starts as soon as another ends, so 3 decode until the queue is empty; then the rest drain
    assert max(running) == 3 and running[:running.index(3) + 1].count(3) == 1
    assert [len(o.token_ids) for o in outputs] == [p.max_tokens for p in params]
    assert seconds > 0 and 0 < tokens < sum(p.max_tokens for p in params)  # (the drain left out)
    llm.step = step
    assert [o.token_ids for o in outputs] == [o.token_ids for o in llm.generate(texts, params)]


def test_bench_medusa_end_to_end(tiny_model_dir, heads_dir, tmp_path):
    out = tmp_path / "medusa.json"
    bench_main(["--model", str(tiny_model_dir), "--medusa", str(heads_dir), "--new-tokens", "12", "--num-prompts", "6",
                "--repeats", "1", "--no-sweep", "--threads", str(torch.get_num_threads()), "--out", str(out)])
    result = json.loads(out.read_text())
    summary = result["summary"]
    runs = result["runs"]
    assert [(r["batch_size"], r["temperature"]) for r in runs] == [(1, 0.0), (4, 0.0), (1, 0.7), (4, 0.7)]
    for r in runs:  # every output token but the prefill's came from a tree step
        assert sum(int(n) * count for n, count in r["accept_length_histogram"].items()) == 6 * 11
        assert r["mean_accepted"] == pytest.approx(6 * 11 / r["num_steps"])
        assert r["speedup"] == pytest.approx(r["medusa_tok_s"] / r["plain_tok_s"])
        assert r["tree_step_cost"] is None  # (the tests' engines time no steps: conftest.no_step_timing)
    assert summary["lossless"] is True and summary["sampled_lossless"] is True and summary["tree"] == "chain4"
    assert result["steady"]["lossless"] and summary["steady_speedup_bs4"] == result["steady"]["steady_speedup"] > 0
    assert summary["mean_accepted_bs1"] == runs[0]["mean_accepted"] > 1  # the trained heads' drafts are accepted
    assert summary["sampled_tokens_per_step_bs1"] == runs[2]["mean_accepted"]
    assert (summary["speedup_bs4"], summary["sampled_speedup_bs4"]) == (runs[1]["speedup"], runs[3]["speedup"])
    assert result["draft_vocab_size"] == 256
    assert 0 <= summary["repeated_8grams_bs1"] == runs[0]["repeated_8grams"] <= 1


def test_bench_medusa_tells_answers_caught_in_a_loop():
    """A loop (which any drafter copies) flatters a speedup: the bench says how much its answers repeat."""
    goes_on, loop = SimpleNamespace(token_ids=list(range(40))), SimpleNamespace(token_ids=[1, 2, 3] * 20)
    assert repeated_share([goes_on]) == 0 and repeated_share([loop]) == 50 / 53  # (53 8-grams, 3 of them new)
    assert repeated_share([goes_on, loop]) == 50 / (33 + 53)


def test_bench_prediction_end_to_end(tiny_model_dir, tmp_path):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text('{"prompt": "tell me"}\n')
    out = tmp_path / "p.json"
    prediction_main(["--model", str(tiny_model_dir), "--medusa", "lookup", "--prompts", str(prompts),
                     "--num-prompts", "1", "--max-tokens", "24", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["summary"]["lossless"] and [r["kind"] for r in result["rows"]] == ["again"] + ["edit"] * 3
    # the edit prompts cut to the 512-token context; every arm gave plain decoding's tokens
    assert all(r["tokens"] == 24 and r["plain_tokens_per_step"] == 1 for r in result["rows"])


def test_bench_medusa_llama_cpp_baseline_needs_a_gguf_file(tiny_model_dir, heads_dir, tmp_path):
    with pytest.raises(SystemExit, match="one GGUF file"):
        bench_main(["--model", str(tiny_model_dir), "--medusa", str(heads_dir), "--baseline", "llama.cpp",
                    "--out", str(tmp_path / "o.json")])


def test_ngram_index_proposes_what_followed_the_latest_earlier_occurrence():
    index = NgramIndex()
    tokens = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    assert index.propose(tokens, 4) == [4, 5, 9, 1]  # (1, 2, 3) occurred at 0: what followed it
    tokens += [7, 2, 3]
    assert index.propose(tokens, 2) == [7, 2]  # no (7, 2, 3) before; the latest (2, 3) was followed by 7
    assert index.propose(tokens + [8], 4) == []  # (3, 8) and (2, 3, 8) never occurred
    assert NgramIndex().propose([7, 7, 7, 7], 3) == [7]  # the run itself, up to the end of the sequence
    assert NgramIndex().propose([1, 2], 3) == []



def test_prediction_index_drafts_the_prediction_from_its_start_and_in_order():
    index = PredictionIndex.of([50, 51, 52], [1, 2, 3, 9, 1, 2, 3, 8])
    assert index.propose([50, 51, 52, 1], 3) == [2, 3, 9]  # the answer's first token began the prediction
    assert index.followed
    # (1, 2, 3) occurs twice: the occurrence where the answer has got to in the prediction
    assert index.propose([50, 51, 52, 1, 2, 3, 9, 1, 2, 3], 4) == [8]
    assert index.propose([50, 51, 52, 1, 2, 3], 4) == [9, 1, 2, 3]
    assert index.propose([50, 51, 52, 1, 2, 3, 9, 4], 2) == []  # the answer left the prediction
    assert index.propose([50, 51, 52, 1, 2, 3, 9, 4, 9, 1], 2) == [2, 3]  # (9, 1): back in it, two tokens on
    assert not index.followed
    assert index.propose([5, 6], 3) == []


@pytest.mark.parametrize("speculation", ["heads", "lookup", "prediction"])
def test_a_predicted_output_is_drafted_and_verified_losslessly(tiny_model_dir, heads_dir, speculation):
    """SamplingParams.prediction (OpenAI's Predicted Outputs): where the output follows the prediction, its next
    tokens are verified as a chain, longer than lookup's once it has followed for a while, so a right prediction
    takes a fraction of the steps; the tokens are plain decoding's whatever the prediction (right, edited, wrong),
    greedy or seeded sampling."""
    prompts = [[(11 * i + 5 * j) % 250 + 3 for j in range(12)] for i in range(2)]

    def steps(out: RequestOutput) -> int:  # plain steps emit one token each
        return len(out.token_ids) - sum(out.accepted_lengths) + len(out.accepted_lengths)

    plain_llm = LLM(tiny_model_dir)
    kwargs = dict(medusa=str(heads_dir), medusa_tree="cpu6") if speculation == "heads" else dict(medusa=speculation)
    llm = LLM(tiny_model_dir, **kwargs)
    for temperature in (0.0, 0.8):
        params = SamplingParams(max_tokens=48, temperature=temperature, seed=5, ignore_eos=True)
        plain = [o.token_ids for o in plain_llm.generate(prompts, params)]
        edited = [out[:20] + [(t + 1) % 250 + 3 for t in out[20:24]] + out[24:] for out in plain]
        wrong = [[(t * 7) % 250 + 3 for t in out] for out in plain]
        for predictions in (plain, edited, wrong):
            for prompt, prediction, expected in zip(prompts, predictions, plain):
                out = llm.generate([prompt], replace(params, prediction=prediction))[0]
                assert out.token_ids == expected
                if predictions is plain and temperature == 0.0:
                    assert steps(out) <= len(expected) // 3  # chains of 4+ accepted whole
                    # once the answer has followed it for PREDICTION_RUN tokens, chains as long as prediction_limit
                    assert max(out.accepted_lengths) == llm.medusa.prediction_limit + 1 > llm.medusa.chain_limit(1) + 1
        with_edit = llm.generate([prompts[0]], replace(params, prediction=edited[0]))[0]
        without = llm.generate([prompts[0]], params)[0]
        if temperature == 0.0:  # past the edit, the output finds the prediction again
            assert sum(with_edit.accepted_lengths[-5:]) > 5 * 3
            assert steps(with_edit) < steps(without)
        # in a batch (with heads: chains as long as their batch tree drafts), each its own prediction
        together = llm.generate(prompts, [replace(params, prediction=p) for p in (plain[0], edited[1])])
        assert [o.token_ids for o in together] == plain
    if speculation == "prediction":  # predicted outputs alone: answers that repeat themselves are not looked up
        repeating = [[(7 * i + j) % 250 + 3 for j in range(6)] * 3 for i in range(3)]
        greedy = SamplingParams(max_tokens=64, **GREEDY)
        lookup = LLM(tiny_model_dir, medusa="lookup")
        assert not any(llm.generate([prompt], greedy)[0].accepted_lengths for prompt in repeating)
        assert any(lookup.generate([prompt], greedy)[0].accepted_lengths for prompt in repeating)
    assert llm.num_free_blocks == llm.block_manager.num_blocks
    with pytest.raises(ValueError, match="prediction token ids"):
        llm.generate([prompts[0]], SamplingParams(max_tokens=4, prediction=[1, 1 << 20]))

@pytest.mark.parametrize(("tree", "ngram_tokens", "longest_alone"), [("chain2", None, 2), ("cpu6", None, 6),
                                                                     ("cpu6", 4, 4), ("chain2", 0, 0)])
def test_prompt_lookup_drafts_are_verified_losslessly(tiny_model_dir, heads_dir, tree, ngram_tokens, longest_alone):
    """Where a sequence decoding alone repeats its earlier tokens, the tokens after them are verified as a chain in
    place of the heads' tree, as many as the tree drafts (its nodes but the root: a step costs no more rows than the
    tree's), at most ngram_tokens; greedy output stays plain decoding's. The random model's greedy runs fall into
    loops (one repeats a token 17 times), which lookup drafts predict whole."""
    params = SamplingParams(max_tokens=64, **GREEDY)
    repeating = [[(7 * i + j) % 250 + 3 for j in range(6)] * 3 for i in range(3)]
    plain = LLM(tiny_model_dir).generate(repeating, params)
    llm = LLM(tiny_model_dir, medusa=str(heads_dir), medusa_tree=tree, medusa_ngram_tokens=ngram_tokens)
    medusa = llm.medusa
    verify, chains, lookup_accepted, mixed = medusa.verify, {1: [], 2: []}, [], []

    def recording_verify(seqs, *args):
        own, num_running = [s.draft_tree for s in seqs], args[-1]
        chains[min(num_running, 2)].extend(len(s.draft_token_ids) for s, vt in zip(seqs, own) if vt in medusa.chains)
        out = verify(seqs, *args)
        lookup_accepted.extend(len(tokens) - 1 for tokens, vt in zip(out[0], own) if vt in medusa.chains)
        mixed.append(len({id(vt) for vt in own}) > 1)
        return out

    medusa.verify = recording_verify
    alone = [llm.generate([prompt], params)[0] for prompt in repeating]
    assert [o.token_ids for o in alone] == [o.token_ids for o in plain]
    assert max(chains[1], default=0) == longest_alone
    if longest_alone > 2:
        assert max(lookup_accepted) >= 3  # whole chains accepted: beyond what a 2-deep tree can give
    assert not any(mixed)
    # in a batch, sequences drafting a chain and those drafting the heads' tree verify each their own, in one forward;
    # chains as long as alone (no more rows than the heads' tree)
    lookup_accepted.clear()
    together = llm.generate(repeating, params)
    assert [o.token_ids for o in together] == [o.token_ids for o in plain]
    assert bool(lookup_accepted) == bool(longest_alone) and any(mixed) == bool(longest_alone)
    assert max(chains[2], default=0) == min(medusa.tree_for(3).tree.size - 1, longest_alone)
    assert llm.num_free_blocks == llm.block_manager.num_blocks


def test_lookup_alone_speculates_for_a_model_without_heads(tiny_model_dir):
    """medusa="lookup": no heads; sequences whose last tokens occurred before verify a lookup chain, the others
    decode plainly. Greedy output is plain decoding's, seeded sampling draws plain sampling's tokens (one draw
    per emitted token, as the rejection rule makes), and no block leaks."""
    repeating = [[(7 * i + j) % 250 + 3 for j in range(6)] * 3 for i in range(3)]
    plain_llm = LLM(tiny_model_dir)
    assert LLM(tiny_model_dir, medusa="lookup").medusa.max_batch_size == 1  # the default: batch 1
    llm = LLM(tiny_model_dir, medusa="lookup", medusa_max_batch_size=4)  # chains beside plain rows in a step
    # chains of 4 (LOOKUP_TOKENS); room for 8 from a predicted output a sequence alone follows
    assert llm.medusa.heads is None and llm.medusa.chain_limit(1) == 4 and llm.medusa.max_tree_size == 9
    runs = {}
    for temperature in (0.0, 0.8):
        params = SamplingParams(max_tokens=64, temperature=temperature, seed=3, ignore_eos=True)
        plain, runs[temperature] = plain_llm.generate(repeating, params), llm.generate(repeating, params)
        assert [o.token_ids for o in runs[temperature]] == [o.token_ids for o in plain]
    assert max(n for o in runs[0.0] for n in o.accepted_lengths) >= 3
    assert llm.num_free_blocks == llm.block_manager.num_blocks
    with pytest.raises(ValueError, match="medusa_ngram_tokens must be >= 1"):
        LLM(tiny_model_dir, medusa="lookup", medusa_ngram_tokens=0)
    with pytest.raises(ValueError, match="medusa_tree is for heads"):
        LLM(tiny_model_dir, medusa="lookup", medusa_tree="chain4")
