"""Hydra heads (sequential Medusa heads: each also reads the tokens before the one it predicts): their files,
level-by-level drafting against a node-by-node reference, training on the cache, and lossless speculation.
Tiny random models; the heads are trained for a few seconds on the model's own greedy text."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.medusa.acceptance import Acceptance
from engine.medusa.speculator import Medusa, hydra_levels
from engine.medusa.tree import TREES, build_tree, spine_may_grow, spine_paths, spine_tree
from engine.training.medusa import TrainConfig, accuracy_of, build_cache, held_out_ranks, self_distill, train_heads
from models.kernels.decode import load_decode_kernels, set_decode_kernels
from models.loader import load_model
from models.medusa import WEIGHTS_FILE, MedusaConfig, MedusaHeads, load_medusa_heads, save_medusa_heads

GREEDY = dict(temperature=0.0, ignore_eos=True)


def random_hydra(num_heads: int = 3, num_layers: int = 1, own_lm_head: bool = False) -> MedusaHeads:
    heads = MedusaHeads(MedusaConfig(num_heads, num_layers, 64, 256, own_lm_head, sequential=True))
    generator = torch.Generator().manual_seed(0)  # the same heads whichever tests ran before
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.1, generator=generator)
    return heads


@pytest.fixture(scope="module")
def distilled(tiny_model_dir):
    windows = self_distill(tiny_model_dir, num_samples=24, seq_len=48, prefix_tokens=4, temperature=0.0, seed=0)
    return windows[4:], windows[:4]


@pytest.fixture(scope="module")
def hydra_dir(tiny_model_dir, distilled, tmp_path_factory):
    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    config = TrainConfig(num_heads=4, head_kind="hydra", steps=60, batch_size=8 * 48, seq_len=48, lr=1e-2)
    heads, _ = train_heads(model, build_cache(model, distilled[0], 4), config, progress=False)
    folder = tmp_path_factory.mktemp("hydra")
    save_medusa_heads(heads, folder)
    return folder


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = (int(torch.randint(2, 30, (1,), generator=g)) for _ in range(n))
    return [torch.randint(3, 250, (length,), generator=g).tolist() for length in lengths]


# ---- files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("own_lm_head", [False, True])
def test_hydra_heads_round_trip(tmp_path, own_lm_head):
    heads = random_hydra(own_lm_head=own_lm_head)
    heads.draft_vocab = torch.tensor([7, 3, 200, 64, 5])
    save_medusa_heads(heads, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["head_kind"] == "hydra"
    keys = set(load_file(tmp_path / WEIGHTS_FILE))
    assert {"0.input.weight", "2.input.bias", "2.0.linear.bias"} <= keys and ("0.1.weight" in keys) == own_lm_head
    loaded = load_medusa_heads(tmp_path, 64, 256)
    assert loaded.config == heads.config and loaded.kind == "hydra"
    assert torch.equal(loaded.draft_vocab, heads.draft_vocab)
    lm_head = torch.nn.Linear(64, 256, bias=False)
    x, embeddings = torch.randn(5, 64), torch.randn(3, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, lm_head, embeddings=embeddings), heads(x, lm_head, embeddings=embeddings),
                                   rtol=0, atol=0)
        with pytest.raises(ValueError, match="give their embeddings"):
            loaded(x, lm_head)


def test_a_medusa_folder_stays_medusa_and_the_loader_is_strict(tmp_path):
    save_medusa_heads(MedusaHeads(MedusaConfig(2, 1, 64, 256, False)), tmp_path)
    assert "head_kind" not in json.loads((tmp_path / "config.json").read_text())  # the published format
    assert load_medusa_heads(tmp_path, 64, 256).kind == "medusa"
    save_medusa_heads(random_hydra(2), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    save_file({k: v for k, v in tensors.items() if k != "1.input.bias"}, tmp_path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="missing \\['1.input.bias'\\]"):
        load_medusa_heads(tmp_path, 64, 256)
    save_file(tensors, tmp_path / WEIGHTS_FILE)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"head_kind": "medusa"}))
    with pytest.raises(ValueError, match="unexpected \\['0.input.bias'"):
        load_medusa_heads(tmp_path, 64, 256)
    (tmp_path / "config.json").write_text(json.dumps(config | {"head_kind": "eagle"}))
    with pytest.raises(ValueError, match="head_kind"):
        load_medusa_heads(tmp_path, 64, 256)


# ---- drafting ----------------------------------------------------------------------------------------------
def children(heads: MedusaHeads, model, hidden: torch.Tensor, path_tokens: list[int],
             k: int) -> tuple[list[int], list[float]]:
    """The k likeliest draft-vocabulary children (ids, log-probabilities) of the node whose path is path_tokens
    (root first): the heads reading the hidden state and those tokens through the whole-vocabulary forward; with
    the CPU kernels (whose drafting weights are in Q8_0) node by node through draft_level, a call a level."""
    embedding = model.model.embed_tokens
    if heads.kernels is None:
        embeddings = embedding(torch.tensor(path_tokens))[:, None]  # [depth, 1, hidden]
        logits = heads(hidden[None], model.lm_head, len(path_tokens), embeddings=embeddings)[-1, 0, heads.draft_vocab]
        top = logits.log_softmax(dim=-1).topk(k)
        return heads.draft_vocab[top.indices].tolist(), top.values.tolist()
    draft, state = heads.draft_weights(model.lm_head), hidden[None]
    for depth, token in enumerate(path_tokens):
        state, ids, logprobs = heads.draft_level(state, embedding(torch.tensor([token])), depth, draft, k)
    return ids[0].tolist(), logprobs[0].tolist()


def reference_drafts(heads: MedusaHeads, model, tree, hidden: torch.Tensor, root: int) -> list[int]:
    """Node by node: a node's token is the rank-r child of its parent (children)."""
    tokens = {(): root}
    for path in tree.paths:
        path_tokens = [tokens[path[:d]] for d in range(len(path))]
        tokens[path] = children(heads, model, hidden, path_tokens, tree.top_k)[0][path[-1]]
    return [tokens[p] for p in tree.paths]


