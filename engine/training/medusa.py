"""`gorgon train-medusa`: Medusa-1 heads on a frozen base model.

Head k (from 0) learns to predict token i+2+k from the base model's final-normed hidden state at token i;
its cross-entropy is weighted 0.8^k. Without --data the training text is the base model's own: prompts
(prefixes sampled from the model, or taken from --prompts: text like the traffic the heads will serve)
continued by our engine (greedy by default, the decoding the heads will mostly serve)."""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer

from engine import LLM, SamplingParams
from models.medusa import MedusaConfig, MedusaHeads, load_medusa_heads, save_medusa_heads
from models import DEFAULT_MODEL_DIR
from models.loader import load_model


@dataclass
class TrainConfig:
    num_heads: int = 4
    num_layers: int = 1
    own_lm_head: bool = False  # v1 heads (own vocab projection) instead of v2 (the base lm_head)
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    seed: int = 0


def head_weights(num_heads: int) -> torch.Tensor:
    return 0.8 ** torch.arange(num_heads, dtype=torch.float32)


def base_hidden(model: nn.Module, windows: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """The frozen base model's final-normed hidden states of token windows [N, S] -> [N, S, hidden]."""
    out = []
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            positions = torch.arange(batch.shape[1]).expand_as(batch)
            out.append(model(batch, positions))
    return torch.cat(out).clone()  # a normal tensor, usable in autograd


def head_losses(heads: MedusaHeads, model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each head on windows ids [B, S] with base hidden states [B, S, hidden] -> [K]."""
    logits = heads(hidden, model.compute_logits)  # [K, B, S, V]
    losses = []
    for k in range(heads.config.num_heads):
        shift = k + 2  # head k at token i predicts token i + 2 + k
        losses.append(F.cross_entropy(logits[k, :, :-shift].flatten(0, 1), ids[:, shift:].flatten()))
    return torch.stack(losses)


@torch.no_grad()
def head_accuracy(heads: MedusaHeads, model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
                  batch_size: int = 16) -> list[dict[str, float]]:
    """Per head: the fraction of positions whose target token is its top-1 / among its top-5."""
    num_heads = heads.config.num_heads
    top1, top5, count = torch.zeros(num_heads), torch.zeros(num_heads), torch.zeros(num_heads)
    for h, x in zip(hidden.split(batch_size), ids.split(batch_size)):
        logits = heads(h, model.compute_logits)  # [K, B, S, V]
        for k in range(num_heads):
            shift = k + 2
            top = logits[k, :, :-shift].topk(5, dim=-1).indices  # [B, S - shift, 5]
            hit = top == x[:, shift:, None]
            top1[k] += hit[..., 0].sum()
            top5[k] += hit.any(dim=-1).sum()
            count[k] += hit.shape[0] * hit.shape[1]
    return [{"top1": (top1[k] / count[k]).item(), "top5": (top5[k] / count[k]).item()} for k in range(num_heads)]


def train_heads(model: nn.Module, windows: torch.Tensor, config: TrainConfig, progress: bool = True,
                init: MedusaHeads | None = None) -> tuple[MedusaHeads, list[float]]:
    """Train heads on token windows [N, S] over the frozen `model`, fresh ones or starting from `init`;
    returns the heads and the weighted training loss of every step."""
    torch.manual_seed(config.seed)
    model.requires_grad_(False)
    mc = model.config
    heads = init if init is not None else MedusaHeads(MedusaConfig(
        config.num_heads, config.num_layers, mc.hidden_size, mc.vocab_size, config.own_lm_head))
    heads = heads.to(next(model.parameters()).dtype).train().requires_grad_(True)
    hidden = base_hidden(model, windows)
    weights = head_weights(config.num_heads)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    with tqdm(range(config.steps), desc="training medusa heads", disable=not progress) as bar:
        for _ in bar:
            pick = torch.randint(len(windows), (config.batch_size,), generator=generator)
            loss = (head_losses(heads, model, hidden[pick], windows[pick]) * weights).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            history.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return heads.eval(), history


def draft_vocabulary(windows: torch.Tensor, vocab_size: int, coverage: float) -> torch.Tensor | None:
    """The commonest tokens of the training windows, commonest first, that make up `coverage` of them:
    the heads' draft vocabulary (MedusaHeads.draft_vocab). None when that is the whole vocabulary."""
    if coverage >= 1:
        return None
    counts = torch.bincount(windows.flatten(), minlength=vocab_size)
    order = counts.argsort(descending=True, stable=True)
    covered = counts[order].cumsum(0)
    size = int(torch.searchsorted(covered, coverage * covered[-1].item())) + 1
    return order[:size] if size < vocab_size else None


def read_corpus(path: Path, tokenizer) -> list[list[int]]:
    """Token ids of each document: a .jsonl file has one per line ("text", or "prompt" + "completion");
    any other file is one plain-text document."""
    if path.suffix != ".jsonl":
        return [tokenizer(path.read_text())["input_ids"]]
    docs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        text = record.get("text", record.get("prompt", "") + record.get("completion", ""))
        if not text:
            raise ValueError(f"{path}:{n}: expected a 'text' (or 'prompt' and 'completion') field")
        docs.append(tokenizer(text)["input_ids"])
    return docs


def windows_of(docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """Cut the concatenated documents into [N, seq_len] windows (the remainder is dropped)."""
    tokens = torch.tensor([t for doc in docs for t in doc])
    if len(tokens) < seq_len:
        raise ValueError(f"the training text has {len(tokens)} tokens, fewer than one window of {seq_len}")
    return tokens[:len(tokens) // seq_len * seq_len].view(-1, seq_len)


def prompts_from(path: Path, num_prompts: int, seed: int) -> list[str]:
    """Self-distillation prompts from a file: a .jsonl file holds one per record ("prompt", else "text"),
    of which the first num_prompts are taken; any other file is cut into num_prompts snippets of 1 to 6
    whole lines at random places (say, a concatenation of the code the model will be asked to continue)."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        prompts = [r.get("prompt", r.get("text", "")) if isinstance(r, dict) else "" for r in records][:num_prompts]
    elif not text.strip():
        prompts = []
    else:
        lines = text.splitlines(keepends=True)
        rng = random.Random(seed)
        prompts = []
        while len(prompts) < num_prompts:
            start = rng.randrange(len(lines))
            snippet = "".join(lines[start:start + rng.randint(1, 6)])
            if snippet.strip():
                prompts.append(snippet)
    if not prompts or not all(p.strip() for p in prompts):
        raise ValueError(f"{path}: expected non-empty prompts")
    return prompts


def self_distill(model_dir: Path | None, num_samples: int, seq_len: int, prefix_tokens: int,
                 temperature: float, seed: int, prompts: list[str] = ()) -> torch.Tensor:
    """Windows [num_samples + len(prompts), seq_len] of the base model's own text, continued at
    `temperature` with our engine: num_samples from prefixes of `prefix_tokens` tokens sampled at
    temperature 1 after BOS, then one from each prompt (cut to its last seq_len // 3 tokens)."""
    llm = LLM(model_dir, enable_prefix_caching=False)
    bos = llm.tokenizer.bos_token_id if llm.tokenizer.bos_token_id is not None else 0
    prefix = [SamplingParams(max_tokens=prefix_tokens, temperature=1.0, seed=seed + i, ignore_eos=True)
              for i in range(num_samples)]
    starts = [[bos] + out.token_ids for out in llm.generate([[bos]] * num_samples, prefix)] if num_samples else []
    starts += [[bos] + llm.tokenizer.encode(p, add_special_tokens=False)[-(seq_len // 3):] for p in prompts]
    rest = [SamplingParams(max_tokens=seq_len - len(p), temperature=temperature, seed=seed + i, ignore_eos=True)
            for i, p in enumerate(starts)]
    outputs = llm.generate(starts, rest, use_tqdm=True)
    return torch.tensor([p + out.token_ids for p, out in zip(starts, outputs)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon train-medusa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base HF checkpoint folder (default: the shipped model)")
    parser.add_argument("--out", required=True, help="folder for the heads (published Medusa format)")
    parser.add_argument("--data", default=None, help="text or jsonl training file (default: self-distillation)")
    parser.add_argument("--init-heads", default=None,
                        help="heads folder to start from, e.g. heads trained jointly with the model (sets --heads, "
                             "--layers and --own-lm-head)")
    parser.add_argument("--heads", type=int, default=TrainConfig.num_heads)
    parser.add_argument("--layers", type=int, default=TrainConfig.num_layers, help="residual blocks per head")
    parser.add_argument("--own-lm-head", action="store_true", help="v1 heads: each its own vocab projection")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--prompts", default=None,
                        help="self-distillation prompts: a .jsonl file (one per record, 'prompt' or 'text') or a text "
                             "file to cut snippets of whole lines from (default: prefixes sampled from the model)")
    parser.add_argument("--prompt-share", type=float, default=1.0,
                        help="with --prompts: the share of the texts that continue them; the rest continue sampled prefixes")
    parser.add_argument("--samples", type=int, default=512, help="self-distillation: texts to generate")
    parser.add_argument("--prefix-tokens", type=int, default=8, help="self-distillation: sampled prefix length")
    parser.add_argument("--temperature", type=float, default=0.0, help="self-distillation: continuation temperature")
    parser.add_argument("--draft-coverage", type=float, default=0.95,
                        help="the heads propose only the commonest tokens that make up this share of the training "
                             "text (drafting gets cheaper); 1: the whole vocabulary")
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of windows kept for evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not 0 < args.draft_coverage <= 1:
        raise SystemExit("gorgon train-medusa: error: --draft-coverage must be in (0, 1]")
    if args.data and args.prompts:
        raise SystemExit("gorgon train-medusa: error: --prompts are for self-distillation; --data trains on given text")
    if not 0 <= args.prompt_share <= 1:
        raise SystemExit("gorgon train-medusa: error: --prompt-share must be in [0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    init = None
    try:
        model = load_model(model_dir, torch.float32, torch.device("cpu"))
        if args.init_heads:  # before the (slow) training text, so a bad folder fails at once
            init = load_medusa_heads(args.init_heads, model.config.hidden_size, model.config.vocab_size)
            c = init.config
            args.heads, args.layers, args.own_lm_head = c.num_heads, c.num_layers, c.own_lm_head
        num_prompts = round(args.samples * args.prompt_share) if args.prompts else 0
        prompts = prompts_from(Path(args.prompts), num_prompts, args.seed) if num_prompts else []
    except (ValueError, OSError) as e:  # OSError: missing file, a folder, no permission
        raise SystemExit(f"gorgon train-medusa: error: {e}")
    if args.data:
        windows = windows_of(read_corpus(Path(args.data), AutoTokenizer.from_pretrained(model_dir)), args.seq_len)
    else:
        windows = self_distill(model_dir, args.samples - num_prompts, args.seq_len, args.prefix_tokens,
                               args.temperature, args.seed, prompts)
    windows = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed))]
    num_held_out = max(1, int(len(windows) * args.held_out))
    if num_held_out >= len(windows):
        raise SystemExit(f"gorgon train-medusa: {len(windows)} windows leave nothing to train on after "
                         f"holding out {num_held_out}")
    held_out, train = windows[:num_held_out], windows[num_held_out:]
    config = TrainConfig(args.heads, args.layers, args.own_lm_head, args.steps, args.batch_size, args.seq_len,
                         args.lr, args.seed)
    heads, history = train_heads(model, train, config, init=init)
    heads.draft_vocab = draft_vocabulary(train, model.config.vocab_size, args.draft_coverage)
    accuracy = head_accuracy(heads, model, base_hidden(model, held_out), held_out)
    draft_vocab_size = heads.num_draft_tokens
    held_out_coverage = 1.0 if heads.draft_vocab is None else torch.isin(held_out, heads.draft_vocab).float().mean().item()
    save_medusa_heads(heads, args.out, base_model=args.model or "models/default")
    if args.data:
        data = args.data
    else:
        texts = {f"{args.prefix_tokens}-token sampled prefixes": args.samples - num_prompts,
                 f"prompts in {args.prompts}": len(prompts)}
        data = (f"self-distillation ({', '.join(f'{n} from {what}' for what, n in texts.items() if n)}; "
                f"continuation temperature {args.temperature})")
    report = {"config": asdict(config), "init_heads": args.init_heads, "data": data,
              "train_windows": len(train), "held_out_windows": num_held_out,
              "loss_first": history[0], "loss_last": history[-1], "held_out_accuracy": accuracy,
              "draft_vocab_size": draft_vocab_size, "draft_vocab_held_out_coverage": held_out_coverage,
              "wall_time_s": time.perf_counter() - start}
    (Path(args.out) / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"draft vocabulary: {draft_vocab_size} tokens, {held_out_coverage:.1%} of the held-out text")
    print(f"weighted loss {history[0]:.3f} -> {history[-1]:.3f}; held-out accuracy per head:")
    for k, acc in enumerate(accuracy):
        print(f"  head {k} (token +{k + 2}): top-1 {acc['top1']:.3f}  top-5 {acc['top5']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
