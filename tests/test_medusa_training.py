"""`gorgon train-medusa`: the hidden-state cache, training on it over a draft vocabulary, chat self-distillation,
the tree chosen from measured acceptance and step times (and the engine using it), and the benchmark's prompt
files. Tiny random models; the heads train for a few seconds on the model's own text."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_gguf import write_gguf

import engine.training.medusa as medusa_training
from bench.medusa import load_prompts
from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.medusa.tree import (
    TREE_FILE,
    BatchTree,
    TreeChoice,
    accepted_path_counts,
    best_tree,
    expected_tokens_per_step,
    machine_tree_file,
)
from engine.training.common import head_weights, matmuls_in_bf16
from engine.training.medusa import (
    EVAL_EVERY,
    LR_WIDTH,
    MAX_RANK,
    PACE_STEPS,
    PAYS,
    TrainConfig,
    accuracy_of,
    build_cache,
    captured_cache,
    chat_prompts,
    chunk_size,
    default_lr,
    draft_logits,
    draft_vocabulary,
    held_out_ranks,
    prompts_from,
    self_distill,
    self_written_prompts,
    to_draft_ids,
    train_heads,
    trees_by_batch_size,
    weighted_loss,
    writer_dequantizes,
)
from engine.training.medusa import main as train_main
from models.kernels.decode import bf16_gemm, compiled
from models.loader import load_model
from models.medusa import WEIGHTS_FILE, MedusaConfig, MedusaHeads, load_medusa_heads, save_medusa_heads
from models.quant import QType

from conftest import hf_model, save_tiny_model

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def windows(tiny_model_dir):
    """The tiny model's own greedy text: (train [N, S], held out [M, S])."""
    texts = self_distill(tiny_model_dir, num_samples=20, seq_len=48, prefix_tokens=4, temperature=0.0, seed=0)
    return texts[4:], texts[:4]


@pytest.fixture
def chat_model_dir(tiny_model_dir, tmp_path):
    """The tiny model with a chat template: train-medusa treats it as a chat model."""
    folder = tmp_path / "chat_model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHAT_TEMPLATE}))
    return folder


def test_cache_holds_each_position_and_the_tokens_its_heads_predict(model):
    texts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]
    cache = build_cache(model, texts, num_heads=2, starts=[3, 0], batch_tokens=6)  # one text per forward
    # shortest text first; text 0 from position 2 (the token before its start: its hidden state drafts the first
    # time); each up to the last position with a token +2 to predict
    assert cache.targets.tolist() == [[13, 14], [14, -1], [9, 10], [10, -1]]
    assert cache.roots.tolist() == [12, 13, 8, 9]  # the token after each position: a tree's root
    assert cache.head_inputs(slice(None)).tolist() == [[12, 13], [13, 14], [8, 9], [9, 10]]
    # the row whose hidden state predicted each target: one further on for head 0, in the same text only
    assert cache.teachers.tolist() == [[1, -1], [-1, -1], [3, -1], [-1, -1]]
    with torch.inference_mode():
        alone = model(torch.tensor([texts[0]]), torch.arange(6)[None])[0, 2:4]
    torch.testing.assert_close(cache.hidden[2:].float(), alone, rtol=1e-2, atol=1e-2)  # stored in bf16
    batched = build_cache(model, texts, num_heads=2, starts=[3, 0])  # padded into one forward: the same
    assert batched.targets.tolist() == cache.targets.tolist()
    torch.testing.assert_close(batched.hidden.float(), cache.hidden.float(), rtol=1e-2, atol=1e-2)
    assert to_draft_ids(torch.tensor([[8, -1], [3, 9]]), 16, torch.tensor([9, 8])).tolist() == [[1, -1], [-1, 0]]


def test_hidden_states_the_engine_keeps_are_a_forward_over_the_text(tiny_model_dir, model):
    """return_hidden_states: row j is the final hidden state that sampled output token j, the same a forward
    over prompt + output gives at the position before that token; train-medusa caches chat answers from them."""
    llm = LLM(tiny_model_dir)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True,
                                                            return_hidden_states=True))
    texts = [p + out.token_ids for p, out in zip(prompts, outputs)]
    with torch.inference_mode():
        for prompt, text, out in zip(prompts, texts, outputs):
            assert out.hidden_states.shape == (7, model.config.hidden_size)
            forward = model(torch.tensor([text]), torch.arange(len(text))[None])[0, len(prompt) - 1:-1]
            torch.testing.assert_close(out.hidden_states, forward, rtol=1e-4, atol=1e-4)
    starts = [len(p) for p in prompts]
    captured = captured_cache(texts, starts, [out.hidden_states for out in outputs], num_heads=2)
    computed = build_cache(model, texts, num_heads=2, starts=starts)
    order = [1, 0]  # build_cache puts the shorter text first
    by_text = [(cache.roots.split(6), cache.targets.split(6), cache.hidden.split(6)) for cache in (captured, computed)]
    for k, t in enumerate(order):  # each text: positions start - 1 .. len - 3, 6 of them
        assert by_text[0][0][t].tolist() == by_text[1][0][k].tolist()
        assert by_text[0][1][t].tolist() == by_text[1][1][k].tolist()
        torch.testing.assert_close(by_text[0][2][t].float(), by_text[1][2][k].float(), rtol=1e-2, atol=1e-2)
    assert llm.generate([[5, 6]], SamplingParams(max_tokens=2))[0].hidden_states is None  # only when asked


