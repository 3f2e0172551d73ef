"""Medusa paths the other tests do not reach: the 63-node tree end to end, and a LoRA adapter on a branching tree
whose accepted paths leave the first branch (so compaction really moves K/V). Lossless means greedy Medusa
emits exactly plain greedy decoding's tokens. Drafts come from the plain run (an oracle), so that trees are
accepted deep and along every kind of path."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from engine import LLM, RequestOutput, SamplingParams
from models.medusa import MedusaConfig, MedusaHeads, save_medusa_heads

from conftest import hf_model, save_tiny_model

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
# where the right token sits among a head's top-k drafts, by position (None: absent)
RANKS = [0, 0, 0, 0, 0, 0, 1, 1, 2, None]
MIN_TOKENS = 4


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 250, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory) -> Path:
    """Random heads: the oracle drafts replace what they propose, only their count and shape matter."""
    folder = tmp_path_factory.mktemp("random_heads")
    save_medusa_heads(MedusaHeads(MedusaConfig(num_heads=4, num_layers=1, hidden_size=64, vocab_size=256,
                                               own_lm_head=False)), folder)
    return folder


def use_oracle_drafts(llm: LLM, futures: dict[str, list[int]]) -> list[list[int]]:
    """Draft from a plain run (request id -> prompt + output): the right token sits at a rank that varies with
    position (RANKS). Returns the list that each accepted tree path (root first) is appended to."""
    tree = llm.medusa.tree_for(1).tree

    def propose(seqs, hidden, num_running):
        for seq in seqs:
            seq.draft_token_ids = None
            if not llm.medusa.can_speculate(seq):
                continue
            future, root = futures[seq.request_id], len(seq) - 1
            drafts = []
            for d in range(1, tree.depth + 1):
                right = future[root + d] if root + d < len(future) else 0
                ranked = [(right + 1 + r) % 256 for r in range(tree.top_k)]
                rank = RANKS[(7 * root + d) % len(RANKS)]
                if rank is not None and rank < tree.top_k:
                    ranked[rank] = right
                drafts.append(ranked)
            seq.draft_token_ids, seq.draft_tree = drafts, llm.medusa.tree_for(1).verify

    paths: list[list[int]] = []
    compact = llm.medusa._compact

    def recording_compact(slot_mapping, size, accepted_paths):
        paths.extend(accepted_paths)
        compact(slot_mapping, size, accepted_paths)

    llm.medusa.propose = propose
    llm.medusa._compact = recording_compact
    return paths


def run(llm: LLM, requests: list[tuple[list[int], str | None]],
        params: list[SamplingParams] | None = None) -> list[RequestOutput]:
    params = params or [GREEDY] * len(requests)
    ids = [llm.add_request(p, params[i], request_id=f"r{i}", adapter=a) for i, (p, a) in enumerate(requests)]
    finished = {}
    while llm.has_unfinished():
        finished.update({o.request_id: o for o in llm.step() if o.finished})
    assert llm.num_free_blocks == llm.block_manager.num_blocks
    return [finished[i] for i in ids]


def check_lossless(plain: LLM, medusa: LLM, requests: list[tuple[list[int], str | None]],
                   params: list[SamplingParams] | None = None) -> list[list[int]]:
    """Greedy Medusa == plain greedy, token for token; returns the accepted tree paths."""
    want = run(plain, requests, params)
    paths = use_oracle_drafts(medusa, {f"r{i}": p + o.token_ids for i, ((p, _), o) in enumerate(zip(requests, want))})
    got = run(medusa, requests, params)
    for i, (a, b) in enumerate(zip(want, got)):
        assert b.token_ids == a.token_ids and b.text == a.text, i
    accepted = [n for o in got for n in o.accepted_lengths]
    assert sum(accepted) > 2 * len(accepted)  # trees were really accepted, several tokens a step
    return paths


def test_the_63_node_tree_is_lossless(tiny_model_dir, heads_dir):
    kwargs = dict(block_size=8, max_num_batched_tokens=96)
    requests = [(p, None) for p in prompts(4)]
    medusa = LLM(tiny_model_dir, medusa=str(heads_dir), medusa_tree="mc_sim_7b_63", **kwargs)
    assert medusa.medusa.tree_for(1).tree.size == 64
    paths = check_lossless(LLM(tiny_model_dir, **kwargs), medusa, requests)
    assert any(path[1] != 1 for path in paths if len(path) > 1)  # a path off the first branch was accepted
    assert max(map(len, paths)) == 5  # and a path as deep as the tree


def test_min_tokens_bans_stop_tokens_at_every_node_before_it(tiny_model_dir, heads_dir):
    """Each request's stop token is the one its greedy answer repeats most, which it ends at without min_tokens:
    the tree's nodes at depths before min_tokens must not take or end on it, and later ones may."""
    kwargs = dict(block_size=8, max_num_batched_tokens=96)
    plain = LLM(tiny_model_dir, **kwargs)
    requests = [(p, None) for p in prompts(4)]
    stops = [Counter(o.token_ids[1:]).most_common(1)[0][0] for o in run(plain, requests)]
    params = [SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[stop], ignore_eos=True,
                             min_tokens=MIN_TOKENS) for stop in stops]
    check_lossless(plain, LLM(tiny_model_dir, medusa=str(heads_dir), **kwargs), requests, params)
    outs = run(plain, requests, params)
    for out, stop in zip(outs, stops):
        assert stop not in out.token_ids[:MIN_TOKENS]
        assert out.finish_reason == "length" or (out.token_ids[-1] == stop and len(out.token_ids) > MIN_TOKENS)
    assert any(o.finish_reason == "stop" for o in outs)  # a stop token did end an answer, once it could
    banned = [SamplingParams(max_tokens=MIN_TOKENS, temperature=0, ignore_eos=True, logit_bias={stop: -100.0})
              for stop in stops]
    assert [o.token_ids[:MIN_TOKENS] for o in outs] == [o.token_ids for o in run(plain, requests, banned)]


