"""LoRA and prefix-tuning adapters against peft (the oracle): logits, mixed batches, prefix caching,
hot swap, unloading, capacity, and bad adapter folders."""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.adapters.manager import AdapterError

from conftest import hf_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name -> peft config; block_size 4 in the engines below, so prefix5 ends in a partial block
    "all": LoraConfig(r=4, lora_alpha=8, target_modules=ALL),
    "all_v2": LoraConfig(r=4, lora_alpha=8, target_modules=ALL),
    "rs_qv": LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "mlp": LoraConfig(r=2, lora_alpha=2, target_modules=["gate_proj", "down_proj"]),
    "all_linear": LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"),  # (saved as full module paths)
    "patterns": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                           rank_pattern={"q_proj": 6, "layers.1.mlp.down_proj": 3}, alpha_pattern={"v_proj": 9}),
    "prefix5": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "prefix8": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
}
PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 40], [1, 20, 21], list(range(3, 30)), [1, 99] * 6, [7], [1, 2, 3, 4, 5]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def build_peft(model_dir: Path, config, folder: Path, seed: int) -> torch.nn.Module:
    """A PEFT adapter with random non-zero weights (PEFT's init makes LoRA a no-op), saved to `folder`."""
    model = get_peft_model(hf_model(model_dir), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
            elif "prompt_encoder" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    peft_models = {name: build_peft(tiny_model_dir, config, root / name, seed)
                   for seed, (name, config) in enumerate(ADAPTERS.items())}
    with torch.no_grad():
        reference = {name: [m(input_ids=torch.tensor([p])).logits[0] for p in PROMPTS]
                     for name, m in peft_models.items()}
        base = hf_model(tiny_model_dir)
        reference[None] = [base(input_ids=torch.tensor([p])).logits[0] for p in PROMPTS]
    return tiny_model_dir, root, reference


def make_llm(setup, load=tuple(ADAPTERS), **kwargs) -> LLM:
    model_dir, root, _ = setup
    llm = LLM(model_dir, num_kv_blocks=kwargs.pop("num_kv_blocks", 256), block_size=4, adapter_root=str(root), **kwargs)
    for name in load:
        llm.load_adapter(name, name)
    return llm


def one_step_logits(llm: LLM, prompts: list[list[int]], adapters: list[str | None]) -> list[torch.Tensor]:
    """Prefill all prompts in one forward and return every row's logits, per request."""
    ids = [llm.add_request(p, SamplingParams(max_tokens=1), adapter=a) for p, a in zip(prompts, adapters)]
    batch = llm.scheduler.schedule()
    assert [s.request_id for s in batch.seqs] == ids and batch.num_new_tokens == [len(p) for p in prompts]
    inputs = llm.runner.prepare(batch)
    logits = llm.runner.logits(llm.runner.forward(inputs), torch.arange(sum(map(len, prompts))))
    for request_id in ids:
        llm.abort(request_id)
    return list(logits.split([len(p) for p in prompts]))


@pytest.fixture(scope="module")
def llm(setup):
    return make_llm(setup, enable_prefix_caching=False)


@pytest.mark.parametrize("adapter", list(ADAPTERS) + [None])
def test_logits_match_peft(setup, llm, adapter):
    reference = setup[2][adapter]
    for prompt, ref in zip(PROMPTS[:3], reference):
        [ours] = one_step_logits(llm, [prompt], [adapter])
        assert (ours - ref).abs().max().item() <= 1e-4


def test_mixed_batch_logits_match_peft(setup, llm):
    adapters = ["all", None, "prefix5", "rs_qv", "prefix8", "mlp"]
    free = llm.num_free_blocks
    outs = one_step_logits(llm, PROMPTS, adapters)
    for i, (ours, adapter) in enumerate(zip(outs, adapters)):
        assert (ours - setup[2][adapter][i]).abs().max().item() <= 1e-4, adapter
    assert llm.num_free_blocks == free


@pytest.mark.parametrize("engine_kwargs", [dict(), dict(max_num_batched_tokens=8)])
def test_mixed_batch_equals_each_request_alone(setup, engine_kwargs):
    adapters = ["all", None, "prefix5", "rs_qv", "prefix8", "mlp"]
    llm = make_llm(setup, **engine_kwargs)
    free = llm.num_free_blocks
    alone = [llm.generate(p, GREEDY, adapter=a)[0].token_ids for p, a in zip(PROMPTS, adapters)]
    mixed = llm.generate(PROMPTS, GREEDY, adapter=adapters)
    assert [o.token_ids for o in mixed] == alone
    assert len({tuple(t) for t in alone}) == len(alone)
    assert llm.num_free_blocks == free


def test_preemption_recomputes_adapter_requests_exactly(setup):
    llm = make_llm(setup, load=["prefix5", "all"], num_kv_blocks=32)  # 128 cache slots for six requests
    adapters = ["prefix5", "all", None, "prefix5", "all", "prefix5"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, params, adapter=a)[0].token_ids for p, a in zip(PROMPTS, adapters)]
    assert [o.token_ids for o in llm.generate(PROMPTS, params, adapter=adapters)] == alone
    assert llm.scheduler.num_preemptions > 0