def test_training_stops_when_the_held_out_loss_stops_improving(model, windows):
    """Two texts learnt by heart: the held-out loss turns up, training stops PATIENCE measurements after its
    best, and the heads of that step come back."""
    train, held_out = build_cache(model, windows[0][:2], 2), build_cache(model, windows[1], 2)
    config = TrainConfig(num_heads=2, steps=3000, batch_size=16, lr=1e-2)
    heads, history = train_heads(model, train, config, progress=False, held_out=held_out)
    assert len(history) < config.steps and len(history) % EVAL_EVERY == 0
    last, _ = train_heads(model, train, TrainConfig(num_heads=2, steps=len(history), batch_size=16, lr=1e-2),
                          progress=False)  # the same steps, kept to the end
    weights, rows = head_weights(2), torch.arange(len(held_out))
    with torch.no_grad():
        kept = weighted_loss(heads, model, held_out, rows, held_out.targets, None, weights)
        assert kept < weighted_loss(last, model, held_out, rows, held_out.targets, None, weights)


def test_the_heads_learn_the_base_models_distribution_where_the_cache_holds_it(model, windows):
    """The loss is the KL divergence from the base model's softmax at the teacher row, and the cross-entropy of
    the token where there is none (the last rows of a text)."""
    cache = build_cache(model, windows[0][:2], 2)
    heads = MedusaHeads(MedusaConfig(2, 1, model.config.hidden_size, model.config.vocab_size, False, sequential=True))
    weights = torch.tensor([1.0, 0.0])  # head 0 alone
    with torch.no_grad():
        for row in (0, len(windows[0][0]) - 3):  # a row with a teacher; the last of its text, without one
            rows = torch.tensor([row])
            teacher = cache.teachers[row, 0].item()
            with matmuls_in_bf16():
                log_p = draft_logits(heads, model, cache.hidden[rows].float(), None, cache.head_inputs(rows))[0]
                base = model.lm_head(cache.hidden[[max(teacher, 0)]].float())
            log_p = log_p.float().log_softmax(-1)[0]
            log_base = base.float().log_softmax(-1)[0]
            expected = ((log_base.exp() * (log_base - log_p)).sum() if teacher >= 0
                        else -log_p[cache.targets[row, 0]])
            assert (teacher >= 0) == (row == 0)
            loss = weighted_loss(heads, model, cache, rows, cache.targets, None, weights)
            torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)


def test_the_matmuls_run_in_bf16_only_where_the_cpu_multiplies_bf16(monkeypatch):
    """torch's bf16 GEMM on a CPU without bf16 units (AVX2-only): a step of SmolLM2's heads over 8192 draft tokens
    took 14.6 s under bf16 autocast, 0.8 s in fp32. So does train-default's --bf16 default."""
    from engine.training import common
    from engine.training.default_model import parse_args

    for native in (False, True):
        monkeypatch.setattr(common, "bf16_gemm", lambda native=native: native)
        with matmuls_in_bf16():
            assert torch.is_autocast_enabled("cpu") == native
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16 or not native
    assert parse_args([]).bf16 == bf16_gemm() and parse_args(["--bf16"]).bf16


def test_training_fits_its_steps_to_a_deadline(model, windows):
    cache = build_cache(model, windows[0][:4], 2)
    config = TrainConfig(num_heads=2, steps=500, batch_size=16)
    _, history = train_heads(model, cache, config, progress=False, deadline=time.perf_counter())
    assert len(history) == 2 * PACE_STEPS  # the steps that measured the pace, then none left
    _, history = train_heads(model, cache, TrainConfig(num_heads=2, steps=30, batch_size=16), progress=False,
                             deadline=time.perf_counter() + 3600)
    assert len(history) == 30


def test_training_refits_its_steps_when_the_machine_slows_down(model, windows):
    """A shared machine's pace changes mid-run: a training whose steps slow down 50-fold after its first 40 still
    ends by its deadline (fitted once, at the first steps' pace, it ran the 1000 steps: ~50 s)."""
    cache = build_cache(model, windows[0][:4], 2)
    began = time.perf_counter()
    _, history = train_heads(model, cache, TrainConfig(num_heads=2, steps=1000, batch_size=16), progress=False,
                             deadline=began + 2.0, on_step=lambda step: time.sleep(0.05) if step > 40 else None)
    assert time.perf_counter() - began < 2.5 and 40 < len(history) < 1000


def test_training_on_the_cache_raises_acceptance(model, windows):
    train = windows[0]
    cache, seen = build_cache(model, train, 4), build_cache(model, train[:8], 4)
    vocab = draft_vocabulary(cache.targets[:, 0], 256, 0.9)
    heads, history = train_heads(model, cache, TrainConfig(steps=40, batch_size=384, lr=1e-2), vocab, progress=False)
    assert sum(history[-5:]) / 5 < 0.9 * sum(history[:5]) / 5
    assert heads.draft_vocab is vocab and not any(p.requires_grad for p in heads.parameters())
    fresh = MedusaHeads(heads.config)
    fresh.draft_vocab = vocab
    ranks = held_out_ranks(heads, model, seen)
    before, after = accuracy_of(held_out_ranks(fresh, model, seen)), accuracy_of(ranks)
    assert all(a["top1"] > b["top1"] and a["top5"] > b["top5"] for a, b in zip(after, before))
    assert ranks.shape == (int((seen.targets >= 0).all(1).sum()), 4) and ranks.max() <= MAX_RANK


def test_heads_train_over_a_quantized_lm_head(tiny_model_dir, windows):
    """A GGUF model's lm_head is in ggml blocks: the heads project through its dequantized draft rows."""
    quantized = load_model(tiny_model_dir, torch.float32, torch.device("cpu"), quantization="int8")
    cache = build_cache(quantized, windows[0][:8], 2)
    vocab = draft_vocabulary(cache.targets[:, 0], 256, 0.9)
    heads, history = train_heads(quantized, cache, TrainConfig(num_heads=2, steps=10, batch_size=128, lr=1e-2),
                                 vocab, progress=False)
    assert sum(history[-3:]) < sum(history[:3])
    assert held_out_ranks(heads, quantized, cache).shape[1] == 2


