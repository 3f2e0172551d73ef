"""The shipped default model (models/default): loads in transformers and gorgon alike, its tokenizer
round-trips text, and it is genuinely trained (low loss on stdlib modules it never saw). Its training
script continues a checkpoint, with Medusa heads trained jointly."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.training.default_model import main as train_default
from engine.training.default_model import parse_args, start_model, stdlib_root
from models import DEFAULT_MODEL_DIR
from models.loader import load_model
from models.medusa import DRAFT_VOCAB_FILE, MedusaConfig, MedusaHeads, load_medusa_heads, save_medusa_heads

# Measured 3.74 nats/token on these windows after both training stages; a random model scores ~ln(4096) = 8.3.
HELD_OUT_LOSS_BOUND = 4.3
HELD_OUT_WINDOWS = ("heapq.py", "shlex.py", "textwrap.py")
WINDOW_TOKENS = 256


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model(DEFAULT_MODEL_DIR, torch.float32, "cpu")


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(ids.shape[1]).expand_as(ids)))


def test_transformers_and_gorgon_agree(tokenizer, model):
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    ids = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("text", [
    "def f(x):\n\treturn x  # tab  and  double spaces\n\n\n",
    "s = 'héllo wörld ✓ 日本語 🐍'\r\n    print(s)   \n",
    "   leading and trailing whitespace   ",
    "",
])
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_ends_with_assistant_header(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("### assistant\n")


def test_held_out_loss_is_low(tokenizer, model):
    files = [stdlib_root() / name for name in HELD_OUT_WINDOWS]
    if not all(f.is_file() for f in files):
        pytest.skip("held-out stdlib modules are not present in this interpreter")
    windows = [tokenizer(f.read_text(encoding="utf-8")).input_ids[:WINDOW_TOKENS] for f in files]
    batch = torch.tensor(windows)
    out = logits(model, batch[:, :-1])
    loss = F.cross_entropy(out.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert loss < HELD_OUT_LOSS_BOUND, f"held-out loss {loss:.3f} nats/token"


def test_joint_medusa_stage_continues_the_checkpoint(tmp_path):
    """A few seconds of a second stage from the shipped model with two joint heads: a loadable checkpoint,
    loadable heads, and the training history extended by this stage."""
    out = tmp_path / "stage2"
    argv = ["--init", str(DEFAULT_MODEL_DIR), "--out", str(out), "--medusa-heads", "2", "--minutes", "0.03",
            "--lr", "1e-4", "--batch-size", "1", "--threads", "1", "--final-eval-windows", "8"]
    train_default(argv)
    load_model(out, torch.float32, "cpu")
    assert load_medusa_heads(out / "medusa", 256, 4096).config.num_heads == 2
    before = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())["stages"]
    stages = json.loads((out / "training.json").read_text())["stages"]
    assert stages[:-1] == before
    assert stages[-1]["hyperparameters"]["init"] == str(DEFAULT_MODEL_DIR) and len(stages[-1]["heads_top1"]) == 2
    assert stages[-1]["val_nats"] < HELD_OUT_LOSS_BOUND and stages[-1]["val_tokens"] == 8 * 512
    assert " ".join(argv) in (out / "README.md").read_text()
    # a further stage can start its heads from those (their shape comes from the folder); a draft vocabulary
    # there described the old heads' training text, so the new heads come without one
    save_file({"token_ids": torch.arange(10)}, out / "medusa" / DRAFT_VOCAB_FILE)
    again = tmp_path / "stage3"
    train_default(["--init", str(out), "--out", str(again), "--medusa-init", str(out / "medusa"), "--minutes", "0.01",
                   "--batch-size", "1", "--threads", "1", "--final-eval-windows", "2"])
    heads = load_medusa_heads(again / "medusa", 256, 4096)
    assert heads.config.num_heads == 2 and heads.draft_vocab is None
    stages = json.loads((again / "training.json").read_text())["stages"]
    assert len(stages) == len(before) + 2 and stages[-1]["hyperparameters"]["medusa_heads"] == 2


def test_training_from_an_fp16_checkpoint_trains_every_matrix(tmp_path):
    """load_model keeps an fp16 checkpoint's matrices in fp16 (frozen, for inference): --init trains them in fp32."""
    shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "fp16", ignore=shutil.ignore_patterns("medusa"))
    tensors = load_file(tmp_path / "fp16" / "model.safetensors")
    save_file({k: v.half() for k, v in tensors.items()}, tmp_path / "fp16" / "model.safetensors")
    config = json.loads((tmp_path / "fp16" / "config.json").read_text())
    (tmp_path / "fp16" / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    assert load_model(tmp_path / "fp16", torch.float32, "cpu").model.layers[0].mlp.down_proj.weight.dtype == (
        torch.float16)
    model, *_ = start_model(parse_args(["--init", str(tmp_path / "fp16"), "--out", str(tmp_path / "out")]), [])
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())


def test_bad_init_folders_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="has no config.json"):
        train_default(["--init", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="not a Medusa heads folder"):
        train_default(["--init", str(DEFAULT_MODEL_DIR), "--out", str(tmp_path / "out"),
                       "--medusa-init", str(tmp_path)])
    # Hydra heads (train-medusa's default kind) read the drafted tokens, which joint training does not feed them
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    save_medusa_heads(MedusaHeads(MedusaConfig(2, 1, config["hidden_size"], config["vocab_size"], own_lm_head=False,
                                               sequential=True)), tmp_path / "hydra")
    with pytest.raises(SystemExit, match="these are Hydra heads"):
        train_default(["--init", str(DEFAULT_MODEL_DIR), "--out", str(tmp_path / "out"),
                       "--medusa-init", str(tmp_path / "hydra")])
    assert not (tmp_path / "out").exists()


def test_encoded_documents_keep_ids_beyond_int16(tmp_path):
    """train-default --init with a checkpoint's tokenizer of 49152 tokens (SmolLM2's): its ids overflowed int16."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from engine.training.default_model import EOS, encode_documents

    vocab = {EOS: 0, **{f"w{i}": i + 1 for i in range(49151)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "doc.py").write_text("w1 w40000 w49150")
    tokens = encode_documents(tokenizer, [tmp_path / "doc.py"], tmp_path / "cache")
    assert tokens.tolist() == [2, 40001, 49151, 0]