def test_prefix_adapter_shares_pinned_blocks_and_prefix_cache(setup):
    llm = make_llm(setup, load=["prefix5"])
    prompt = list(range(10, 40))
    first = llm.generate(prompt, GREEDY, adapter="prefix5")[0]
    second = llm.generate(prompt, GREEDY, adapter="prefix5")[0]
    assert second.token_ids == first.token_ids
    assert second.num_cached_tokens == 27  # cache indices 0..31 hold 5 virtual + 27 real tokens
    base = llm.generate(prompt, GREEDY)[0]
    assert base.num_cached_tokens == 0 and base.token_ids != first.token_ids
    llm.load_adapter("prefix5", "prefix5")  # a new version: its K/V must not match the old one's cache entries
    third = llm.generate(prompt, GREEDY, adapter="prefix5")[0]
    assert third.num_cached_tokens == 0 and third.token_ids == first.token_ids


def test_hot_swap_between_steps(setup):
    llm = make_llm(setup, load=[])
    llm.load_adapter("x", "all")
    expected_v1 = llm.generate(PROMPTS[0], GREEDY, adapter="x")[0].token_ids
    running = llm.add_request(PROMPTS[0], GREEDY, adapter="x")
    finished = {}
    for _ in range(3):
        llm.step()
    assert llm.load_adapter("x", "all_v2").version == 2
    new = llm.add_request(PROMPTS[0], GREEDY, adapter="x")
    while llm.has_unfinished():
        finished.update({o.request_id: o.token_ids for o in llm.step() if o.finished})
    assert finished[running] == expected_v1
    fresh = make_llm(setup, load=["all_v2"])
    assert finished[new] == fresh.generate(PROMPTS[0], GREEDY, adapter="all_v2")[0].token_ids != expected_v1
    assert llm.adapters.retired == [] and len(llm.adapters._free_slots) == llm.config.max_adapters - 1


def test_load_from_another_thread_while_stepping(setup):
    llm = make_llm(setup, load=["prefix5"])
    expected = llm.generate(PROMPTS[:2], GREEDY, adapter="prefix5")
    ids = [llm.add_request(p, GREEDY, adapter="prefix5") for p in PROMPTS[:2]]
    finished, stop = {}, threading.Event()

    def loop() -> None:
        while not stop.is_set():
            finished.update({o.request_id: o.token_ids for o in llm.step() if o.finished})

    stepper = threading.Thread(target=loop)
    stepper.start()
    try:
        llm.load_adapter("prefix5", "prefix8")
        late = llm.add_request(PROMPTS[0], GREEDY, adapter="prefix5")
        while len(finished) < 3:
            stop.wait(0.01)
    finally:
        stop.set()
        stepper.join()
    assert [finished[i] for i in ids] == [o.token_ids for o in expected]
    assert finished[late] == make_llm(setup, load=["prefix8"]).generate(
        PROMPTS[0], GREEDY, adapter="prefix8")[0].token_ids


@pytest.mark.parametrize("name", ["prefix5", "all"])
def test_unload_in_use_lets_its_requests_finish_then_frees_everything(setup, name):
    """As a reload does: the requests in flight finish on the adapter, with its tokens; new ones cannot name it;
    its slot and pinned blocks come back once they are done (an unload used to be refused while any request ran)."""
    llm = make_llm(setup, load=[])
    free = llm.num_free_blocks
    llm.load_adapter(name, name)
    want = llm.generate(PROMPTS[0], GREEDY, adapter=name)[0].token_ids
    request_id = llm.add_request(PROMPTS[0], GREEDY, adapter=name)
    llm.step()
    llm.unload_adapter(name)
    assert llm.list_adapters() == []
    with pytest.raises(AdapterError, match="unknown adapter"):
        llm.add_request(PROMPTS[0], GREEDY, adapter=name)
    finished = {}
    while llm.has_unfinished():
        finished.update({o.request_id: o.token_ids for o in llm.step() if o.finished})
    assert finished[request_id] == want
    llm.step()  # (between steps, the unloaded version is freed)
    assert llm.num_free_blocks == free and len(llm.adapters._free_slots) == llm.config.max_adapters