def test_draft_vocabulary_covers_the_training_text():
    tokens = torch.tensor([[5, 5, 5, 5, 3, 3, 1, 0]])
    assert draft_vocabulary(tokens, 8, 0.5).tolist() == [5]
    assert draft_vocabulary(tokens, 8, 0.75).tolist() == [5, 3]
    assert draft_vocabulary(tokens, 8, 1.0) is None


def test_best_trees_and_their_tokens_per_step():
    # head ranks of the right token at 4 held-out positions (MAX_RANK: not among the candidates)
    ranks = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0], [MAX_RANK, 0, 0]])
    counts = accepted_path_counts(ranks, MAX_RANK)
    assert counts == Counter({(0,): 2, (0, 0): 1, (0, 0, 1): 1, (0, 1): 1, (0, 1, 0): 1, (1,): 1, (1, 0): 1,
                              (1, 0, 0): 1})
    assert best_tree(counts, 1) == [[0]] and best_tree(counts, 3) == [[0], [1], [0, 0]]
    assert expected_tokens_per_step([[0]], counts, 4) == 1.5
    assert expected_tokens_per_step(best_tree(counts, 8), counts, 4) == 1 + 9 / 4  # every right path: all 9 tokens


def test_each_batch_size_gets_the_tree_fastest_there():
    def row(name, *speedups):  # timed at 1, 2, 4, 8 until one no longer paid
        timed = dict(zip((1, 2, 4, 8), speedups))
        return {"tree": name, "max_batch_size": max([0] + [b for b in timed if timed[b] >= PAYS]),
                **{f"speedup_bs{b}": x for b, x in timed.items()}}

    big, mid, chain = row("big", 1.8, 1.0), row("mid", 1.6, 1.5, 1.2, 1.0), row("chain", 1.4, 1.4, 1.3, 1.2)
    chosen = trees_by_batch_size([chain, mid, big])
    assert [(r["tree"], b) for r, b in chosen] == [("big", 1), ("mid", 2), ("chain", 8)]
    assert [(r["tree"], b) for r, b in trees_by_batch_size([chain, row("mid", 1.6, 1.5, 1.4, 1.0)])] == [
        ("mid", 4), ("chain", 8)]
    assert trees_by_batch_size([row("slow", 0.9)]) == []


