r"""Train gorgon's shipped default model: a small Llama on the Python standard library's source.

    python -m engine.training.default_model --out models/default --minutes 55
    python -m engine.training.default_model --init models/default --out models/default \
        --medusa-heads 4 --lr 3e-4 --minutes 30

Builds a byte-level BPE tokenizer, trains a Llama-architecture model with gorgon's own model code
(models.llama), and saves a Hugging Face checkpoint folder (config.json, model.safetensors,
tokenizer files, generation_config.json, training.json, README.md) that transformers and gorgon both load.

--init continues from a checkpoint (its weights and tokenizer) instead of starting from scratch.
--medusa-heads K trains K Medusa heads jointly with the model ("Medusa-2"): the heads' losses join the
LM loss, so the model learns hidden states that say something about the tokens after the next one.
--medusa-init DIR starts those heads from existing ones (e.g. heads trained on the frozen model).
The heads go to OUT/medusa. training.json keeps every stage a checkpoint went through.

The learning-rate schedule is time-based: cosine decay over the --minutes budget, so the run ends at
the deadline with the schedule finished whatever the machine's speed. Data order and initialisation
are fixed by --seed; only the number of steps depends on the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from engine.training.common import HEAD_OFFSET, cosine, head_losses, head_weights, random_windows
from models.config import ModelConfig
from models.kernels.decode import bf16_gemm
from models.layers import PackedLinear
from models.llama import LlamaForCausalLM
from models.loader import load_model
from models.medusa import MedusaConfig, MedusaHeads, load_medusa_heads, save_medusa_heads

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Modules held out of tokenizer and model training, for validation (paths relative to the stdlib).
VALIDATION_MODULES = ("argparse.py", "difflib.py", "heapq.py", "shlex.py", "textwrap.py", "fractions.py")
# Test suites are left out: they are full of deliberately odd code (bad syntax, encodings, data blobs).
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '### ' + message['role'] + '\\n' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### assistant\\n' }}{% endif %}"
)


@dataclass
class DefaultModelTraining:
    """train-default's flags, one a field (`--num-layers` is num_layers); FLAG_HELP says what each does."""

    out: Path = Path("out/default_model")  # (the shipped model is models/default: name it to retrain that one)
    minutes: float = 35.0
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 688
    seq_len: int = 512
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_windows: int = 16
    final_eval_windows: int = 0
    threads: int = 2
    bf16: bool = field(default_factory=bf16_gemm)  # torch's bf16 GEMM crawls on CPUs without bf16 units
    cache_dir: Path = Path("/tmp/gorgon_train_default")
    init: str = ""
    medusa_heads: int = 0
    medusa_init: str = ""
    medusa_layers: int = 2
    medusa_weight: float = 0.2
    medusa_lr: float = 1e-3


FLAG_HELP = {
    "out": "the checkpoint folder to write (models/default is the shipped model)",
    "minutes": "training time, wall clock",
    "seed": "random seed (data order, initialisation)",
    "vocab_size": "the byte-level BPE tokenizer's size (trained on the corpus)",
    "hidden_size": "the model's width",
    "num_layers": "decoder layers",
    "num_heads": "attention heads",
    "num_kv_heads": "key/value heads (grouped-query attention)",
    "intermediate_size": "the MLP's width",
    "seq_len": "tokens a training window",
    "batch_size": "windows a step",
    "lr": "peak learning rate (AdamW, cosine decay)",
    "min_lr_ratio": "the learning rate at the end, over the peak",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient norm clip",
    "eval_every": "steps between validations",
    "eval_windows": "windows in each periodic validation",
    "final_eval_windows": "windows in the final validation, whose loss the checkpoint records (0: the whole set)",
    "threads": "CPU threads",
    "bf16": "bf16 autocast for matmuls over fp32 master weights (~1.6x faster on CPUs with AVX512-BF16 or AMX, "
            "on by default there; 10x slower on others)",
    "cache_dir": "where the tokenized corpus is cached",
    "init": "a checkpoint folder to continue from (its architecture and tokenizer win over the flags)",
    "medusa_heads": "> 0: train this many Medusa heads jointly with the model",
    "medusa_init": "a Medusa heads folder to start the joint heads from (fresh heads when empty)",
    "medusa_layers": "residual blocks a head",
    "medusa_weight": "joint loss = LM loss + this * sum_k 0.8^k * (head k's loss)",
    "medusa_lr": "the heads' peak learning rate (the model's warmup and decay)",
}