def test_a_load_that_fails_while_writing_its_weights_leaves_nothing_behind(setup):
    """(The first LoRA's buffers out of memory, say): its slot comes back, and later loads find every slot."""
    llm = make_llm(setup, load=[], max_adapters=2)
    llm.load_adapter("a", "all")
    write = llm.adapters._write_slot

    def out_of_memory(*args):
        raise MemoryError("injected")

    llm.adapters._write_slot = out_of_memory
    with pytest.raises(MemoryError):
        llm.load_adapter("b", "mlp")
    llm.adapters._write_slot = write
    assert [a["name"] for a in llm.list_adapters()] == ["a"] and len(llm.adapters._free_slots) == 1
    llm.load_adapter("b", "mlp")
    llm.load_adapter("c", "rs_qv")  # (full: the least recently used idle one makes room, no slot lost)
    assert sorted(a["name"] for a in llm.list_adapters()) == ["b", "c"]


def test_capacity_evicts_least_recently_used_idle_adapter(setup):
    llm = make_llm(setup, load=[], max_adapters=2)
    llm.load_adapter("a", "all")
    llm.load_adapter("b", "prefix5")
    llm.generate(PROMPTS[1], GREEDY, adapter="a")  # b is now the least recently used
    llm.load_adapter("c", "mlp")
    assert sorted(a["name"] for a in llm.list_adapters()) == ["a", "c"]
    busy = [llm.add_request(PROMPTS[1], GREEDY, adapter=n) for n in ("a", "c")]
    with pytest.raises(AdapterError, match="max_adapters=2"):
        llm.load_adapter("d", "rs_qv")
    for request_id in busy:
        llm.abort(request_id)
    llm.load_adapter("d", "rs_qv")
    assert len(llm.list_adapters()) == 2


def _edit_config(folder: Path, **changes) -> None:
    file = folder / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _bad_folder(root: Path, kind: str, outside: Path) -> str:
    """Make a broken adapter folder; return the path to load."""
    folder = root / f"bad_{kind}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(root / ("prefix5" if kind == "prefix_shape" else "all"), folder)
    weights = folder / "adapter_model.safetensors"
    if kind == "lora_shape":
        tensors = load_file(weights)
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
        save_file(tensors, weights)
    elif kind == "prefix_shape":
        save_file({"prompt_embeddings": torch.zeros(5, 100)}, weights)
    elif kind == "peft_type":
        _edit_config(folder, peft_type="IA3")
    elif kind == "pickle_only":
        weights.unlink()
        (folder / "adapter_model.bin").write_bytes(b"not unpickled")
    elif kind == "dora":
        _edit_config(folder, use_dora=True)
    elif kind == "modules_to_save":
        _edit_config(folder, modules_to_save=["lm_head"])
    elif kind == "rank":
        _edit_config(folder, r=64)
    elif kind == "outside":
        return str(outside)
    elif kind == "traversal":
        return f"all/../{os.path.relpath(outside, root)}"
    elif kind == "symlink":
        shutil.rmtree(folder)
        folder.symlink_to(outside, target_is_directory=True)
    elif kind == "config_symlink":  # (its values would reach the error messages)
        (folder / "adapter_config.json").unlink()
        (folder / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    return folder.name


@pytest.mark.parametrize("kind, message", [
    ("lora_shape", "do not fit"), ("prefix_shape", "prompt_embeddings has shape"),
    ("peft_type", "'IA3' is not supported"),
    ("pickle_only", "only pickled weights"), ("dora", "DoRA"), ("modules_to_save", "modules_to_save"),
    ("rank", "max_lora_rank=16"), ("outside", "outside the adapter root"), ("traversal", "outside the adapter root"),
    ("symlink", "outside the adapter root"), ("config_symlink", "outside the adapter root"),
    ("truncated", "not a readable safetensors file"),
])
def test_bad_adapter_folder_is_refused_and_the_engine_keeps_serving(setup, llm, tmp_path, kind, message):
    root = setup[1]
    shutil.copytree(root / "all", tmp_path / "elsewhere")  # a valid adapter, but outside the root
    adapters_before = llm.list_adapters()
    with pytest.raises(AdapterError, match=message) as refused:
        llm.load_adapter("bad", _bad_folder(root, kind, tmp_path / "elsewhere"))
    # errors reach HTTP clients: they name what is in the root, never where the root (or a link's target) is on the
    # server's disk; "outside" echoes the path the client gave
    assert str(root.resolve()) not in str(refused.value)
    assert kind == "outside" or str(tmp_path.resolve()) not in str(refused.value)
    assert llm.list_adapters() == adapters_before
    out = llm.generate([PROMPTS[0], PROMPTS[2]], SamplingParams(max_tokens=1, temperature=0),
                       adapter=["all", "prefix5"])
    assert [o.token_ids[0] for o in out] == [int(setup[2][a][i][-1].argmax()) for a, i in (("all", 0), ("prefix5", 2))]


def test_training_script_writes_adapters_that_load(tmp_path, tiny_model_dir):
    from engine.training.adapters import main as train_adapters

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "text").write_text("Permission is hereby granted, free of charge, to any person. " * 40)
    train_adapters(["--model", str(tiny_model_dir), "--corpus", str(tmp_path / "corpus"),
                    "--out", str(tmp_path / "out"),
                    "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--virtual-tokens", "3"])
    llm = LLM(tiny_model_dir, num_kv_blocks=64, adapter_root=str(tmp_path / "out"))
    base = llm.generate(PROMPTS[0], GREEDY)[0].token_ids
    for name in ("licenses-lora", "licenses-prefix"):
        assert sorted(p.name for p in (tmp_path / "out" / name).glob("adapter_*")) == [
            "adapter_config.json", "adapter_model.safetensors"]
        llm.load_adapter(name, name)
        assert llm.generate(PROMPTS[0], GREEDY, adapter=name)[0].token_ids != base
    # a corpus given as a file; too little of it for a held-out window, and no corpus at all, are clear errors
    common = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "again"), "--steps", "1", "--batch-size", "1"]
    with pytest.raises(SystemExit, match=r"the corpus has \d+ tokens; its last 10% are held out, and each part needs "
                                         r"more than --seq-len 1024"):
        train_adapters([*common, "--corpus", str(tmp_path / "corpus" / "text"), "--seq-len", "1024"])
    with pytest.raises(SystemExit, match="no such file or folder"):
        train_adapters([*common, "--corpus", str(tmp_path / "nowhere")])