def test_the_engine_takes_the_tree_stored_beside_the_heads(tiny_model_dir, model, windows, tmp_path):
    heads, _ = train_heads(model, build_cache(model, windows[0], 3), TrainConfig(num_heads=3, steps=2), progress=False)
    save_medusa_heads(heads, tmp_path)
    TreeChoice([BatchTree([[0], [1], [0, 0]])], "measured here", {}).save(tmp_path / TREE_FILE)
    llm = LLM(tiny_model_dir, medusa=str(tmp_path))
    assert llm.medusa.tree_for(1).tree.paths == [(0,), (1,), (0, 0)]
    assert LLM(tiny_model_dir, medusa=str(tmp_path), medusa_tree="chain2").medusa.tree_for(1).tree.name == "chain2"
    # the measured limit: speculation while at most max_batch_size sequences decode, plain decoding above it
    TreeChoice([BatchTree([[0], [1], [0, 0]], 1)], "measured here", {}).save(tmp_path / TREE_FILE)
    capped = LLM(tiny_model_dir, medusa=str(tmp_path))
    assert capped.medusa.max_batch_size == 1
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = capped.generate([[1, 2, 3]], greedy)[0]
    together = capped.generate([[1, 2, 3], [4, 5, 6]], greedy)
    assert len(alone.accepted_lengths) > 0 and all(not o.accepted_lengths for o in together)
    assert together[0].token_ids == alone.token_ids
    assert LLM(tiny_model_dir, medusa=str(tmp_path), medusa_max_batch_size=2).medusa.max_batch_size == 2
    assert all(o.accepted_lengths for o in LLM(tiny_model_dir, medusa=str(tmp_path), medusa_max_batch_size=2)
               .generate([[1, 2, 3], [4, 5, 6]], greedy))
    # a tree per batch size: the bigger one for a sequence decoding alone, the chain for two
    TreeChoice([BatchTree([[0], [1], [0, 0]], 1), BatchTree([[0]], 2)], "measured here", {}).save(tmp_path / TREE_FILE)
    per_batch = LLM(tiny_model_dir, medusa=str(tmp_path), medusa_ngram_tokens=0)
    assert [per_batch.medusa.tree_for(b).tree.size for b in (1, 2)] == [4, 2] and per_batch.medusa.max_batch_size == 2
    verified, verify = [], per_batch.medusa.verify

    def recording_verify(seqs, rows, *args):
        verified.append((args[-1], {s.draft_tree.tree.size for s in seqs}))
        return verify(seqs, rows, *args)

    per_batch.medusa.verify = recording_verify
    short, long = greedy, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = LLM(tiny_model_dir).generate([[1, 2, 3], [4, 5, 6]], [short, long])
    outs = per_batch.generate([[1, 2, 3], [4, 5, 6]], [short, long])
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert {(n, frozenset(sizes)) for n, sizes in verified} == {(2, frozenset({2})), (1, frozenset({4}))}
    assert per_batch.num_free_blocks == per_batch.block_manager.num_blocks
    (tmp_path / TREE_FILE).write_text(json.dumps({"trees": [{"tree": [[0]], "max_batch_size": 4},
                                                            {"tree": [[0]], "max_batch_size": 2}]}))
    with pytest.raises(ValueError, match="in order of max_batch_size"):
        LLM(tiny_model_dir, medusa=str(tmp_path))
    # a tree timed with another thread count than the engine's may not pay here: said at load
    other_threads = {"threads": torch.get_num_threads() + 1}
    TreeChoice([BatchTree([[0]], 1)], "measured here", other_threads).save(tmp_path / TREE_FILE)
    with pytest.warns(UserWarning, match=rf"timed with threads {torch.get_num_threads() + 1} \(this engine: "):
        LLM(tiny_model_dir, medusa=str(tmp_path))
    # ... and so may one timed with other weights (another file of the model, another dtype)
    TreeChoice([BatchTree([[0]], 1)], "measured here", {"weights": "other.gguf (float32)"}).save(tmp_path / TREE_FILE)
    with pytest.warns(UserWarning, match=r"timed with weights other.gguf \(float32\) \(this engine: "):
        LLM(tiny_model_dir, medusa=str(tmp_path))
    (tmp_path / TREE_FILE).write_text(json.dumps({"tree": [[0]], "max_batch_size": 0}))
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer"):
        LLM(tiny_model_dir, medusa=str(tmp_path))
    TreeChoice([], "no Medusa tree pays on this machine", {}).save(tmp_path / TREE_FILE)
    with pytest.warns(UserWarning, match="no Medusa tree pays on this machine; decoding plainly"):
        plain = LLM(tiny_model_dir, medusa=str(tmp_path))
    assert plain.medusa is None
    out = plain.generate([1, 2, 3], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and not out.accepted_lengths


def test_data_files_of_chats_are_learned_from_their_answers(chat_model_dir, tiny_model_dir, tmp_path):
    """--data as fine-tuning sets hold it: chats (messages, ShareGPT, prompt + completion) in the model's template,
    learned from the first answer on; documents cut into windows, EOS between them. A ShareGPT .json file was read
    as plain text (the heads learned JSON), and prompt + completion joined with no template."""
    tokenizer = LLM(chat_model_dir).tokenizer
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "more"},
                           {"role": "assistant", "content": "no"}]},  # its first answer only
             {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]},
             {"prompt": "hi", "completion": "hello there"},
             {"messages": [{"role": "user", "content": "no answer"}]},
             {"text": "def f(x):\n    return x\n" * 3}, "def g(y):\n    return y\n" * 3]
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(chats))
    texts, starts = medusa_training.read_training_data(data, tokenizer, 8, separator=0)
    written = [tokenizer.decode(t) for t in texts]
    assert written[0] == "system: Be brief.\nuser: hi\nassistant: hello there\n"[:len(written[0])]
    whole = medusa_training.read_training_data(data, tokenizer, 64, separator=0)[0][0]
    assert tokenizer.decode(whole) == "system: Be brief.\nuser: hi\nassistant: hello there\n"  # not the next turn
    assert tokenizer.decode(texts[0][:starts[0]]) == "system: Be brief.\nuser: hi\nassistant: "
    assert tokenizer.decode(texts[1][:starts[1]]) == tokenizer.decode(texts[2][:starts[2]]) == "user: hi\nassistant: "
    assert all(len(t) - s <= 8 for t, s in zip(texts[:3], starts[:3]))  # seq_len tokens of each answer
    windows = texts[3:]
    assert starts[3:] == [0] * len(windows) and all(len(w) == 8 for w in windows)
    docs = [tokenizer(c["text"] if isinstance(c, dict) else c)["input_ids"] for c in chats[4:]]
    assert sum(windows, []) == (docs[0] + [0] + docs[1])[:len(windows) * 8]
    lines = tmp_path / "chats.jsonl"
    lines.write_text("\n".join(json.dumps(c) for c in chats[:3]) + "\n")
    assert medusa_training.read_training_data(lines, tokenizer, 8, 0)[0] == texts[:3]
    short = tmp_path / "short.jsonl"  # a document shorter than a window beside a chat: the chat is still learned
    short.write_text(json.dumps(chats[2]) + "\n" + json.dumps({"text": "x = 1"}) + "\n")
    assert medusa_training.read_training_data(short, tokenizer, 8, 0)[0] == texts[2:3]
    short.write_text(json.dumps({"text": "x = 1"}) + "\n")
    with pytest.raises(ValueError, match="no chat with an answer, and documents of .* fewer than one window"):
        medusa_training.read_training_data(short, tokenizer, 8, 0)
    plain = LLM(tiny_model_dir).tokenizer  # no chat template: a chat cannot be written
    with pytest.raises(ValueError, match="record 1 is a chat, and the model has no chat template"):
        medusa_training.read_training_data(lines, plain, 8, 0)
    with pytest.raises(SystemExit, match="no such file"):
        train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "h"), "--data", str(tmp_path / "none")])
    with pytest.raises(SystemExit):
        train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "h"), "--data", str(data), "--steps", "0"])