def drafting_heads(use_kernel: bool) -> MedusaHeads:
    """Random Hydra heads over a draft vocabulary, drafting through the CPU kernels (Q8_0 weights) or in torch."""
    heads = random_hydra(4, num_layers=2).eval()
    heads.draft_vocab = torch.arange(3, 250, 2)
    kernels = load_decode_kernels(heads) if use_kernel else None
    if use_kernel and kernels is None:
        pytest.skip("the CPU decode kernels could not be built here")
    set_decode_kernels(heads, kernels)
    return heads


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("tree_name", ["chain4", "cpu12"])
def test_level_by_level_drafts_equal_node_by_node_drafts(tiny_model_dir, tree_name, use_kernel):
    """The speculator drafts a tree level by level for a batch; each node's token must be what the heads give
    along its own path."""
    llm = LLM(tiny_model_dir, medusa_tree=tree_name, dtype="float32")
    heads = drafting_heads(use_kernel)
    model, tree = llm.model, build_tree(TREES[tree_name], tree_name)
    medusa = Medusa(heads, [(tree, None)], model, llm.runner.kv_cache, 256, Acceptance("rejection", 0.09, 0.3))
    hidden, roots = torch.randn(3, 64), torch.tensor([5, 77, 200])
    with torch.inference_mode():
        drafts = medusa._draft_levels(hidden, roots, medusa.tree_for(1).levels)
        for b in range(3):
            flat = [t for level in drafts[b] for t in level]
            assert [len(level) for level in drafts[b]] == [tree.depths.count(d) for d in range(1, tree.depth + 1)]
            assert flat == reference_drafts(heads, model, tree, hidden[b], int(roots[b]))