def test_medusa_stays_lossless_with_adapters(setup, tmp_path):
    """Drafts are read from plain runs (at varying ranks, so accepted paths move K/V), and every tree is
    verified through the request's adapter: the output must equal plain greedy decoding exactly."""
    from models.medusa import MedusaConfig, MedusaHeads, save_medusa_heads

    save_medusa_heads(MedusaHeads(MedusaConfig(num_heads=4, num_layers=1, hidden_size=64, vocab_size=256,
                                               own_lm_head=False)), tmp_path / "heads")
    adapters = ["prefix5", "all", None, "prefix8", "rs_qv", "prefix5"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = make_llm(setup, load=["prefix5", "prefix8", "all", "rs_qv"])
    expected = [o.token_ids for o in plain.generate(PROMPTS, params, adapter=adapters)]
    llm = make_llm(setup, load=["prefix5", "prefix8", "all", "rs_qv"], medusa=str(tmp_path / "heads"))
    futures = {f"r{i}": p + e for i, (p, e) in enumerate(zip(PROMPTS, expected))}
    top_k, depth = llm.medusa.tree_for(1).tree.top_k, llm.medusa.tree_for(1).tree.depth

    def oracle_propose(seqs, hidden, num_running) -> None:
        for seq in seqs:
            future, root = futures[seq.request_id], len(seq) - 1
            seq.draft_token_ids = None
            if llm.medusa.can_speculate(seq):
                seq.draft_token_ids = [[future[root + 1 + d] if root + 1 + d < len(future) and k == root % top_k else 0
                                        for k in range(top_k)] for d in range(depth)]
                seq.draft_tree = llm.medusa.tree_for(1).verify

    llm.medusa.propose = oracle_propose
    ids = [llm.add_request(p, params, request_id=f"r{i}", adapter=a) for i, (p, a) in enumerate(zip(PROMPTS, adapters))]
    outs = {}
    while llm.has_unfinished():
        outs.update({o.request_id: o for o in llm.step() if o.finished})
    assert [outs[i].token_ids for i in ids] == expected
    assert all(max(outs[i].accepted_lengths) > 1 for i in ids)


@pytest.mark.parametrize("argv", [["train-adapters", "--help"], ["bench", "adapters", "--help"]])
def test_commands_that_need_peft_say_how_to_install_it(monkeypatch, argv):
    from server.cli import main as gorgon

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails, as without the extra
    for name in ("engine.training.adapters", "bench.adapters"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(SystemExit, match=r"needs peft.*pip install -e '\.\[train\]'"):
        gorgon(argv)