def test_train_medusa_command(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(medusa_training, "LR_WIDTH", 32)  # as if the 64-wide model were wider than the default's
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": "def f(x):\n    return x + 1\n" * 4}) for _ in range(8)))
    train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "heads"), "--data", str(data),
                "--heads", "2", "--steps", "3", "--seq-len", "32", "--timing-tokens", "6", "--timing-repeats", "1"])
    heads = load_medusa_heads(tmp_path / "heads", 64, 256)
    assert heads.config.num_heads == 2 and not heads.config.own_lm_head and heads.kind == "hydra"  # the default
    assert next(iter(load_file(tmp_path / "heads" / WEIGHTS_FILE).values())).dtype == torch.bfloat16  # as they draft
    report = json.loads((tmp_path / "heads" / "training.json").read_text())
    first_loss = report["loss_first"]
    assert report["config"]["lr"] == pytest.approx(TrainConfig.lr / 2)  # the default, scaled to the width
    assert len(report["held_out_accuracy"]) == 2 and report["tree"]
    assert heads.draft_vocab is not None and report["draft_vocab_size"] == len(heads.draft_vocab) < 256
    choice = json.loads((tmp_path / "heads" / TREE_FILE).read_text())
    assert choice["summary"] == report["tree"] and len(choice["measurements"]["candidates"]) >= 1
    for row in choice["measurements"]["candidates"]:  # timed up to the largest batch where the tree paid
        timed = [b for b in (1, 2, 4, 8) if f"speedup_bs{b}" in row]
        assert timed and timed == [1, 2, 4, 8][:len(timed)]
        assert row["max_batch_size"] == max([0] + [b for b in timed if row[f"speedup_bs{b}"] >= PAYS])
    for entry in choice["trees"]:  # each the candidate fastest at the batch sizes it serves, where it paid
        row = next(r for r in choice["measurements"]["candidates"] if r["tree"] == entry["tree"])
        assert 1 <= entry["max_batch_size"] <= row["max_batch_size"]
    printed = capsys.readouterr().out
    assert "head 1 (token +3)" in printed and report["tree"] in printed
    # continuing from those heads (e.g. ones trained jointly with the model) keeps their shape; into a folder of
    # heads, --no-tree leaves no tree timed for the heads it replaces
    shutil.copytree(tmp_path / "heads", tmp_path / "more")
    train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "more"), "--data", str(data), "--no-tree",
                "--init-heads", str(tmp_path / "heads"), "--steps", "1", "--seq-len", "32", "--lr", "0.001"])
    assert not (tmp_path / "more" / TREE_FILE).exists()
    assert load_medusa_heads(tmp_path / "more", 64, 256).config.num_heads == 2
    report = json.loads((tmp_path / "more" / "training.json").read_text())
    assert report["init_heads"] == str(tmp_path / "heads") and report["config"]["lr"] == 0.001
    assert report["loss_first"] < first_loss  # the same seed, so the same first batch
    # --retime: the same candidates timed again on this machine, kept for it, and preferred by the engine here
    capsys.readouterr()
    train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "heads"), "--retime", "--timing-tokens", "6",
                "--timing-repeats", "1"])
    weights = LLM(tiny_model_dir).config.weights
    assert weights == f"{tiny_model_dir.name} (float32)"
    machine = machine_tree_file(tmp_path / "heads", weights)
    assert machine.is_file() and machine.is_relative_to(os.environ["GORGON_CACHE_DIR"])
    assert str(machine) in capsys.readouterr().out
    retimed = json.loads(machine.read_text())["measurements"]
    assert retimed["weights"] == weights
    assert retimed["held_out_positions"] == choice["measurements"]["held_out_positions"]
    assert ([(r["tree"], r["tokens_per_step"]) for r in retimed["candidates"]]
            == [(r["tree"], r["tokens_per_step"]) for r in choice["measurements"]["candidates"]])
    TreeChoice([BatchTree([[1]], 1)], "timed on this machine", {}).save(machine)
    assert TreeChoice.load(tmp_path / "heads", weights).summary == "timed on this machine"
    assert LLM(tiny_model_dir, medusa=str(tmp_path / "heads")).medusa.tree_for(1).tree.paths == [(1,)]
    # that timing is for those heads: their tree.json beside other heads (these trained on) takes none of it
    shutil.copytree(tmp_path / "heads", tmp_path / "copy")
    assert TreeChoice.load(tmp_path / "copy", weights).summary == "timed on this machine"  # the same files
    shutil.copy(tmp_path / "more" / WEIGHTS_FILE, tmp_path / "copy" / WEIGHTS_FILE)
    assert TreeChoice.load(tmp_path / "copy", weights).summary == choice["summary"]
    # that timing is for those weights: the same heads on the model in bf16 take the tree stored beside them
    in_bf16 = EngineConfig(model=str(tiny_model_dir), dtype="bfloat16").weights
    assert in_bf16 == f"{tiny_model_dir.name} (bfloat16)"
    assert TreeChoice.load(tmp_path / "heads", in_bf16).summary == choice["summary"]
    # heads trained again (another tree.json beside them): that machine's old timing no longer applies
    (tmp_path / "heads" / TREE_FILE).write_text(json.dumps({"tree": [[0]], "max_batch_size": 1}))
    assert TreeChoice.load(tmp_path / "heads", weights).trees == [BatchTree([[0]], 1)]  # as files held one tree
    with pytest.raises(SystemExit, match="holds no measured trees"):
        train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "more"), "--retime"])
    (tmp_path / "more" / TREE_FILE).write_text(json.dumps({"tree": "x"}))
    with pytest.raises(SystemExit, match="must hold a JSON list of rank paths"):
        train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "more"), "--retime"])


def test_chat_self_distillation(chat_model_dir, tmp_path):
    prompts = chat_prompts(5, seed=0)
    assert len(prompts) == 5 and all(m[0]["role"] == "user" and m[0]["content"] for m in prompts)
    texts = tmp_path / "texts.json"
    train_main(["--model", str(chat_model_dir), "--out", str(tmp_path / "heads"), "--samples", "10", "--heads", "2",
                "--steps", "2", "--seq-len", "16", "--no-tree", "--texts", str(texts)])
    report = json.loads((tmp_path / "heads" / "training.json").read_text())
    source = re.match(r"self-distillation \(answers to (\d+) chat prompts the model wrote itself and (\d+) built "
                      r"from the standard library's docstrings", report["data"])
    written, built = map(int, source.groups())
    assert written <= 5 and written + built == 10  # --self-prompts 0.5 by default
    saved = json.loads(texts.read_text())
    tokenizer = LLM(chat_model_dir).tokenizer
    for text, start in zip(saved["texts"], saved["starts"]):
        assert tokenizer.decode(text[:start]).endswith("\nassistant: ") and 0 < len(text) - start <= 16
    assert report["train_positions"] <= sum(len(t) - s + 1 for t, s in zip(saved["texts"], saved["starts"]))
    # a second run reads the text instead of generating it
    train_main(["--model", str(chat_model_dir), "--out", str(tmp_path / "again"), "--samples", "10", "--heads", "2",
                "--steps", "2", "--seq-len", "16", "--no-tree", "--texts", str(texts)])
    assert json.loads((tmp_path / "again" / "training.json").read_text())["data"] == report["data"]
    # but not text written with other settings (another --seq-len, --data, or another model's token ids)
    with pytest.raises(SystemExit, match=r"other settings .*: seq_len 16 \(now 32\)\. Remove it"):
        train_main(["--model", str(chat_model_dir), "--out", str(tmp_path / "again"), "--samples", "10",
                    "--seq-len", "32", "--no-tree", "--texts", str(texts)])