@pytest.mark.parametrize("use_kernel", [True, False])
def test_spine_drafts_equal_node_by_node_drafts(tiny_model_dir, use_kernel):
    """A sequence decoding alone drafts a spine tree as big as the static one; each node's token must be what the
    heads give along its own path, and the tree the likeliest nodes by the heads' own probabilities."""
    llm = LLM(tiny_model_dir, dtype="float32")
    heads = drafting_heads(use_kernel)
    model, tree = llm.model, build_tree(TREES["cpu6"], "cpu6")
    medusa = Medusa(heads, [(tree, None)], model, llm.runner.kv_cache, 256, Acceptance("rejection", 0.09, 0.3),
                    spine=True)
    spine = medusa.tree_for(1).spine
    assert (spine.size, spine.depth, spine.width) == (7, 4, 6)
    assert medusa.max_tree_size == 7  # each sequence verifies its own tree
    roots, hidden = (5, 77, 200), torch.stack([torch.randn(64, generator=torch.Generator().manual_seed(b))
                                                for b in range(3)])
    with torch.inference_mode():
        together = medusa._draft_spines(hidden, list(roots), spine)  # a batch drafts each sequence's own
    for b, root in enumerate(roots):
        with torch.inference_mode():
            [(drafts, vt)] = medusa._draft_spines(hidden[b:b + 1], [root], spine)
            expected = reference_drafts(heads, model, vt.tree, hidden[b], root)
            spine_tokens, logprobs = [root], []  # the spine's children, level by level
            for _ in range(4):
                ids, level = children(heads, model, hidden[b], spine_tokens, 6)
                logprobs.append(level)
                spine_tokens.append(ids[0])
        assert vt.tree.size == 7 and [t for level in drafts for t in level] == expected
        assert vt.tree.paths == [tuple(p) for p in spine_paths(spine_tree(logprobs, 7))]
        assert vt is medusa._draft_spines(hidden[b:b + 1], [root], spine)[0][1]  # one VerifyTree per shape
        assert together[b][1] is vt and together[b][0] == drafts


def test_spine_tree_takes_the_likeliest_paths():
    logprobs = [[-0.1, -2.5, -3.0], [-0.2, -1.0, -4.0], [-3.0, -3.1, -5.0]]
    # scores: depth 1 -0.1 -2.5 -3.0; depth 2 -0.3 -1.1 -4.1; depth 3 -3.3 -3.4 -5.3
    assert spine_tree(logprobs, 2) == [1]
    assert spine_tree(logprobs, 5) == [2, 2]
    assert spine_tree(logprobs, 7) == [3, 2, 1]
    assert spine_tree([[0.0, -1.0], [-1.0, -2.0]], 3) == [2]  # a tie goes to the shallower node
    assert spine_paths([3, 2, 1]) == [[0], [1], [2], [0, 0], [0, 1], [0, 0, 0]]


def test_drafting_stops_where_no_deeper_node_can_enter_the_spine_tree():
    """spine_may_grow: once it says no after d levels, the tree of all the levels is the tree of those d (so the
    levels after them need not be drafted); it says yes while a deeper node could still enter."""
    logprobs = [[-0.1, -2.5, -3.0], [-0.2, -1.0, -4.0], [-3.0, -3.1, -5.0]]
    assert spine_may_grow(logprobs[:1], 3) and not spine_may_grow(logprobs[:2], 3)  # -0.3 vs -0.1, -0.3, -1.1
    assert not spine_may_grow([[0.0, -1.0]], 2)  # a deeper node ties at best, and ties go to the shallower
    gen = torch.Generator().manual_seed(0)
    stopped = 0
    for _ in range(2000):
        size, depth, width = int(torch.randint(2, 14, (1,), generator=gen)), 5, 6
        raw = torch.randn(depth, width, generator=gen) * float(torch.rand(1, generator=gen) * 4)
        levels = raw.log_softmax(dim=-1).sort(dim=-1, descending=True).values.tolist()
        for d in range(1, depth):
            if not spine_may_grow(levels[:d], size):
                assert spine_tree(levels[:d], size) == spine_tree(levels, size), (levels, size, d)
                stopped += 1
                break
    assert stopped > 200


