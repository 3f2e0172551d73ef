"""`gorgon train-adapters`: train the two example adapters of a base model with PEFT, one LoRA and one
prefix-tuning adapter, and save them in PEFT format under <model>/adapters/.

The text is the software licenses every Debian-family machine ships in /usr/share/common-licenses:
English legal prose, where the default model saw only Python source, so the adapters' effect shows
at once (held-out loss, and a greedy sample printed for the base model and each adapter)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM, SamplingParams
from engine.training.common import cosine, positive_int, random_windows
from models import DEFAULT_MODEL_DIR

CORPUS_DIR = Path("/usr/share/common-licenses")
SAMPLE_PROMPT = "This License applies to"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon train-adapters", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="HF checkpoint folder")
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR,
                        help="a text file, or a folder of them, to train on (%(default)s)")
    parser.add_argument("--out", type=Path, help="where the adapter folders go (default: <model>/adapters)")
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--lora-rank", type=positive_int, default=8)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--virtual-tokens", type=positive_int, default=16)
    parser.add_argument("--prefix-lr", type=float, default=2e-2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def corpus_tokens(tokenizer, corpus: Path) -> torch.Tensor:
    """The text file `corpus`, or every readable text file under the folder `corpus`, tokenized and concatenated
    (sorted, so runs repeat)."""
    if not corpus.exists():
        raise SystemExit(f"gorgon train-adapters: error: no such file or folder: {corpus}")
    texts = []
    for file in [corpus] if corpus.is_file() else sorted(p for p in corpus.rglob("*") if p.is_file()):
        try:
            texts.append(file.read_text())
        except UnicodeDecodeError:  # not a text file
            continue
    if not texts:
        raise SystemExit(f"gorgon train-adapters: error: no text files in {corpus}")
    return torch.tensor(tokenizer("\n\n".join(texts))["input_ids"])


def split_corpus(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training tokens, the last 10% held out), each at least one window of seq_len (training: one more token,
    to draw windows from)."""
    split = int(len(tokens) * 0.9)
    train_tokens, held_out = tokens[:split], tokens[split:]
    if len(held_out) < seq_len or len(train_tokens) <= seq_len:
        raise SystemExit(f"gorgon train-adapters: error: the corpus has {len(tokens)} tokens; its last 10% are held "
                         f"out, and each part needs more than --seq-len {seq_len}: give more text or a smaller "
                         "--seq-len")
    return train_tokens, held_out


@torch.no_grad()
def mean_loss(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, max_windows: int = 32) -> float:
    """Loss over the first `max_windows` consecutive windows of `tokens`, 8 windows per forward."""
    num_windows = min(max_windows, len(tokens) // seq_len)
    batches = tokens[:num_windows * seq_len].view(num_windows, seq_len).split(8)
    return sum(model(input_ids=b, labels=b).loss.item() * len(b) for b in batches) / num_windows


def train(model: torch.nn.Module, tokens: torch.Tensor, args: argparse.Namespace, lr: float, desc: str) -> None:
    generator = torch.Generator().manual_seed(args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine(step / args.steps))
    model.train()
    with tqdm(range(args.steps), desc=desc) as bar:
        for _ in bar:
            batch = random_windows(tokens, args.batch_size, args.seq_len, generator)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def samples(model_dir: Path, adapter_root: Path, names: list[str]) -> dict[str, str]:
    """Greedy continuations of SAMPLE_PROMPT by gorgon itself: the base model and each saved adapter.
    (PEFT's generate under transformers 5 drops a prefix adapter's virtual tokens, so it is not used.)"""
    llm = LLM(model_dir, adapter_root=str(adapter_root))
    greedy = SamplingParams(max_tokens=40, temperature=0)
    out = {"base": llm.generate(SAMPLE_PROMPT, greedy)[0].text}
    for name in names:
        llm.load_adapter(name, name)
        out[name] = llm.generate(SAMPLE_PROMPT, greedy, adapter=name)[0].text
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"gorgon train-adapters: error: {args.model} is no Hugging Face checkpoint folder (no "
                         "config.json there)")
    out_dir = args.out or args.model / "adapters"
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokens = corpus_tokens(tokenizer, args.corpus)
    train_tokens, held_out = split_corpus(tokens, args.seq_len)
    print(f"corpus: {len(tokens)} tokens from {args.corpus} ({len(held_out)} held out)")

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    print(f"base: held-out loss {mean_loss(base, held_out, args.seq_len):.3f}")
    configs = {
        "licenses-lora": (LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=LORA_TARGETS),
                          args.lora_lr),
        "licenses-prefix": (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.virtual_tokens),
                            args.prefix_lr),
    }
    for name, (config, lr) in configs.items():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), config)
        train(model, train_tokens, args, lr, desc=name)
        model.save_pretrained(out_dir / name)  # adapter_config.json + adapter_model.safetensors
        print(f"{name}: held-out loss {mean_loss(model, held_out, args.seq_len):.3f}; saved to {out_dir / name}")
    for name, text in samples(args.model, out_dir, list(configs)).items():
        print(f"{name}, greedy after {SAMPLE_PROMPT!r}: {text!r}")


if __name__ == "__main__":
    main()