def test_the_minutes_budget_bounds_writing_and_tree_timing(chat_model_dir, tmp_path, monkeypatch, capsys):
    """The model stops writing texts once the next chunk would end past 60% of --minutes, and trees stop being
    timed where the next would end past the whole (the first is always timed; the rest are kept for --retime);
    with the default budget, all texts are written."""
    monkeypatch.setattr(medusa_training, "WRITE_CHUNK", 4)
    # three candidates, whatever the few texts' ranks give
    monkeypatch.setattr(medusa_training, "candidate_trees",
                        lambda ranks: [([[0]], 1.5), ([[0], [0, 0]], 1.7), ([[0], [1], [0, 0]], 1.8)])
    common = ["--model", str(chat_model_dir), "--samples", "12", "--heads", "2", "--steps", "2", "--seq-len", "16",
              "--timing-tokens", "4", "--timing-repeats", "1"]
    train_main([*common, "--out", str(tmp_path / "short"), "--minutes", "0.0001"])
    report = json.loads((tmp_path / "short" / "training.json").read_text())
    assert report["train_texts"] + report["held_out_texts"] == 4 and report["budget_minutes"] == 0.0001
    assert "the model wrote 4 of 12 texts" in capsys.readouterr().out
    measured = json.loads((tmp_path / "short" / TREE_FILE).read_text())["measurements"]
    assert len(measured["candidates"]) == 1
    assert [(r["tree"], r["tokens_per_step"]) for r in measured["untimed_for_the_budget"]] == [
        ([[0], [0, 0]], 1.7), ([[0], [1], [0, 0]], 1.8)]
    # --retime has no budget: it times the candidates the budget left untimed too
    train_main(["--model", str(chat_model_dir), "--out", str(tmp_path / "short"), "--retime", "--timing-tokens", "4",
                "--timing-repeats", "1"])
    retimed = json.loads(machine_tree_file(tmp_path / "short", LLM(chat_model_dir).config.weights).read_text())
    assert [r["tree_size"] for r in retimed["measurements"]["candidates"]] == [2, 3, 4]
    assert retimed["measurements"]["untimed_for_the_budget"] == []
    stored = json.loads((tmp_path / "short" / TREE_FILE).read_text())  # as heads timed before: the number alone
    stored["measurements"]["untimed_for_the_budget"] = 2
    (tmp_path / "short" / TREE_FILE).write_text(json.dumps(stored))
    train_main(["--model", str(chat_model_dir), "--out", str(tmp_path / "short"), "--retime", "--timing-tokens", "4",
                "--timing-repeats", "1"])
    retimed = json.loads(machine_tree_file(tmp_path / "short", LLM(chat_model_dir).config.weights).read_text())
    assert [r["tree_size"] for r in retimed["measurements"]["candidates"]] == [2]
    stored["measurements"]["untimed_for_the_budget"] = [3]  # a hand-edited file: an error, not a traceback
    (tmp_path / "short" / TREE_FILE).write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="gorgon train-medusa: error"):
        train_main(["--model", str(chat_model_dir), "--out", str(tmp_path / "short"), "--retime"])
    train_main([*common, "--out", str(tmp_path / "whole"), "--no-tree"])
    report = json.loads((tmp_path / "whole" / "training.json").read_text())
    assert report["train_texts"] + report["held_out_texts"] == 12