def test_hydra_levels_of_a_tree():
    tree = build_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])  # nodes 1 [0], 2 [1], 3-5, 6 [0,0,0]
    levels = hydra_levels(tree)
    assert [lv.parents.tolist() for lv in levels] == [[0], [0, 1], [0]]  # indices among each depth's nodes
    assert [lv.child_parent.tolist() for lv in levels] == [[0, 0], [0, 0, 1], [0]]
    assert [lv.child_rank.tolist() for lv in levels] == [[0, 1], [0, 1, 0], [0]]
    assert [lv.top_k for lv in levels] == [2, 2, 1]


# ---- training and speculation ----------------------------------------------------------------------------
def test_hydra_heads_train_on_the_cache(tiny_model_dir, distilled):
    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    cache = build_cache(model, distilled[0], 3)
    assert torch.equal(cache.head_inputs(slice(None))[:, 1:], cache.targets[:, :2])  # the right tokens before
    heads, history = train_heads(model, cache, TrainConfig(num_heads=3, head_kind="hydra", steps=30, batch_size=384,
                                                           lr=1e-2), progress=False)
    assert heads.kind == "hydra" and sum(history[-5:]) < 0.9 * sum(history[:5])
    before = accuracy_of(held_out_ranks(MedusaHeads(heads.config), model, cache))
    after = accuracy_of(held_out_ranks(heads, model, cache))
    assert all(a["top5"] > b["top5"] for a, b in zip(after, before))


@pytest.mark.parametrize("tree", ["chain4", "cpu12", None])
def test_greedy_hydra_equals_plain_greedy_batch1(tiny_model_dir, hydra_dir, tree):
    """A named tree, or (None) the default tree's spine trees."""
    params = SamplingParams(max_tokens=40, **GREEDY)
    plain = LLM(tiny_model_dir).generate(prompts(1), params)[0]
    llm = LLM(tiny_model_dir, medusa=str(hydra_dir), medusa_tree=tree)
    assert llm.medusa.heads.kind == "hydra" and (llm.medusa.tree_for(1).spine is None) == (tree is not None)
    out = llm.generate(prompts(1), params)[0]
    assert out.token_ids == plain.token_ids and sum(out.accepted_lengths) == 39
    assert llm.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.parametrize("tree", ["cpu12", None])
def test_greedy_hydra_equals_plain_in_a_mixed_batch(tiny_model_dir, hydra_dir, tree):
    """8 requests: different prompt lengths (chunked prefill beside tree steps), max_tokens that end runs, a
    request that opts out, a tight cache (preemption); the last one left decodes alone (None: on spine trees)."""
    kwargs = dict(max_num_batched_tokens=64, num_kv_blocks=24, block_size=8)
    ps = prompts(8)
    params = [SamplingParams(max_tokens=n, use_medusa=i != 3, **GREEDY)
              for i, n in enumerate((41, 17, 29, 33, 23, 37, 19, 45))]
    plain = LLM(tiny_model_dir, **kwargs).generate(ps, params)
    llm = LLM(tiny_model_dir, medusa=str(hydra_dir), medusa_tree=tree, **kwargs)
    outs = llm.generate(ps, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert outs[3].accepted_lengths == [] and max(n for o in outs for n in o.accepted_lengths) > 1
    assert llm.num_free_blocks == llm.block_manager.num_blocks and llm.scheduler.num_preemptions > 0


@pytest.mark.parametrize("tree", ["cpu12", None])
def test_seeded_sampled_hydra_equals_seeded_plain_sampling(tiny_model_dir, hydra_dir, tree):
    params = [SamplingParams(max_tokens=30, temperature=t, top_p=0.9, seed=i, ignore_eos=True)
              for i, t in enumerate([0.2, 0.5, 1.0])]
    plain = LLM(tiny_model_dir).generate(prompts(3), params)
    llm = LLM(tiny_model_dir, medusa=str(hydra_dir), medusa_tree=tree)
    outs = [llm.generate([p], param)[0] for p, param in zip(prompts(3), params)]  # each alone (None: spine trees)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