# With --init these come from the checkpoint, so a stage's record leaves them out
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files() -> tuple[list[Path], list[Path]]:
    """(train files, validation files) of the running interpreter's standard library."""
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(root).parts))
    held_out = {root / m for m in VALIDATION_MODULES}
    return [p for p in files if p not in held_out], [root / m for m in VALIDATION_MODULES]


def read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def build_tokenizer(files: list[Path], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((read_source(p) for p in files), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def encode_documents(tokenizer: Tokenizer, files: list[Path], cache_dir: Path) -> torch.Tensor:
    """All files as one stream of <s> doc </s> token ids, cached in cache_dir by content hash."""
    key = hashlib.sha256(tokenizer.to_str().encode())
    for p in files:
        key.update(str(p).encode())
        key.update(str(p.stat().st_mtime_ns).encode())
    cache = cache_dir / f"tokens-{key.hexdigest()[:16]}.pt"
    if cache.is_file():
        return torch.load(cache)
    eos_id = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch([read_source(p) for p in files]):  # BOS comes from the post-processor
        ids.extend(encoding.ids)
        ids.append(eos_id)
    # half the memory of int32 where every id fits (the default vocabulary); --init checkpoints may have more
    tokens = torch.tensor(ids, dtype=torch.int16 if tokenizer.get_vocab_size() <= 1 << 15 else torch.int32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(tokens, cache)
    return tokens


def hf_config(cfg: DefaultModelTraining, tokenizer: Tokenizer) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.hidden_size // cfg.num_heads,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": tokenizer.token_to_id(EOS),
        "pad_token_id": tokenizer.token_to_id(PAD),
        "dtype": "float32",
    }


def init_weights(model: LlamaForCausalLM, num_layers: int) -> None:
    """GPT-2 style: N(0, 0.02), residual-branch outputs scaled by 1/sqrt(2 * layers). The modules'
    defaults (N(0, 1) embeddings, tied to the LM head) would start with huge logits."""
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)


def eval_windows(tokens: torch.Tensor, length: int, limit: int | None = None) -> list[torch.Tensor]:
    """Consecutive windows overlapping by one token, so every token after the first is predicted once."""
    step = length - 1
    windows = [tokens[s:s + length].long() for s in range(0, len(tokens) - 1, step)]
    return windows[:limit] if limit else windows


def batch_loss(model: LlamaForCausalLM, batch: torch.Tensor, heads: MedusaHeads | None = None,
               medusa_weight: float = 0.0) -> torch.Tensor:
    """Mean next-token loss over windows [B, S + 1]; with heads, plus medusa_weight times their weighted losses."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    hidden = model(inputs, positions)
    loss = F.cross_entropy(model.compute_logits(hidden).float().flatten(0, 1), targets.flatten())
    if heads is None:
        return loss
    per_head = head_losses(heads, model, hidden, inputs)
    return loss + medusa_weight * (per_head * head_weights(len(per_head))).sum()


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, windows: list[torch.Tensor], autocast,
             heads: MedusaHeads | None = None) -> tuple[float, int, list[float] | None]:
    """(total nats, number of predicted tokens, each head's top-1 accuracy or None) over the windows,
    from one forward per window."""
    model.eval()
    nats, count = 0.0, 0
    num_heads = 0 if heads is None else heads.config.num_heads
    hits, targets = torch.zeros(num_heads), torch.zeros(num_heads)
    for w in windows:
        inputs = w[:-1].unsqueeze(0)
        with autocast():
            hidden = model(inputs, torch.arange(inputs.shape[1]).unsqueeze(0))
            logits = model.compute_logits(hidden).float()
            head_logits = None if heads is None else heads(hidden, model.compute_logits)  # [K, 1, S, V]
        nats += F.cross_entropy(logits[0], w[1:], reduction="sum").item()
        count += len(w) - 1
        for k in range(num_heads):
            shift = HEAD_OFFSET + k
            hits[k] += (head_logits[k, 0, :len(w) - shift].argmax(dim=-1) == w[shift:]).sum()
            targets[k] += len(w) - shift
    model.train()
    return nats, count, None if heads is None else (hits / targets).tolist()


def lr_scale(cfg: DefaultModelTraining, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from 1 to min_lr_ratio over the time budget."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine(progress)


def train(cfg: DefaultModelTraining, model: LlamaForCausalLM, heads: MedusaHeads | None, train_tokens: torch.Tensor,
          val_tokens: torch.Tensor, autocast) -> dict:
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "peak_lr": cfg.lr}]
    if heads is not None:
        groups.append({"params": list(heads.parameters()), "weight_decay": 0.0, "peak_lr": cfg.medusa_lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    parameters = [p for group in groups for p in group["params"]]
    gen = torch.Generator().manual_seed(cfg.seed)
    val_subset = eval_windows(val_tokens, cfg.seq_len + 1, cfg.eval_windows)
    budget_s = cfg.minutes * 60
    start = time.monotonic()
    step, tokens_seen = 0, 0
    model.train()
    with tqdm(total=round(budget_s), unit="s", desc="training", file=sys.stdout, mininterval=5) as bar:
        while (elapsed := time.monotonic() - start) < budget_s:
            scale = lr_scale(cfg, step, elapsed / budget_s)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * scale
            lr = cfg.lr * scale
            batch = random_windows(train_tokens, cfg.batch_size, cfg.seq_len + 1, gen)
            with autocast():
                loss = batch_loss(model, batch, heads, cfg.medusa_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
            optimizer.step()
            step += 1
            tokens_seen += batch.numel() - cfg.batch_size
            postfix = {"step": step, "loss": f"{loss.item():.3f}", "lr": f"{lr:.2e}"}
            if step % cfg.eval_every == 0:
                nats, count, top1 = evaluate(model, val_subset, autocast, heads)
                postfix["val"] = f"{nats / count:.3f}"
                heads_note = "" if top1 is None else f", heads' val top-1 {[round(a, 3) for a in top1]}"
                tqdm.write(f"step {step}: train loss {loss.item():.4f}, val loss {nats / count:.4f}{heads_note}, "
                           f"{tokens_seen / (time.monotonic() - start):.0f} tok/s", file=sys.stdout)
            bar.set_postfix(postfix, refresh=False)
            bar.update(min(round(time.monotonic() - start), bar.total) - bar.n)
    return {"steps": step, "tokens_seen": tokens_seen, "train_seconds": time.monotonic() - start}


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Our parameters under HF names: packed q/k/v and gate/up split back into their projections;
    the tied LM head left out."""
    modules = dict(model.named_modules())
    state = {}
    for name, tensor in model.state_dict().items():
        module_path, param_name = name.rsplit(".", 1)
        module = modules[module_path]
        if isinstance(module, PackedLinear):
            parent = module_path.rsplit(".", 1)[0]
            for shard in module.shards:
                state[f"{parent}.{shard}.{param_name}"] = module.shard_param(param_name, shard).clone()
        elif name != "lm_head.weight" or not model.config.tie_word_embeddings:
            state[name] = tensor.detach().clone()
    return {k: v.float().contiguous() for k, v in state.items()}


def save_checkpoint(out: Path, model: LlamaForCausalLM, config: dict, tokenizer: Tokenizer, max_length: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(hf_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    generation_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                         "pad_token_id": config["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")


def write_readme(out: Path, stages: list[dict]) -> None:
    """README.md of a checkpoint from its training stages (training.json)."""
    first, last = stages[0], stages[-1]
    seq_len = last["hyperparameters"]["seq_len"]
    heads = [st for st in stages if st.get("heads_top1")]
    rows = "\n".join(
        f"| {n} | `{st['command']}` | {st['steps']:,} | {st['tokens_seen']:,} | {st['train_seconds'] / 60:.1f} "
        f"({st['threads']} thread{'s' * (st['threads'] != 1)}) | {st['val_nats']:.4f} | {st['val_bpb']:.4f} |"
        for n, st in enumerate(stages, 1))
    names = list(dict.fromkeys(k for st in stages for k in st["hyperparameters"]))
    hyper = "\n".join(f"| {k} | " + " | ".join(str(st["hyperparameters"].get(k, "")) for st in stages) + " |"
                       for k in names)
    medusa = "" if not heads else f"""
The last stage with `--medusa-heads` trained {len(heads[-1]['heads_top1'])} Medusa heads jointly with the
model ("Medusa-2": their losses, weighted 0.8^k and scaled by `medusa_weight`, join the LM loss), so
the hidden states also say something about the tokens after the next one. Its heads were written to
`medusa/`; their top-1 accuracy on the validation set, tokens +2 to +{len(heads[-1]['heads_top1']) + 1}, was
{', '.join(f'{a:.3f}' for a in heads[-1]['heads_top1'])}. See `medusa/README.md` for the shipped heads.
"""
    (out / "README.md").write_text(f"""# gorgon default model

A small Llama-architecture causal LM trained from scratch by `gorgon train-default` on the `.py`
source of the Python {first['python']} standard library (test suites and site-packages excluded;
held out for validation: {', '.join(VALIDATION_MODULES)}). Its tokenizer is a byte-level BPE
({first['vocab_size']} tokens, `<s>` prepended on encoding) trained on the same files. It writes
plausible-looking Python and nothing else; it exists so gorgon works offline out of the box.

| | |
|---|---|
| parameters | {first['params']:,} (tied input/output embeddings) |
| training steps | {sum(st['steps'] for st in stages):,} |
| tokens seen | {sum(st['tokens_seen'] for st in stages):,} |
| training wall time | {sum(st['train_seconds'] for st in stages) / 60:.1f} min |
| validation loss | {last['val_nats']:.4f} nats/token, {last['val_bpb']:.4f} bits/byte |
| validation set | {last['val_tokens']:,} tokens, {last['val_bytes']:,} bytes, in {seq_len}-token windows |

Bits/byte is the validation set's total loss in bits divided by its UTF-8 size.

## Reproduce

Run the stages in order (`gorgon train-default` takes the same flags); the validation loss is the
one after each stage.

| stage | command | steps | tokens | minutes | val nats/token | val bits/byte |
|---|---|---|---|---|---|---|
{rows}
{medusa}
Initialisation and data order are fixed by the seed; the learning-rate schedule runs over the
wall-clock budget, so the step count, and with it the final loss, depends on how fast and how
loaded the machine is. `training.json` has every stage's figures.

## Hyperparameters

| name | {' | '.join(f'stage {n}' for n in range(1, len(stages) + 1))} |
|---|{'---|' * len(stages)}
{hyper}
""")


def parse_args(argv: list[str] | None) -> DefaultModelTraining:
    defaults = DefaultModelTraining()
    parser = argparse.ArgumentParser(prog="gorgon train-default", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=FLAG_HELP[name])
        else:
            parser.add_argument(flag, type=type(value), default=value, help=FLAG_HELP[name])
    return DefaultModelTraining(**vars(parser.parse_args(argv)))


def start_model(cfg: DefaultModelTraining,
                train_files: list[Path]) -> tuple[LlamaForCausalLM, dict, Tokenizer, list[dict]]:
    """(model, HF config, tokenizer, earlier training stages): from the --init checkpoint, else fresh."""
    if not cfg.init:
        tokenizer = build_tokenizer(train_files, cfg.vocab_size)
        config = hf_config(cfg, tokenizer)
        model = LlamaForCausalLM(ModelConfig.from_dict(config))
        init_weights(model, cfg.num_layers)
        return model, config, tokenizer, []
    init = Path(cfg.init)
    # (a clear error when init is no checkpoint; fp16 matrices, kept so for inference, trained in fp32)
    model = load_model(init, torch.float32, "cpu").float().requires_grad_(True).train()
    history = init / "training.json"
    stages = json.loads(history.read_text())["stages"] if history.is_file() else []
    return (model, json.loads((init / "config.json").read_text()), Tokenizer.from_file(str(init / "tokenizer.json")),
            stages)


def start_heads(cfg: DefaultModelTraining, config: dict) -> MedusaHeads | None:
    """The joint Medusa heads: from --medusa-init (which then sets their count and depth), fresh, or none."""
    if cfg.medusa_init:
        heads = load_medusa_heads(cfg.medusa_init, config["hidden_size"], config["vocab_size"])
        if heads.config.sequential:  # joint training feeds the heads hidden states alone
            raise ValueError(f"--medusa-init {cfg.medusa_init}: these are Hydra heads, and joint training takes "
                             "Medusa heads (train-medusa --head-kind medusa makes some)")
        cfg.medusa_heads, cfg.medusa_layers = heads.config.num_heads, heads.config.num_layers
        heads.draft_vocab = None  # it described their old training text; train-medusa picks a new one
        return heads
    if cfg.medusa_heads:
        return MedusaHeads(MedusaConfig(cfg.medusa_heads, cfg.medusa_layers, config["hidden_size"],
                                        config["vocab_size"], own_lm_head=False))
    return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    train_files, val_files = corpus_files()
    print(f"corpus: {len(train_files)} training files, {len(val_files)} validation files from {stdlib_root()}")
    try:
        model, config, tokenizer, stages = start_model(cfg, train_files)
        heads = start_heads(cfg, config)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"gorgon train-default: error: {e}") from None
    train_tokens = encode_documents(tokenizer, train_files, cfg.cache_dir)
    val_tokens = encode_documents(tokenizer, val_files, cfg.cache_dir)
    print(f"tokens: {len(train_tokens):,} train, {len(val_tokens):,} validation")
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters" + (f", {cfg.medusa_heads} Medusa heads" if heads else ""))

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()

    stats = train(cfg, model, heads, train_tokens, val_tokens, autocast)
    # final validation in fp32 (over the whole held-out set, unless told otherwise)
    windows = eval_windows(val_tokens, cfg.seq_len + 1, cfg.final_eval_windows or None)
    nats, count, top1 = evaluate(model, windows, contextlib.nullcontext, heads)
    val_bytes = sum(len(read_source(p).encode()) for p in val_files)
    if count < len(val_tokens) - 1:  # a part of the set: about its share of the bytes
        val_bytes = round(val_bytes * count / (len(val_tokens) - 1))
    stats.update(params=params, val_nats=nats / count, val_bpb=nats / math.log(2) / val_bytes, val_tokens=count,
                 val_bytes=val_bytes, vocab_size=config["vocab_size"], threads=cfg.threads,
                 python=".".join(map(str, sys.version_info[:3])))
    if top1 is not None:
        stats["heads_top1"] = top1
    print(f"done: {stats['steps']} steps, {stats['tokens_seen']:,} tokens, {stats['train_seconds'] / 60:.1f} min; "
          f"val loss {stats['val_nats']:.4f} nats/token, {stats['val_bpb']:.4f} bits/byte"
          + (f"; heads' val top-1 {[round(a, 3) for a in stats['heads_top1']]}" if heads else ""))

    hyperparameters = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()
                       if k not in ("out", "cache_dir") and not (cfg.init and k in ARCHITECTURE_FIELDS)
                       and not (not cfg.medusa_heads and k.startswith("medusa_"))}
    command = " ".join(["gorgon train-default", *argv])
    stages.append({"command": command, **stats, "hyperparameters": hyperparameters})
    save_checkpoint(cfg.out, model, config, tokenizer, config["max_position_embeddings"])
    if heads is not None:
        save_medusa_heads(heads.eval(), cfg.out / "medusa", base_model=str(cfg.out))
    (cfg.out / "training.json").write_text(json.dumps({"stages": stages}, indent=2) + "\n")
    write_readme(cfg.out, stages)
    print(f"saved to {cfg.out}")


if __name__ == "__main__":
    main()