def test_writing_stops_once_the_training_left_could_not_take_the_text_three_times(chat_model_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    """After each chunk the heads' training is timed (with the draft vocabulary of all the texts so far); the model
    stops writing once the steps left before 80% of --minutes hold fewer positions than 3 passes over its text."""
    monkeypatch.setattr(medusa_training, "WRITE_CHUNK", 4)
    timed = []
    real_pace = medusa_training.training_pace

    def pace(model, cache, draft_vocab, args):
        timed.append(real_pace(model, cache, draft_vocab, args))
        return timed[-1] * slowdown

    monkeypatch.setattr(medusa_training, "training_pace", pace)
    common = ["--model", str(chat_model_dir), "--samples", "12", "--heads", "2", "--steps", "2", "--seq-len", "16",
              "--minutes", "30", "--no-tree"]
    slowdown = 1
    train_main([*common, "--out", str(tmp_path / "all")])  # a tiny model trains in milliseconds a step
    report = json.loads((tmp_path / "all" / "training.json").read_text())
    assert report["train_texts"] + report["held_out_texts"] == 12
    assert len(timed) == 3 and all(0 < seconds < 60 for seconds in timed)
    slowdown = 1e9  # a step as slow as the whole budget: one chunk is all the training could take
    train_main([*common, "--out", str(tmp_path / "few")])
    report = json.loads((tmp_path / "few" / "training.json").read_text())
    assert report["train_texts"] + report["held_out_texts"] == 4
    assert re.search(r"the model wrote 4 of 12 texts: the training the --minutes budget leaves "
                     r"\(about 0 steps of 256\) takes each of their \d+ positions at most 3 times",
                     capsys.readouterr().out)


def test_the_default_learning_rate_shrinks_with_the_hidden_states_width():
    """Adam moves each output of a layer by about lr times its fan-in: at 3e-3, heads over a 1536-wide model
    diverged."""
    assert default_lr(64) == default_lr(LR_WIDTH) == TrainConfig.lr
    assert default_lr(2 * LR_WIDTH) == pytest.approx(TrainConfig.lr / 2)
    assert default_lr(1536) == pytest.approx(1.125e-3)


def test_the_writer_dequantizes_a_gguf_file_whose_weights_fit(tmp_path, monkeypatch):
    hf = save_tiny_model(tmp_path / "hf")
    file = write_gguf(hf_model(hf), tmp_path / "q.gguf", qtype_of=lambda name, w: QType.Q8_0)
    assert writer_dequantizes(file, "bfloat16")
    assert not writer_dequantizes(hf, "bfloat16")  # an HF folder: nothing to dequantize
    monkeypatch.setattr(medusa_training.os, "sysconf", lambda name: 64)  # 4 KiB of memory
    assert not writer_dequantizes(file, "bfloat16")


def test_the_writer_uses_packed_kernels_where_the_cpu_has_no_amx_tiles(tmp_path, monkeypatch):
    """Their integer dot products wrote SmolLM2 Q4_1's text 2.3x-3x faster than fp32 GEMM over it dequantized (AVX2),
    and 1.2x-1.5x faster than bf16 GEMM (AVX512-BF16, Zen 4)."""
    ops = compiled()
    if ops is None or ops.isa() == "scalar":
        pytest.skip("no packed decode kernels on this machine")
    hf = save_tiny_model(tmp_path / "hf")
    packed = write_gguf(hf_model(hf), tmp_path / "q.gguf",
                        qtype_of=lambda name, w: QType.Q4_1 if name.startswith("blk") else QType.Q8_0)
    one_float = write_gguf(hf_model(hf), tmp_path / "f.gguf",
                           qtype_of=lambda name, w: None if "ffn_down" in name else QType.Q8_0)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert medusa_training.writer_packed(packed, "float32")
    assert not medusa_training.writer_packed(one_float, "float32")  # a float matrix: no packed kernels for it
    assert not medusa_training.writer_packed(hf, "float32")
    assert not medusa_training.writer_packed(packed, "bfloat16")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # bf16 GEMM on tiles, dequantized
    assert not medusa_training.writer_packed(packed, "float32")


def test_the_writer_runs_in_bf16_where_the_cpu_multiplies_bf16(tmp_path, monkeypatch):
    """Unless the file's packed kernels write it (in fp32); elsewhere in the dtype gorgon serves the model in: bf16 made
    SmolLM2 Q4_1 write 1.2x slower on AVX2."""
    hf = save_tiny_model(tmp_path / "hf")
    file = write_gguf(hf_model(hf), tmp_path / "q.gguf", qtype_of=lambda name, w: QType.Q8_0)
    stored_bf16 = tmp_path / "bf16"
    stored_bf16.mkdir()
    (stored_bf16 / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()),
                                                         "dtype": "bfloat16"}))
    monkeypatch.setattr(medusa_training, "writer_packed", lambda path, dtype: False)
    monkeypatch.setattr(medusa_training, "bf16_gemm", lambda: True)
    assert {medusa_training.writer_dtype(path) for path in (hf, file, stored_bf16)} == {"bfloat16"}
    monkeypatch.setattr(medusa_training, "bf16_gemm", lambda: False)
    assert [medusa_training.writer_dtype(path) for path in (hf, file, stored_bf16)] == ["float32", "float32",
                                                                                        "bfloat16"]
    monkeypatch.setattr(medusa_training, "writer_packed", lambda path, dtype: path == file and dtype == "float32")
    monkeypatch.setattr(medusa_training, "bf16_gemm", lambda: True)
    assert [medusa_training.writer_dtype(path) for path in (hf, file, stored_bf16)] == ["bfloat16", "float32",
                                                                                        "bfloat16"]


def test_the_last_chunk_of_texts_holds_what_fits_the_budget():
    # one batch first, to learn the pace: a first chunk of WRITE_CHUNK (256) ran past any budget on a large model
    assert chunk_size(0, 2048, 0.0, 900.0, 32) == 32
    assert chunk_size(0, 20, 0.0, 900.0, 32) == 20
    assert chunk_size(32, 2048, 10.0, 900.0, 32) == 256  # WRITE_CHUNK
    assert chunk_size(256, 2048, 594.0, 306.0, 32) == 131  # 2.32 s a text: 131 fit in 306 s
    assert chunk_size(256, 2048, 594.0, 60.0, 32) == 0  # 25 texts: not a full batch
    assert chunk_size(2040, 2048, 10.0, 1.0, 32) == 8  # the last 8, though fewer than a batch


def test_self_written_prompts_continue_the_template_up_to_the_user_text(chat_model_dir):
    """Magpie-style prompts: the model samples from its template's user header; only whole turns (ended by the
    model, not by max_tokens), non-blank and new, are kept, and at most three rounds are asked for."""
    llm = LLM(chat_model_dir)
    script = iter([("stop", " a question\n"), ("length", "cut off"), ("stop", "  "), ("stop", "a question"),
                   ("stop", "another")] + [("length", "x")] * 100)
    asked = []

    def generate(prompts, params, use_tqdm=False):
        asked.append((prompts, params))
        return [SimpleNamespace(finish_reason=reason, text=text) for _, (reason, text) in zip(prompts, script)]

    llm.generate = generate
    prompts = self_written_prompts(llm, 3, seed=0)
    assert prompts == [[{"role": "user", "content": "a question"}], [{"role": "user", "content": "another"}]]
    assert len(asked) == 3  # the third prompt never came: three rounds, then what there is
    assert all(llm.tokenizer.decode(ids) == "user: " for ids in asked[0][0])
    assert all(p.temperature == 1.0 and p.max_tokens == 64 for p in asked[0][1])
    assert len({p.seed for _, params in asked for p in params}) == sum(len(params) for _, params in asked)


def test_bad_texts_files_and_hidden_user_text_are_clear_errors(chat_model_dir, tmp_path):
    for name, content in (("binary.json", b"\x80\x81"), ("partial.json", b'{"texts": []}')):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SystemExit, match="is not a --texts file that train-medusa wrote"):
            train_main(["--model", str(chat_model_dir), "--out", str(tmp_path / "heads"), "--texts",
                        str(tmp_path / name), "--no-tree"])
    config = chat_model_dir / "tokenizer_config.json"  # a template that never shows what the user wrote
    config.write_text(json.dumps(json.loads(config.read_text()) | {"chat_template": "user: hi\nassistant: "}))
    with pytest.raises(SystemExit, match="cannot write its own prompts: pass --prompts"):
        train_main(["--model", str(chat_model_dir), "--out", str(tmp_path / "heads"), "--samples", "4", "--no-tree"])