@pytest.fixture(scope="module")
def lora_root(tiny_model_dir, tmp_path_factory) -> Path:
    """A PEFT LoRA on every projection with random non-zero weights (PEFT's init makes LoRA a no-op)."""
    root = tmp_path_factory.mktemp("adapters")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"])
    model = get_peft_model(hf_model(tiny_model_dir), config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(root / "lora")
    return root


@pytest.mark.parametrize("tree", ["cpu6", "cpu12"])
def test_lora_on_a_branching_tree_is_lossless(tiny_model_dir, heads_dir, lora_root, tree):
    """Two LoRA requests and a base one in the same batches: verification runs through the adapter, and the
    accepted K/V (computed through the adapter) moves from the tree's slots to the sequence's next ones."""
    kwargs = dict(block_size=8, adapter_root=str(lora_root))
    plain = LLM(tiny_model_dir, **kwargs)
    medusa = LLM(tiny_model_dir, medusa=str(heads_dir), medusa_tree=tree, **kwargs)
    for llm in (plain, medusa):
        llm.load_adapter("lora", "lora")
    ps = prompts(3)
    requests = [(ps[0], "lora"), (ps[1], None), (ps[2], "lora")]
    base_only = run(LLM(tiny_model_dir), [(p, None) for p in ps])
    paths = check_lossless(plain, medusa, requests)
    assert run(plain, requests)[0].token_ids != base_only[0].token_ids  # the adapter changes the output
    moved = [path for path in paths if any(node != depth for depth, node in enumerate(path))]
    assert moved and any(path[1] != 1 for path in moved)  # K/V moved, off the first branch too


def test_dynamic_ntk_beyond_the_original_context_is_lossless(heads_dir, tmp_path):
    """Tree nodes are rotated as plain decoding rotates the same tokens (dynamic NTK: for position + 1, past a
    prompt longer than the original context)."""
    folder = save_tiny_model(tmp_path, max_position_embeddings=32,
                             rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    kwargs = dict(block_size=8)
    requests = [(p * 4, None) for p in prompts(3)]  # up to 116 tokens: most prompts are past the original 32
    medusa = LLM(folder, medusa=str(heads_dir), medusa_tree="cpu12", **kwargs)
    assert medusa.max_model_len == 128
    check_lossless(LLM(folder, **kwargs), medusa, [(p[:88], a) for p, a in requests])


def test_drafts_never_preempt_another_sequence(tiny_model_dir):
    """Where a tree's rows do not fit the free blocks, its sequence decodes plainly rather than preempt another
    (which would lose all its K/V): with blocks for both prompts and a plain step, and not for a tree as well."""
    repeating, other = [5, 6, 7, 8] * 7, list(range(100, 130))  # 28 and 30 tokens: 4 blocks of 16 hold both
    kwargs = dict(num_kv_blocks=4, block_size=16)
    plain = LLM(tiny_model_dir, **kwargs)
    prediction = plain.generate(repeating, SamplingParams(max_tokens=8, temperature=0))[0].token_ids
    params = [SamplingParams(max_tokens=4, temperature=0, prediction=prediction),
              SamplingParams(max_tokens=2, temperature=0)]
    want = plain.generate([repeating, other], params)
    lookup = LLM(tiny_model_dir, medusa="lookup", medusa_max_batch_size=8, **kwargs)
    got = lookup.generate([repeating, other], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert lookup.scheduler.num_preemptions == plain.scheduler.num_preemptions == 0
    assert lookup.num_free_blocks == 4


def test_a_request_ended_by_a_tree_step_leaves_its_answer_in_the_prefix_cache(tiny_model_dir, heads_dir):
    """The blocks a request's last (tree) step filled were freed unhashed: a next turn, which starts with the
    prompt and the answer, found fewer of its tokens cached than after plain decoding."""
    kwargs = dict(block_size=4, num_kv_blocks=128)
    plain, medusa = LLM(tiny_model_dir, **kwargs), LLM(tiny_model_dir, medusa=str(heads_dir), **kwargs)
    requests = [(p, None) for p in prompts(4)]
    want = run(plain, requests)
    use_oracle_drafts(medusa, {f"r{i}": p + o.token_ids for i, ((p, _), o) in enumerate(zip(requests, want))})
    got = run(medusa, requests)
    assert all(sum(o.accepted_lengths) == len(o.token_ids) - 1 for o in got)  # every step after the prefill's, the
    # last included, was a tree step
    for (prompt, _), answer in zip(requests, want):
        next_turn = prompt + answer.token_ids + [7, 8, 9]
        cached = [llm.generate(next_turn, SamplingParams(max_tokens=1))[0].num_cached_tokens for llm in (plain, medusa)]
        assert cached[1] == cached[0] >= len(prompt + answer.token_ids) - 4