def test_self_distillation_from_a_prompts_file(tiny_model_dir, tmp_path):
    code = tmp_path / "code.py"
    code.write_text('def f(x):\n    return x + 1\n\n\nclass A:\n    """A class."""\n    pass\n' * 20)
    prompts = prompts_from(code, 6, seed=0)
    assert len(prompts) == 6 and len(set(prompts)) > 1
    assert all(p.strip() and p in code.read_text() and p.endswith("\n") for p in prompts)  # whole lines
    records = tmp_path / "prompts.jsonl"
    records.write_text(json.dumps({"prompt": "x = "}) + "\n\n" + json.dumps({"text": "def g():"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert prompts_from(records, 5, seed=0) == ["x = ", "def g():", [{"role": "user", "content": "hi"}]]
    sharegpt = tmp_path / "sharegpt.json"  # .json and ShareGPT records as engine.prompt_files reads them
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}, "y = "]))
    assert prompts_from(sharegpt, 5, seed=0) == [[{"role": "user", "content": "hi"}], "y = "]
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n")
    with pytest.raises(ValueError, match="non-empty prompts"):
        prompts_from(blank, 5, seed=0)

    windows = self_distill(tiny_model_dir, 0, 32, 4, 0.0, 0, prompts)
    assert windows.shape == (6, 32)
    train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "heads"), "--prompts", str(code),
                "--samples", "12", "--heads", "2", "--steps", "1", "--seq-len", "32", "--no-tree"])
    report = json.loads((tmp_path / "heads" / "training.json").read_text())
    assert report["data"] == f"self-distillation (12 from prompts in {code}; continuation temperature 0.0)"
    assert report["train_texts"] + report["held_out_texts"] == 12
    train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "mixed"), "--prompts", str(code), "--no-tree",
                "--prompt-share", "0.25", "--samples", "12", "--heads", "2", "--steps", "1", "--seq-len", "32"])
    report = json.loads((tmp_path / "mixed" / "training.json").read_text())
    assert report["data"].startswith(f"self-distillation (9 from 8-token sampled prefixes, 3 from prompts in {code};")
    with pytest.raises(SystemExit, match="--prompts are for self-distillation"):
        train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--prompts", str(code),
                    "--data", str(code)])


def test_train_medusa_refuses_bad_arguments_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="not a Medusa heads folder"):
        train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "heads"), "--init-heads", str(tmp_path)])
    assert not (tmp_path / "heads").exists()
    with pytest.raises(SystemExit, match="--draft-coverage"):
        train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "heads"), "--draft-coverage", "0"])
    with pytest.raises(SystemExit, match="--prompt-share"):
        train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "heads"), "--prompt-share", "2"])
    with pytest.raises(SystemExit, match="Is a directory"):
        train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "heads"), "--prompts", str(tmp_path)])
    (tmp_path / "lists.jsonl").write_text("[1, 2]\n")
    with pytest.raises(SystemExit, match="record 1 holds no prompt"):
        train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "heads"), "--prompts",
                    str(tmp_path / "lists.jsonl")])
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SystemExit, match="chat messages, but the model has no chat template"):
        train_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "heads"), "--prompts",
                    str(tmp_path / "chats.jsonl")])


def test_a_chat_model_answers_prompt_and_chat_records(chat_model_dir, tmp_path):
    records = tmp_path / "prompts.jsonl"  # a bare prompt becomes a user's message; one beyond the context is left out
    records.write_text(json.dumps({"prompt": "What is a list?"}) + "\n" + json.dumps({"prompt": "x" * 4000}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "What is a dict?"}]}) + "\n")
    train_main(["--model", str(chat_model_dir), "--out", str(tmp_path / "heads"), "--prompts", str(records),
                "--samples", "3", "--heads", "2", "--steps", "1", "--seq-len", "32", "--no-tree"])
    report = json.loads((tmp_path / "heads" / "training.json").read_text())
    assert report["data"].startswith(f"self-distillation (answers to 2 prompts in {records}")


def test_bench_prompt_files(chat_model_dir, tiny_model_dir, tmp_path):
    chat, plain = LLM(chat_model_dir).tokenizer, LLM(tiny_model_dir).tokenizer
    lines = tmp_path / "prompts.txt"
    lines.write_text("What is a list?\n\nWhat is a dict?\n")
    def texts(path, tokenizer, max_len=None):
        return [tokenizer.decode(ids) for ids in load_prompts(str(path), tokenizer, max_len=max_len)]

    assert texts(lines, plain) == ["What is a list?", "What is a dict?"]
    assert [len(p) for p in load_prompts(str(lines), plain, limit=1)] == [15]  # the byte tokenizer: a token a byte
    short_and_long = tmp_path / "mixed.txt"
    short_and_long.write_text("What is a dict?\nHi\n")
    assert texts(short_and_long, plain, max_len=10) == ["Hi"]  # the longer one left out
    with pytest.raises(ValueError, match="holds no prompts of at most 1 tokens"):
        texts(short_and_long, plain, max_len=1)
    assert texts(lines, chat) == ["user: What is a list?\nassistant: ", "user: What is a dict?\nassistant: "]
    records = tmp_path / "prompts.jsonl"
    records.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}) + "\n")
    assert texts(records, chat) == ["user: Hi\nassistant: ", "system: Be brief.\nuser: Hi\nassistant: "]
    with pytest.raises(ValueError, match="chat messages need a chat template"):
        load_prompts(str(records), plain)
    records.write_text(json.dumps({"completion": "Hi"}) + "\n")
    with pytest.raises(ValueError, match="record 1 holds no prompt"):
        load_prompts(str(records), chat)
