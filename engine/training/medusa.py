"""`gorgon train-medusa`: Medusa-1 heads on a frozen base model, and the tree that pays with them here.

Head k (from 0) learns to predict token i+2+k from the base model's final-normed hidden state at token i
(Hydra heads, the default: and from the tokens i+1 .. i+1+k before it, the right ones). It learns the base
model's whole distribution there (self-distillation: the KL divergence from the base model's softmax at
token i+1+k, over the draft vocabulary), not its greedy token alone: on SmolLM2's held-out answers head 0's
top-1 rose from 0.479 to 0.500; its loss is weighted 0.8^k. Without --data the training text is the base
model's own: prompts continued greedily by our engine (the decoding the heads will mostly serve). A chat
model (its tokenizer has a chat template) answers chat prompts: user turns it writes itself from its own
template (on any subject) and prompts built from the docstrings of the standard library, or --prompts; other
models continue prefixes sampled from themselves, or snippets of --prompts.

The run keeps to a time budget (--minutes): the model writes texts for at most 60% of it, so a larger model
writes fewer, and stops sooner once the time left could not train the heads on each position of its text 3 times
(a small model on a CPU that trains its heads slowly); the heads train for fewer steps where --steps would
not fit, and trees are timed while it lasts.

The base model never changes, so its hidden states and the tokens each head must predict are cached once,
and the heads train on random positions of the cache. Chat answers cost no second forward: the engine keeps
the hidden state that sampled each token as it writes them (SamplingParams.return_hidden_states); other
text gets one forward. The heads project onto the draft vocabulary (the commonest tokens of the text) only,
as they will when drafting.

Then the tree: from the heads' ranks of the right tokens on held-out text, the best tree of each size and the
tokens per step it would give; from timed engine runs, what a step with each tree costs on this machine
against a plain step, at batches 1, 2, 4 and 8. At each batch size the tree with the most tokens per second goes
beside the heads (tree.json: a big tree for a sequence decoding alone, where its extra rows cost least, a smaller
one for batches), up to the most sequences a tree pays at, and the engine uses them, decoding plainly above that;
when none beats plain decoding, tree.json says so and the engine decodes plainly. What a tree step costs
against a plain one differs between CPUs, thread counts and weights (a Q4_1 file or a BF16 one): `--retime` times
the same candidates again (those the budget left untimed too) on the machine that will serve, with the weights it
will serve (no training), and the engine prefers that choice there (tree.machine_tree_file)."""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from engine import LLM, SamplingParams
from engine.medusa.tree import (
    TREE_FILE,
    BatchTree,
    TreeChoice,
    accepted_path_counts,
    best_tree,
    expected_tokens_per_step,
    machine_tree_file,
)
from engine.prompt_files import (
    chat_answer_ids,
    chat_of,
    chat_prompt_ids,
    is_record_file,
    read_prompt_records,
    read_records,
)
from engine.training.common import HEAD_OFFSET, cosine, head_weights, matmuls_in_bf16, positive_int
from engine.training.default_model import corpus_files, read_source
from models.gguf import find_gguf, gguf_tensors
from models.kernels.decode import MAX_ROWS, bf16_gemm, compiled
from models.loader import default_dtype, model_config
from models.medusa import HEAD_KINDS, MedusaConfig, MedusaHeads, load_medusa_heads, save_medusa_heads
from models.named import resolve_model
from models.quant import QuantizedLinear, dequantize_rows

MAX_RANK = 8  # ranks of the right token tracked per head on held-out text: trees take at most each head's top 8
TREE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)  # candidate trees: the best of each size (paths)
TIMING_BATCHES = (1, 2, 4, 8)  # batch sizes each tree is timed at: the largest where it pays caps speculation
# the measured speedup a tree must reach at a batch size to pay there: timed steps vary by a few percent, and at
# larger batches a real run also verifies prompt-lookup chains (longer than the tree), which the timing leaves out
PAYS = 1.05
# Of the --minutes budget, the share the model may spend writing its training text: training the heads and timing
# the trees take the rest (2 cores: SmolLM2-135M wrote all its texts in 10.5 minutes and trained in 2.2; a 1.5B
# model wrote 256 in 10, trained in 4.5 and timed 8 trees in 8.4)
WRITING_SHARE = 0.6
TRAINING_END = 0.8  # ... and the heads' training ends by this share of it, leaving the rest to time the trees
# a tree is timed only if it would end within the budget, were it to take this much longer than the one before
# (it has more rows: Qwen2.5-Coder-1.5B's run ended 12 s past its 30 minutes when the next was taken to cost the same)
NEXT_TREE_MARGIN = 1.3
PACE_STEPS = 10  # training steps timed (after as many to warm up) to fit the rest of them to the budget, ...
# ... refitted every PACE_STEPS steps at the pace of the last PACE_WINDOW: a shared machine slows down mid-run
# (SmolLM2's heads, AVX2: 6.3 steps/s for 800 steps, then 3.3; fitted once, the training ended 8 minutes late)
PACE_WINDOW = 100
EVAL_EVERY = 100  # training steps between measurements of the held-out loss
PATIENCE = 3  # measurements without a better held-out loss that end the training
EVAL_POSITIONS = 4096  # held-out positions it is measured on
WRITE_CHUNK = 256  # texts written between looks at the clock
# ... and it stops sooner, once the training the budget leaves could not take each position of the text written so far
# this many times: more text would only take that time (SmolLM2 on 2 AVX2 cores, 60% of 30 minutes writing: 2331
# texts, but 1.2 passes over them; a 1.5B model's training stopped learning after 4 passes, SmolLM2's still learnt
# after 2)
PASSES = 3
# sequences the model writes at once, where steps of more than the decode kernels' usual rows do not dequantize tiles
# of a GGUF file's weights every step: its weights dequantized (writer_dequantizes; SmolLM2-135M Q4_1 in bf16, AMX, 2
# cores: 622 tokens/s at 32 sequences quantized, 1076 at 64 dequantized, 1080 at 128), or its packed kernels taking
# every size (writer_packed; in fp32, AVX2, 2 cores: 283-324 answer tokens/s at 32 / 128 sequences, 347 at 64)
WRITER_SEQS = 64


@dataclass
class TrainConfig:
    num_heads: int = 4
    num_layers: int = 1
    own_lm_head: bool = False  # v1 heads (own vocab projection) instead of v2 (the base lm_head)
    head_kind: str = "hydra"  # models.medusa.HEAD_KINDS: Hydra heads also read the drafted tokens before theirs
    steps: int = 4000  # SmolLM2-135M, 2048 answers: head 0's held-out top-1 0.500 after 2000, 0.514 after 4000
    batch_size: int = 256  # positions per step
    seq_len: int = 128  # tokens per text: the continuation's length (sampled-prefix and --data texts: in all)
    lr: float = 3e-3  # Adam's, for heads over hidden states up to LR_WIDTH wide (default_lr)
    seed: int = 0


# the widest hidden state TrainConfig.lr was tuned at (SmolLM2-135M's)
LR_WIDTH = 576


def default_lr(hidden_size: int) -> float:
    """--lr's default: TrainConfig.lr up to LR_WIDTH, smaller in proportion for wider hidden states (muP's rule for
    Adam: a step moves each output of a layer by about lr times its fan-in). At 3e-3, heads over Qwen2.5-Coder-1.5B
    (1536 wide) diverged at once: the loss rose from 36 to 5294 in 9 steps and took ~50 to come back. 400 steps on
    230 of its answers, held-out top-1 of head 0 / 1: 0.321 / 0.129 at 3e-3, 0.381 / 0.210 at 1e-3, 0.346 / 0.173
    at 3e-4; a 50- or 100-step warm-up to 3e-3 diverged later (0.259, 0.267), gradients clipped at norm 1 did not
    (0.337 / 0.206)."""
    return TrainConfig.lr * min(1.0, LR_WIDTH / hidden_size)


@dataclass
class HiddenCache:
    """The frozen base model's final-normed hidden states at the positions the heads learn from, the token
    after each (the base model's own next token there: a tree's root) and the token head k must predict at
    each (-1: past the end of the text)."""

    hidden: torch.Tensor  # [P, hidden_size], bf16 (the heads draft in bf16)
    roots: torch.Tensor  # [P] int64
    targets: torch.Tensor  # [P, num_heads] int64
    # [P, num_heads] int64: the row whose hidden state gives the base model's distribution of head k's target
    # (the same text's row k + 1 further on), -1 where the text has no such row
    teachers: torch.Tensor

    def head_inputs(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """The token before each head's target at these rows, [len(rows), num_heads]: what Hydra heads read."""
        return torch.cat([self.roots[rows, None], self.targets[rows, :-1]], dim=1)

    def __len__(self) -> int:
        return len(self.hidden)

    @classmethod
    def cat(cls, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> HiddenCache:
        """One cache of the (hidden, roots, targets, teachers) rows of several texts (cache_rows; teachers
        counted from each text's first row)."""
        offsets = [0, *accumulate(len(part[0]) for part in parts)]
        teachers = [torch.where(part[3] >= 0, part[3] + offset, -1) for part, offset in zip(parts, offsets)]
        return cls(*(torch.cat(column) for column in zip(*(part[:3] for part in parts))), torch.cat(teachers))


@torch.inference_mode()
def build_cache(model: nn.Module, texts: torch.Tensor | list[list[int]], num_heads: int,
                starts: list[int] | None = None, batch_tokens: int = 8192, progress: bool = False) -> HiddenCache:
    """One forward of the base model over every text; keeps positions i >= starts[t] - 1 (default 0) that have
    a token i + 2 to predict. The targets are the text's own tokens: in the engine's greedy continuations
    they are the base model's own next tokens."""
    texts = texts.tolist() if isinstance(texts, torch.Tensor) else texts
    starts = starts or [0] * len(texts)
    order = sorted(range(len(texts)), key=lambda t: len(texts[t]))  # similar lengths share a padded batch
    parts = []
    with tqdm(total=sum(map(len, texts)), desc="caching hidden states", unit="tok", disable=not progress) as bar:
        while order:
            size = 1
            while size < len(order) and (size + 1) * len(texts[order[size]]) <= batch_tokens:
                size += 1
            batch, order = order[:size], order[size:]
            width = len(texts[batch[-1]])
            ids = torch.tensor([texts[t] + [0] * (width - len(texts[t])) for t in batch])  # causal: pads come last
            out = model(ids, torch.arange(width).expand_as(ids))  # [B, width, hidden]
            for row, t in enumerate(batch):
                first = max(starts[t] - 1, 0)
                parts.append(cache_rows(texts[t], first, out[row, first:], num_heads))
                bar.update(len(texts[t]))
    return HiddenCache.cat(parts)


def captured_cache(texts: list[list[int]], starts: list[int], hidden_states: list[torch.Tensor],
                   num_heads: int) -> HiddenCache:
    """The cache of answers the engine wrote with return_hidden_states: the hidden state that sampled each
    answer token is the one at the position before it, so no second forward is needed."""
    parts = [cache_rows(text, start - 1, hidden, num_heads)
             for text, start, hidden in zip(texts, starts, hidden_states)]
    return HiddenCache.cat(parts)


def cache_rows(text: list[int], first: int, hidden: torch.Tensor,
               num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, roots, targets, teachers) of the text's positions first .. len(text) - 3, whose hidden states
    are the first rows of `hidden` (row 0: position first)."""
    padded = torch.tensor(text + [-1] * (num_heads + 1))
    positions = torch.arange(first, len(text) - HEAD_OFFSET)
    targets = torch.stack([padded[positions + HEAD_OFFSET + k] for k in range(num_heads)], dim=1)
    rows = torch.arange(len(positions))[:, None] + 1 + torch.arange(num_heads)  # the position before each target
    teachers = torch.where(rows < len(positions), rows, -1)
    return hidden[:len(positions)].to(torch.bfloat16), padded[positions + 1], targets, teachers


def embed(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The base model's input embeddings of tokens (-1, past the end of a text: any row; nothing learns from it)."""
    return model.model.embed_tokens(tokens.clamp(min=0)).float()


def draft_logits(heads: MedusaHeads, model: nn.Module, hidden: torch.Tensor, draft_vocab: torch.Tensor | None,
                 inputs: torch.Tensor | None = None, projection: torch.Tensor | None = None) -> torch.Tensor:
    """The heads' logits over the draft vocabulary at hidden [B, hidden_size] -> [K, B, len(draft_vocab)].
    Hydra heads also read inputs [B, K], the token before each one's target (HiddenCache.head_inputs).
    projection: draft_projection(model, draft_vocab), where the caller has it already."""
    embeddings = embed(model, inputs.T) if heads.config.sequential else None  # [K, B, hidden_size]
    if heads.config.own_lm_head:
        logits = heads(hidden, None, embeddings=embeddings)
        return logits if draft_vocab is None else logits[..., draft_vocab]
    weight = draft_projection(model, draft_vocab) if projection is None else projection
    return heads(hidden, lambda states: F.linear(states, weight), embeddings=embeddings)


def draft_projection(model: nn.Module, draft_vocab: torch.Tensor | None) -> torch.Tensor:
    """The base lm_head's rows of the draft vocabulary (all: None), as a float matrix."""
    lm_head = model.lm_head
    weight = lm_head.weight if draft_vocab is None else lm_head.weight[draft_vocab]
    if isinstance(lm_head, QuantizedLinear):  # (a GGUF model's): its rows in ggml blocks
        return dequantize_rows(weight, lm_head.qtype, lm_head.in_features)
    return weight.float()  # (bf16 where matmuls_in_bf16 casts it: fp32 elsewhere, as the heads' master weights)


def to_draft_ids(targets: torch.Tensor, vocab_size: int, draft_vocab: torch.Tensor | None) -> torch.Tensor:
    """Token ids -> indices into the draft vocabulary; -1 (ignored) for tokens outside it and for -1."""
    if draft_vocab is None:
        return targets
    index = torch.full((vocab_size + 1,), -1)
    index[draft_vocab] = torch.arange(len(draft_vocab))
    return index[targets]  # -1 indexes the last entry, which is -1


def train_heads(model: nn.Module, cache: HiddenCache, config: TrainConfig, draft_vocab: torch.Tensor | None = None,
                progress: bool = True, init: MedusaHeads | None = None, deadline: float = math.inf,
                held_out: HiddenCache | None = None,
                on_step: Callable[[int], None] | None = None) -> tuple[MedusaHeads, list[float]]:
    """Train heads on the cache over the frozen `model`, fresh ones or starting from `init`, projecting onto
    the draft vocabulary; returns the heads (draft_vocab set) and the weighted training loss of every step.
    Where config.steps would end past `deadline` (perf_counter), the pace of the last PACE_WINDOW steps sets
    fewer (every PACE_STEPS steps, after as many), and the learning-rate schedule ends with them. With a
    `held_out` cache, its loss is measured every EVAL_EVERY steps: training stops once it has not improved for
    PATIENCE of them (a small text learnt by heart), and the heads of its best step are returned. on_step(n) is
    called after each step n (from 1)."""
    torch.manual_seed(config.seed)
    model.requires_grad_(False)
    mc = model.config
    heads = init if init is not None else MedusaHeads(MedusaConfig(
        config.num_heads, config.num_layers, mc.hidden_size, mc.vocab_size, config.own_lm_head,
        sequential=config.head_kind == "hydra"))
    heads = heads.float().train().requires_grad_(True)  # fp32 master weights (the matmuls: matmuls_in_bf16)
    targets = to_draft_ids(cache.targets, mc.vocab_size, draft_vocab)
    weights = head_weights(config.num_heads)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=0.0)
    steps = config.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine(s / steps))
    generator = torch.Generator().manual_seed(config.seed)
    if held_out is not None:
        eval_rows = torch.randperm(len(held_out), generator=generator)[:EVAL_POSITIONS]
        eval_targets = to_draft_ids(held_out.targets, mc.vocab_size, draft_vocab)
        best = (math.inf, 0, None)  # held-out loss, step, the heads' weights then
    history, marks = [], deque(maxlen=PACE_WINDOW // PACE_STEPS + 1)  # the times of every PACE_STEPS-th step
    with tqdm(total=steps, desc="training medusa heads", disable=not progress) as bar:
        while len(history) < steps:
            pick = torch.randint(len(cache), (config.batch_size,), generator=generator)
            loss = weighted_loss(heads, model, cache, pick, targets, draft_vocab, weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            history.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if on_step is not None:
                on_step(len(history))
            if deadline < math.inf and len(history) % PACE_STEPS == 0:
                marks.append(time.perf_counter())
                if len(marks) > 1:
                    pace = (marks[-1] - marks[0]) / (PACE_STEPS * (len(marks) - 1))
                    steps = min(config.steps, len(history) + max(0, int((deadline - marks[-1]) / pace)))
                    bar.total = steps
            if held_out is not None and len(history) % EVAL_EVERY == 0:
                with torch.no_grad():
                    held_out_loss = weighted_loss(heads, model, held_out, eval_rows, eval_targets, draft_vocab,
                                                  weights).item()
                if held_out_loss < best[0]:
                    best = (held_out_loss, len(history), {k: v.clone() for k, v in heads.state_dict().items()})
                elif len(history) - best[1] >= PATIENCE * EVAL_EVERY:
                    print(f"held-out loss best at step {best[1]} ({best[0]:.3f}): training stops at step "
                          f"{len(history)} and keeps those heads", flush=True)
                    break
    if held_out is not None and best[2] is not None and best[1] < len(history):
        heads.load_state_dict(best[2])
    heads.draft_vocab = draft_vocab
    return heads.eval().requires_grad_(False), history


def weighted_loss(heads: MedusaHeads, model: nn.Module, cache: HiddenCache, rows: torch.Tensor,
                  targets: torch.Tensor, draft_vocab: torch.Tensor | None, weights: torch.Tensor) -> torch.Tensor:
    """The heads' loss at these rows of the cache, head k's weighted by weights[k]: the KL divergence from the
    base model's distribution over the draft vocabulary where the cache holds it (cache.teachers), else the
    cross-entropy of its token (targets: as draft ids; -1, past the end of a text or outside the draft
    vocabulary, does not count)."""
    teachers = cache.teachers[rows]  # [B, K]
    projection = draft_projection(model, draft_vocab)  # (dequantized once a step for both uses)
    with matmuls_in_bf16():
        logits = draft_logits(heads, model, cache.hidden[rows].float(), draft_vocab, cache.head_inputs(rows),
                              projection)
        with torch.no_grad():
            teacher_logits = F.linear(cache.hidden[teachers.clamp(min=0)].float(), projection)
    losses = []
    for k in range(len(weights)):
        log_p = logits[k].float().log_softmax(dim=-1)
        log_teacher = teacher_logits[:, k].float().log_softmax(dim=-1)
        soft = (log_teacher.exp() * (log_teacher - log_p)).sum(dim=-1)  # KL(base || head): 0 where they agree
        hard = -log_p.gather(1, targets[rows, k].clamp(min=0)[:, None])[:, 0]
        distilled = teachers[:, k] >= 0
        counted = distilled | (targets[rows, k] >= 0)
        losses.append(torch.where(distilled, soft, hard)[counted].sum() / counted.sum().clamp(min=1))
    return (torch.stack(losses) * weights).sum()


@torch.inference_mode()
def held_out_ranks(heads: MedusaHeads, model: nn.Module, cache: HiddenCache, batch_size: int = 1024) -> torch.Tensor:
    """At each held-out position whose every head has a target: the rank of head k's target among its top
    MAX_RANK draft tokens, MAX_RANK when it is not there -> [P, K]. Hydra heads read the right tokens before
    theirs: a tree node is only reached when they were drafted, so these ranks count accepted paths as well."""
    complete = (cache.targets >= 0).all(dim=1)
    hidden, targets, inputs = cache.hidden[complete], cache.targets[complete], cache.head_inputs(complete)
    ranks, weights = [], heads.draft_weights(model.lm_head)
    k = min(MAX_RANK, heads.num_draft_tokens)
    for h, t, x in zip(hidden.split(batch_size), targets.split(batch_size), inputs.split(batch_size)):
        if heads.config.sequential:  # as drafting runs them, level by level, along the right path
            state, top = h.float(), []
            for head in range(heads.config.num_heads):
                state, level, _ = heads.draft_level(state, embed(model, x[:, head]), head, weights, k)
                top.append(level)
            top = torch.stack(top)
        else:
            top = heads.top_k(h.float(), weights, heads.config.num_heads, k)
        hit = top.to(t.device) == t.T[:, :, None]  # [K, B, MAX_RANK]
        ranks.append(torch.where(hit.any(-1), hit.int().argmax(-1), MAX_RANK).T)
    return torch.cat(ranks)


def accuracy_of(ranks: torch.Tensor) -> list[dict[str, float]]:
    """Per head: the share of positions whose right token is its top-1 / among its top-5."""
    return [{"top1": (r == 0).float().mean().item(), "top5": (r < 5).float().mean().item()} for r in ranks.T]


def draft_vocabulary(tokens: torch.Tensor, vocab_size: int, coverage: float) -> torch.Tensor | None:
    """The commonest of these tokens, commonest first, that make up `coverage` of them: the heads' draft
    vocabulary (MedusaHeads.draft_vocab). None when that is the whole vocabulary."""
    if coverage >= 1:
        return None
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size)
    order = counts.argsort(descending=True, stable=True)
    covered = counts[order].cumsum(0)
    size = int(torch.searchsorted(covered, coverage * covered[-1].item())) + 1
    return order[:size] if size < vocab_size else None


# ---- training text ---------------------------------------------------------------------------------------
def read_training_data(path: Path, tokenizer, seq_len: int,
                       separator: int | None) -> tuple[list[list[int]], list[int]]:
    """--data: (texts, where the heads start learning in each). A plain-text file is one document. A .jsonl or
    .json file holds records (engine.prompt_files): a chat ("messages", ShareGPT's "conversations", or "prompt" and
    "completion" for a model with a chat template) is written in the model's template and learned from its first
    answer on, for seq_len tokens; a document ("text", a string, or "prompt" + "completion") joins the others,
    `separator` (EOS) between them, to be cut into windows of seq_len tokens."""
    records = read_records(path) if is_record_file(path) else [path.read_text()]
    chats, docs, unanswered = [], [], 0
    for n, record in enumerate(records, 1):
        messages = chat_of(record)
        if messages is None and tokenizer.chat_template and isinstance(record, dict) and "completion" in record:
            messages = [{"role": "user", "content": record.get("prompt", "")},
                        {"role": "assistant", "content": record["completion"]}]
        if messages is not None:
            if not tokenizer.chat_template:
                raise ValueError(f"{path}: record {n} is a chat, and the model has no chat template to write it in")
            chat = chat_answer_ids(tokenizer, messages)
            unanswered += chat is None
            chats += [chat] if chat is not None else []
            continue
        text = record if isinstance(record, str) else None
        if isinstance(record, dict):
            text = record.get("text", record.get("prompt", "") + record.get("completion", ""))
        if not isinstance(text, str) or not text:
            raise ValueError(f"{path}: record {n} holds no text: expected a string, or an object with 'text', "
                             "'messages', 'conversations', or 'prompt' and 'completion'")
        docs.append(tokenizer(text)["input_ids"])
    if unanswered:
        tqdm.write(f"{path}: left out {unanswered} chats with no answer after a question")
    windows = windows_of(docs, seq_len, separator)
    texts = [ids[:start + seq_len] for ids, start in chats] + windows
    if not texts:
        raise ValueError(f"{path}: no text to train on: no chat with an answer, and documents of "
                         f"{sum(map(len, docs))} tokens, fewer than one window of --seq-len {seq_len}")
    return texts, [start for _, start in chats] + [0] * len(windows)


def windows_of(docs: list[list[int]], seq_len: int, separator: int | None) -> list[list[int]]:
    """The documents, joined with `separator` between them, cut into windows of seq_len tokens (the remainder is
    dropped)."""
    between = [] if separator is None else [separator]
    tokens = docs[0] + [t for doc in docs[1:] for t in between + doc] if docs else []
    return [tokens[i:i + seq_len] for i in range(0, len(tokens) - seq_len + 1, seq_len)]


def prompts_from(path: Path, num_prompts: int, seed: int) -> list[str | list[dict]]:
    """Self-distillation prompts from a file: the first num_prompts records of a .jsonl or .json file
    (engine.prompt_files); any other file is cut into num_prompts snippets of 1 to 6 whole lines at random places
    (say, a concatenation of the code the model will be asked to continue)."""
    prompts: list[str | list[dict]] = []
    if is_record_file(path):
        prompts = read_prompt_records(path)[:num_prompts]
    elif (text := path.read_text()).strip():
        lines = text.splitlines(keepends=True)
        rng = random.Random(seed)
        while len(prompts) < num_prompts:
            start = rng.randrange(len(lines))
            snippet = "".join(lines[start:start + rng.randint(1, 6)])
            if snippet.strip():
                prompts.append(snippet)
    if not prompts:
        raise ValueError(f"{path}: expected non-empty prompts")
    return prompts


CHAT_TEMPLATES = (
    "What does `{name}` do in Python?",
    "Explain this in simple words: {doc}",
    "Summarize in one sentence: {doc}",
    "Write a short Python example that uses `{name}`.",
    'I read this in the Python documentation: "{doc}" What does it mean?',
    "When would I use `{name}`? Answer briefly.",
    "Give a title to a text about this: {doc}",
    "Turn this into a question, then answer it: {doc}",
    "Explain `{name}` to a beginner, with an everyday analogy.",
    "What could go wrong when using `{name}`?",
)


def docstrings(path: Path) -> list[tuple[str, str]]:
    """(module.name, the first paragraph of its docstring) of the public functions and classes in one source
    file, for paragraphs of 40 to 400 characters."""
    try:
        tree = ast.parse(read_source(path))
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        is_definition = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if is_definition and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            paragraph = " ".join(doc.split("\n\n")[0].split()) if doc else ""
            if 40 <= len(paragraph) <= 400:
                found.append((f"{path.stem}.{node.name}", paragraph))
    return found


def chat_prompts(num_prompts: int, seed: int, files: list[Path] | None = None) -> list[list[dict]]:
    """Chat prompts (one user message each) built from the standard library's docstrings: questions about a
    function, explanations and summaries of its description. Default files: the training split of the
    corpus (corpus_files); its validation modules make held-out prompts."""
    rng = random.Random(seed)
    files = list(files if files is not None else corpus_files()[0])
    rng.shuffle(files)
    found = []
    # files in random order, until four docstrings a prompt: parsing the whole library took 7-11 s
    for path in files:
        if len(found) >= 4 * num_prompts:
            break
        found += docstrings(path)
    picks = rng.sample(found, min(num_prompts, len(found)))
    return [[{"role": "user", "content": rng.choice(CHAT_TEMPLATES).format(name=name, doc=doc)}]
            for name, doc in picks]


def self_written_prompts(llm: LLM, num_prompts: int, seed: int, max_tokens: int = 64) -> list[list[dict]]:
    """User turns the chat model writes itself (Magpie, Xu et al., 2024): its template up to where a user's
    message begins, sampled at temperature 1 (top-p 0.95) up to its end of turn. An instruct model then
    writes the kind of request it was tuned on, on any subject. Turns cut off at max_tokens, blank ones and
    repeats are dropped; fewer than num_prompts come back when three rounds do not find enough."""
    marker = "\x00"  # no chat template writes it: where the user's text would go
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    if marker not in chat:
        raise ValueError("the chat template does not write a user's message as given, so the model cannot write "
                         "its own prompts: pass --prompts, or --self-prompts 0")
    before_user_text = llm.tokenizer.encode(chat[:chat.index(marker)], add_special_tokens=False)
    found: dict[str, None] = {}  # insertion-ordered set
    for round_ in range(3):
        ask = max(8, round((num_prompts - len(found)) * 1.3))  # about a sixth run past max_tokens
        params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=0.95, seed=seed + 100_003 * round_ + i)
                  for i in range(ask)]
        for out in llm.generate([before_user_text] * ask, params, use_tqdm=False):
            text = out.text.strip()
            if out.finish_reason == "stop" and text and len(found) < num_prompts:
                found[text] = None
        if len(found) == num_prompts:
            break
    return [[{"role": "user", "content": text}] for text in found]


def chat_distill(llm: LLM, prompts: list[list[dict]], max_tokens: int, temperature: float,
                 seed: int) -> tuple[list[list[int]], list[int], list[torch.Tensor]]:
    """The model's answers to chat prompts (its own template), up to its end of turn or max_tokens:
    (prompt + answer token ids of each, where each answer starts, the hidden states that sampled its tokens).
    A prompt that leaves no room for max_tokens in the writer's context is left out (counted)."""
    starts = [chat_prompt_ids(llm.tokenizer, messages) for messages in prompts]
    fitting = [p for p in starts if len(p) + max_tokens <= llm.max_model_len]
    if len(fitting) < len(starts):
        tqdm.write(f"left out {len(starts) - len(fitting)} prompts too long for {max_tokens} answer tokens in a "
                   f"context of {llm.max_model_len}")
    starts = fitting
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i, return_hidden_states=True)
              for i in range(len(starts))]
    outputs = llm.generate(starts, params, use_tqdm=True)
    return ([p + out.token_ids for p, out in zip(starts, outputs)], [len(p) for p in starts],
            [out.hidden_states.to(torch.bfloat16) for out in outputs])  # the heads draft in bf16


def self_distill(model: LLM | Path | None, num_samples: int, seq_len: int, prefix_tokens: int,
                 temperature: float, seed: int, prompts: list[str] = ()) -> torch.Tensor:
    """Windows [num_samples + len(prompts), seq_len] of the base model's own text, continued at
    `temperature` with our engine: num_samples from prefixes of `prefix_tokens` tokens sampled at
    temperature 1 after BOS, then one from each prompt (cut to its last seq_len // 3 tokens). `model`: the
    engine, or the checkpoint to load one from."""
    llm = model if isinstance(model, LLM) else LLM(model, enable_prefix_caching=False)
    bos = llm.tokenizer.bos_token_id if llm.tokenizer.bos_token_id is not None else 0
    prefix = [SamplingParams(max_tokens=prefix_tokens, temperature=1.0, seed=seed + i, ignore_eos=True)
              for i in range(num_samples)]
    starts = ([[bos] + out.token_ids for out in llm.generate([[bos]] * num_samples, prefix, use_tqdm=False)]
              if num_samples else [])
    starts += [[bos] + llm.tokenizer.encode(p, add_special_tokens=False)[-(seq_len // 3):] for p in prompts]
    rest = [SamplingParams(max_tokens=seq_len - len(p), temperature=temperature, seed=seed + i, ignore_eos=True)
            for i, p in enumerate(starts)]
    outputs = llm.generate(starts, rest, use_tqdm=False)
    return torch.tensor([p + out.token_ids for p, out in zip(starts, outputs)])


# ---- the tree ------------------------------------------------------------------------------------------------
def timed_run(llm: LLM, prompts: list[list[int]], new_tokens: int, use_medusa: bool) -> tuple[float, int]:
    """(seconds, steps) of decoding new_tokens greedily for the prompts together, from the first token (the
    prefill's) to the end."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, use_medusa=use_medusa)
    outputs = llm.generate(prompts, params)
    seconds = max(o.latency_s - o.ttft_s for o in outputs)
    steps = max(len(o.accepted_lengths) for o in outputs) if use_medusa else new_tokens - 1
    return seconds, steps


def candidate_trees(ranks: torch.Tensor) -> list[tuple[list[list[int]], float]]:
    """(paths, held-out tokens per step) of the best tree of each of TREE_SIZES for these ranks."""
    counts = accepted_path_counts(ranks, MAX_RANK)
    candidates = {}
    for size in TREE_SIZES:
        paths = best_tree(counts, size)
        candidates.setdefault(len(paths), paths)  # fewer paths than asked: all that were ever right
    candidates.pop(0, None)
    return [(paths, expected_tokens_per_step(paths, counts, len(ranks))) for paths in candidates.values()]


def trees_by_batch_size(rows: list[dict]) -> list[tuple[dict, int]]:
    """(row, the largest batch size it serves) of the timed candidates (rows) that give the most tokens per second at
    each of TIMING_BATCHES, in order; a candidate serves a batch size only if it paid there and at every smaller one
    (its max_batch_size). Empty if none paid at batch 1."""
    chosen: list[tuple[dict, int]] = []
    for b in TIMING_BATCHES:
        paying = [r for r in rows if r["max_batch_size"] >= b]
        if not paying:
            break
        best = max(paying, key=lambda r: r[f"speedup_bs{b}"])
        if chosen and chosen[-1][0] is best:
            chosen.pop()
        chosen.append((best, b))
    return chosen


def choose_tree(model_path: Path, heads_dir: Path, candidates: list[tuple[list[list[int]], float]],
                held_out_positions: int, prompts: list[list[int]], new_tokens: int, repeats: int,
                deadline: float = math.inf) -> TreeChoice:
    """At each of TIMING_BATCHES, the candidate tree with the most tokens per second, from its held-out tokens per
    step and its step time against a plain step of the same engine there, the two timed in turn (best of `repeats`
    each: load from other processes hits both alike). A tree may serve a batch size only if it paid (measured at
    least PAYS times plain decoding) there and at every smaller one (its row's max_batch_size); the engine decodes
    plainly above the largest batch size any tree paid at. No trees if none pays at batch 1. A candidate is timed
    only if it would end by `deadline` (perf_counter), judging by how long the one before it took, with
    NEXT_TREE_MARGIN for its larger rows (the first is always timed; the smaller trees come first)."""
    if not candidates:
        return TreeChoice([], "no Medusa tree pays: no draft was right on the held-out text", {})
    trees, weights, last_took = [], None, 0.0
    context = min(max(map(len, prompts)) + new_tokens + 64, model_config(model_path).max_model_len)
    with tempfile.TemporaryDirectory() as tmp, tqdm(candidates, desc="timing trees") as bar:
        for n, (paths, tokens_per_step) in enumerate(bar):
            began = time.perf_counter()
            if trees and began + NEXT_TREE_MARGIN * last_took > deadline:
                break
            tree_file = Path(tmp) / f"tree{n}.json"
            tree_file.write_text(json.dumps(paths))
            llm = LLM(model_path, medusa=str(heads_dir), medusa_tree=str(tree_file), enable_prefix_caching=False,
                      medusa_ngram_tokens=0,  # the heads' tree alone: what its held-out tokens per step count
                      medusa_guard=False,  # at every step: random prompts would pause them, and steps count tree steps
                      max_num_seqs=max(TIMING_BATCHES), max_model_len=context)
            weights = llm.config.weights
            row = {"tree": paths, "tree_size": 1 + len(paths), "tokens_per_step": tokens_per_step,
                   "max_batch_size": 0}
            for b in TIMING_BATCHES:
                if b * row["tree_size"] > MAX_ROWS:  # such steps leave the decode kernels: far slower, never timed
                    break
                batch = prompts[:b]
                llm.generate(batch, SamplingParams(max_tokens=4, temperature=0))  # warm-up
                runs = {"plain": [], "tree": []}
                for _ in range(repeats):
                    for mode in runs:
                        seconds, steps = timed_run(llm, batch, new_tokens, use_medusa=mode == "tree")
                        runs[mode].append(1000 * seconds / steps)
                row[f"plain_step_ms_bs{b}"], row[f"step_ms_bs{b}"] = min(runs["plain"]), min(runs["tree"])
                row[f"speedup_bs{b}"] = row["tokens_per_step"] * min(runs["plain"]) / min(runs["tree"])
                if row[f"speedup_bs{b}"] < PAYS:
                    break
                row["max_batch_size"] = b
            trees.append(row)
            last_took = time.perf_counter() - began
    # the candidates the budget left untimed are kept, so that --retime (no budget) times them too
    untimed = [{"tree": paths, "tokens_per_step": per_step} for paths, per_step in candidates[len(trees):]]
    measurements = {"held_out_positions": held_out_positions, "threads": torch.get_num_threads(),
                    "weights": weights, "candidates": trees, "untimed_for_the_budget": untimed}
    return choice_from(measurements)


def choice_from(measurements: dict) -> TreeChoice:
    """The trees by batch size (trees_by_batch_size) of measurements["candidates"], the timed candidates' rows."""
    rows = measurements["candidates"]
    chosen = trees_by_batch_size(rows)
    if not chosen:
        best = max(rows, key=lambda r: r["speedup_bs1"])
        return TreeChoice([], f"no Medusa tree pays on this machine (the best, {best['tree_size']} nodes, would run "
                              f"at {best['speedup_bs1']:.2f}x plain decoding at batch 1)", measurements)
    first, _ = chosen[0]
    served = [f"{row['tree_size']} nodes up to {b} ({row[f'speedup_bs{b}']:.2f}x at {b})" for row, b in chosen]
    return TreeChoice([BatchTree(row["tree"], b) for row, b in chosen],
                      f"{first['tokens_per_step']:.2f} tokens per step on held-out text at batch 1, expected "
                      f"{first['speedup_bs1']:.2f}x plain decoding there; trees by batch size: {', '.join(served)}; "
                      f"plain decoding above {chosen[-1][1]} sequences", measurements)


def retime(model_path: Path, heads_dir: Path, new_tokens: int, repeats: int, seed: int) -> tuple[TreeChoice, Path]:
    """Time again, on this machine and thread count, the candidate trees kept with the heads (those the training's
    budget left untimed too; their held-out tokens per step stay), with these weights, and keep the choice where the
    engine looks first (machine_tree_file). Step times hardly depend on the prompts' words, so they are random
    tokens."""
    stored = TreeChoice.read(heads_dir / TREE_FILE)
    if stored is None or not stored.measurements.get("candidates"):
        raise SystemExit(f"gorgon train-medusa: error: {heads_dir} holds no measured trees to time again "
                         f"(no {TREE_FILE} with candidates: train the heads here without --no-tree)")
    untimed = stored.measurements.get("untimed_for_the_budget", [])
    if not isinstance(untimed, list):  # heads timed before the untimed trees were kept: their number alone
        untimed = []
    candidates = [(row["tree"], row["tokens_per_step"]) for row in stored.measurements["candidates"] + untimed]
    config = json.loads((heads_dir / "config.json").read_text())
    if "vocab_size" not in config:
        raise ValueError(f"{heads_dir / 'config.json'} has no vocab_size (heads not trained by train-medusa?)")
    vocab_size = config["vocab_size"]
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(vocab_size, (max(TIMING_BATCHES), 32), generator=generator).tolist()
    choice = choose_tree(model_path, heads_dir, candidates, stored.measurements["held_out_positions"], prompts,
                         new_tokens, repeats)
    path = machine_tree_file(heads_dir, choice.measurements["weights"])
    choice.save(path)
    return choice, path


# ---- the command -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon train-medusa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="base model: a name (smollm2), an HF checkpoint folder or a .gguf "
                             "(default: the shipped model)")
    parser.add_argument("--out", required=True, help="folder for the heads (published Medusa format)")
    parser.add_argument("--data", default=None,
                        help="training text instead of self-distillation: a text file, or a .jsonl / .json file of "
                             "records: chats ('messages', ShareGPT 'conversations', or 'prompt' and 'completion'), "
                             "learned from their first answer on in the model's chat template, or documents "
                             "('text')")
    parser.add_argument("--init-heads", default=None,
                        help="heads folder to start from, e.g. heads trained jointly with the model (sets --heads, "
                             "--layers, --own-lm-head and --head-kind)")
    parser.add_argument("--head-kind", default=TrainConfig.head_kind, choices=HEAD_KINDS,
                        help="hydra: each head also reads the drafted tokens before its own (on SmolLM2: head 0 "
                             "held-out top-1 0.51 against medusa's 0.40); medusa: the last hidden state alone")
    parser.add_argument("--heads", type=positive_int, default=TrainConfig.num_heads)
    parser.add_argument("--layers", type=positive_int, default=TrainConfig.num_layers, help="residual blocks per head")
    parser.add_argument("--own-lm-head", action="store_true", help="v1 heads: each its own vocab projection")
    parser.add_argument("--steps", type=positive_int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=positive_int, default=TrainConfig.batch_size, help="positions per step")
    parser.add_argument("--seq-len", type=positive_int, default=TrainConfig.seq_len,
                        help="tokens per text: a chat answer's most, else the whole text's")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"Adam's learning rate (default: {TrainConfig.lr:g}, scaled by {LR_WIDTH} / the model's "
                             f"hidden size where that is wider)")
    parser.add_argument("--prompts", default=None,
                        help="self-distillation prompts: a .jsonl or .json file of records (a string, or 'prompt', "
                             "'text', a chat's 'messages' or ShareGPT's 'conversations') or a text file to cut "
                             "snippets of whole lines from (default: for chat "
                             "models, prompts the model writes itself and prompts built from the standard library's "
                             "docstrings (--self-prompts); else prefixes sampled from the model)")
    parser.add_argument("--self-prompts", type=float, default=0.5,
                        help="chat models without --prompts: the share of the chat prompts the model writes itself "
                             "(user turns sampled from its own template, on any subject); the rest are built from "
                             "the standard library's docstrings")
    parser.add_argument("--prompt-share", type=float, default=1.0,
                        help="with --prompts, for models without a chat template: the share of the texts that "
                             "continue them; the rest continue sampled prefixes")
    parser.add_argument("--samples", type=positive_int, default=8192,
                        help="self-distillation: texts to generate (at most: see --minutes)")
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="the run's time budget: the model writes texts for at most 60%% of it, and trees are "
                             "timed while the next one fits in it (at least one); 0: no budget")
    parser.add_argument("--prefix-tokens", type=int, default=8, help="self-distillation: sampled prefix length")
    parser.add_argument("--temperature", type=float, default=0.0, help="self-distillation: continuation temperature")
    parser.add_argument("--draft-coverage", type=float, default=0.95,
                        help="the heads propose only the commonest tokens that make up this share of the training "
                             "text (drafting gets cheaper); 1: the whole vocabulary")
    parser.add_argument("--texts", default=None,
                        help="a JSON file for the training text's token ids: read it if it exists, else write it "
                             "(retrain without generating again)")
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of texts kept for evaluation")
    parser.add_argument("--no-tree", action="store_true", help="skip timing the trees (no tree.json)")
    parser.add_argument("--retime", action="store_true",
                        help="no training: time the trees measured with the heads in --out again, on this machine "
                             "at this thread count with --model's weights; the engine then prefers that choice here, "
                             "for those weights")
    parser.add_argument("--timing-tokens", type=positive_int, default=64, help="tree timing: tokens per timed run")
    parser.add_argument("--timing-repeats", type=positive_int, default=3,
                        help="tree timing: runs per tree; the best counts")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="the base model's dtype while it writes and encodes the training text (default: "
                             "float32 for a GGUF file whose every matrix has packed kernels, on CPUs without AMX: "
                             "the kernels write it; else bfloat16 on CPUs with bf16 units, AVX512-BF16 or AMX, where "
                             "it is about 3x faster; elsewhere the dtype gorgon serves the model in; the heads serve "
                             "it in any dtype)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    return parser.parse_args(argv)


def writer_dtype(model_path: Path) -> str:
    """--dtype's default: fp32 where a GGUF file's own packed kernels write the text (writer_packed); else bfloat16
    where the CPU multiplies bf16 natively; elsewhere the dtype gorgon serves the model in: a quantized file writes
    in fp32 there, dequantized (fp32 wrote SmolLM2 Q4_1 1.2x faster than bf16 on AVX2), and a bf16 checkpoint stays
    bf16 (no fp32 copy of a 7B model)."""
    if writer_packed(model_path, "float32"):
        return "float32"
    return "bfloat16" if bf16_gemm() else default_dtype(model_path, "cpu")


def writer_packed(model_path: Path, dtype: str) -> bool:
    """Does the model write its text in fp32 with a GGUF file's own quantized weights, through the packed decode
    kernels at WRITER_SEQS rows a step (batch invariant: they take every size)? Where every matrix of the file has
    packed kernels and the CPU has no AMX tiles: their integer dot products then beat torch's GEMM over the weights
    dequantized, in fp32 on AVX2 (SmolLM2-135M Q4_1, AVX2-only AMD EPYC, 2 threads, 64 answers at once: 3.4 texts/s
    against 1.2-1.5; heads scored the same on either's hidden states) and in bf16 on AVX512-BF16 (Zen 4, 2 threads:
    SmolLM2 Q4_1 723-885 answer tokens/s against 603-607, Qwen2.5-Coder-1.5B Q4_K_M 107-109 against 93-94 at a peak
    of 3.8 GB of memory against 9.4). With AMX tiles it keeps the bf16 GEMM measured there (SmolLM2 Q4_1 dequantized:
    1076 tokens/s at 64 sequences); the kernels' AMX-INT8 tiles were not compared as the writer."""
    gguf, ops = find_gguf(model_path), compiled()
    if (gguf is None or ops is None or ops.isa() == "scalar" or dtype != "float32"
            or torch.cpu._is_amx_tile_supported()):
        return False
    return all(ops.packable(int(t.tensor_type)) for t in gguf_tensors(gguf) if len(t.shape) > 1)


def writer_dequantizes(model_path: Path, dtype: str) -> bool:
    """Does the model write its text with a GGUF file's weights dequantized (EngineConfig.dequantize, WRITER_SEQS)?
    Where they then take at most a quarter of the machine's memory (a 7B model in bf16 would fill most of 24 GiB)."""
    gguf = find_gguf(model_path)
    if gguf is None:
        return False
    weights = sum(int(t.n_elements) for t in gguf_tensors(gguf)) * torch.finfo(getattr(torch, dtype)).bits // 8
    return weights <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


def chunk_size(first: int, total: int, elapsed: float, remaining: float, batch: int) -> int:
    """How many texts to write next, after `first` of `total` in `elapsed` seconds, with `remaining` seconds
    of the writing budget: first one batch of the engine's (`batch` sequences), to learn the pace; then
    WRITE_CHUNK, but no more than fit at that pace; 0 (stop) if not even one full batch fits."""
    if not first:
        return min(batch, WRITE_CHUNK, total)
    count = min(WRITE_CHUNK, total - first)
    fits = remaining / (elapsed / first)
    return 0 if fits < min(count, batch) else min(count, int(fits))


def train_config(args: argparse.Namespace, steps: int | None = None) -> TrainConfig:
    return TrainConfig(args.heads, args.layers, args.own_lm_head, args.head_kind, steps or args.steps, args.batch_size,
                       args.seq_len, args.lr, args.seed)


def training_pace(model: nn.Module, cache: HiddenCache, draft_vocab: torch.Tensor | None,
                  args: argparse.Namespace) -> float:
    """Seconds a step of training the heads takes here, on this cache and draft vocabulary (its size sets most of a
    step's cost): 5 steps timed after 2."""
    ends = []  # of steps 2 and 7
    train_heads(model, cache, train_config(args, 7), draft_vocab, progress=False,
                on_step=lambda step: ends.append(time.perf_counter()) if step in (2, 7) else None)
    return (ends[1] - ends[0]) / 5


def training_text(args: argparse.Namespace, llm: LLM, prompts: list,
                  training_end: float = math.inf) -> tuple[list[list[int]], list[int], list[torch.Tensor] | None, str]:
    """(texts, where the heads start learning in each, the hidden states the engine computed for them, if it
    wrote them as chat answers, what they are), from --data or self-distillation. The model writes its texts
    WRITE_CHUNK at a time, and no more than fit, at its pace so far, in WRITING_SHARE of the --minutes budget:
    a larger model writes fewer texts, in about the same time. It stops sooner where the training left before
    training_end (perf_counter), at its pace (timed on the first texts with the draft vocabulary of all of them, after
    each chunk), could not take each position PASSES times."""
    if args.data:
        eos = llm.tokenizer.eos_token_id
        texts, starts = read_training_data(Path(args.data), llm.tokenizer, args.seq_len,
                                           eos if eos is not None else min(llm.eos_token_ids, default=None))
        return texts, starts, None, args.data
    chat, num_sampled = bool(llm.tokenizer.chat_template), args.samples - len(prompts)
    total = len(prompts) if chat and prompts else args.samples
    built = chat_prompts(args.samples, args.seed) if chat and not prompts else []
    used = {"written": 0, "built": 0}  # prompts answered, by kind

    def write(first: int, count: int) -> tuple[list[list[int]], list[int], list[torch.Tensor] | None]:
        """The texts first .. first + count - 1 (of total)."""
        if chat:
            if prompts:
                chunk = prompts[first:first + count]
            else:  # --self-prompts of every chunk written by the model, the rest (and what it did not write) built
                asked = round((first + count) * args.self_prompts) - round(first * args.self_prompts)
                written = self_written_prompts(llm, asked, args.seed + first) if asked else []
                chunk = written + built[used["built"]:used["built"] + count - len(written)]
                used["written"] += len(written)
                used["built"] += len(chunk) - len(written)
            return chat_distill(llm, chunk, args.seq_len, args.temperature, args.seed + first)
        windows = self_distill(llm, max(0, min(first + count, num_sampled) - first), args.seq_len, args.prefix_tokens,
                               args.temperature, args.seed + first,
                               prompts[max(0, first - num_sampled):max(0, first + count - num_sampled)])
        return windows.tolist(), [0] * len(windows), None

    deadline = time.perf_counter() + WRITING_SHARE * args.minutes * 60 if args.minutes else math.inf
    texts, starts, hidden_states = [], [], []
    first, began, step_seconds, sample = 0, time.perf_counter(), None, None
    with tqdm(total=total, desc="writing the training text", unit="text") as bar:
        while first < total:
            count = chunk_size(first, total, time.perf_counter() - began, deadline - time.perf_counter(),
                               llm.config.max_num_seqs)
            if not count:
                print(f"the --minutes budget: the model wrote {len(texts)} of {total} texts", flush=True)
                break
            if step_seconds is not None:
                positions = sum(len(text) - start for text, start in zip(texts, starts))
                steps_left = (training_end - time.perf_counter()) / step_seconds
                if positions * PASSES >= steps_left * args.batch_size:
                    print(f"the model wrote {len(texts)} of {total} texts: the training the --minutes budget leaves "
                          f"(about {steps_left:.0f} steps of {args.batch_size}) takes each of their {positions} "
                          f"positions at most {PASSES} times", flush=True)
                    break
            new_texts, new_starts, new_hidden = write(first, count)
            texts += new_texts
            starts += new_starts
            hidden_states += new_hidden or []
            bar.update(len(new_texts))
            if training_end < math.inf:
                if sample is None:  # (the first chunk's)
                    sample = (captured_cache(texts, starts, hidden_states, args.heads) if hidden_states else
                              build_cache(llm.model, texts, args.heads, starts))
                answers = torch.tensor([token for text, start in zip(texts, starts) for token in text[start + 1:]])
                draft_vocab = draft_vocabulary(answers, llm.model.config.vocab_size, args.draft_coverage)
                step_seconds = training_pace(llm.model, sample, draft_vocab, args)
            first += count
    if chat:
        source = (f"{len(texts)} prompts in {args.prompts}" if prompts else
                  f"{used['written']} chat prompts the model wrote itself and {used['built']} built from the "
                  "standard library's docstrings")
        return texts, starts, hidden_states, (f"self-distillation (answers to {source}, up to {args.seq_len} "
                                              f"tokens each; temperature {args.temperature})")
    counts = {f"{args.prefix_tokens}-token sampled prefixes": min(len(texts), num_sampled),
              f"prompts in {args.prompts}": max(0, len(texts) - num_sampled)}
    sources = ", ".join(f"{n} from {what}" for what, n in counts.items() if n)
    return texts, starts, None, f"self-distillation ({sources}; continuation temperature {args.temperature})"


def check_args(args: argparse.Namespace) -> None:
    if not 0 < args.draft_coverage <= 1:
        raise SystemExit("gorgon train-medusa: error: --draft-coverage must be in (0, 1]")
    if args.minutes < 0:
        raise SystemExit("gorgon train-medusa: error: --minutes must be >= 0 (0: no budget)")
    if args.data and not Path(args.data).is_file():
        raise SystemExit(f"gorgon train-medusa: error: --data {args.data}: no such file")
    if args.data and args.prompts:
        raise SystemExit("gorgon train-medusa: error: --prompts are for self-distillation; --data trains on given text")
    for flag, share in (("--prompt-share", args.prompt_share), ("--self-prompts", args.self_prompts)):
        if not 0 <= share <= 1:
            raise SystemExit(f"gorgon train-medusa: error: {flag} must be in [0, 1]")


def text_settings(args: argparse.Namespace, model_path: Path) -> dict:
    """What the training text depends on, stored in a --texts file: one written with other settings is refused."""
    return {"model": str(model_path), "data": args.data, "prompts": args.prompts, "samples": args.samples,
            "seq_len": args.seq_len, "seed": args.seed, "temperature": args.temperature,
            "prefix_tokens": args.prefix_tokens, "self_prompts": args.self_prompts, "prompt_share": args.prompt_share}


def load_texts(args: argparse.Namespace, llm: LLM, model_path: Path, prompts: list,
               training_end: float = math.inf) -> tuple[list[list[int]], list[int], list[torch.Tensor] | None, str]:
    """The training text (texts, where each answer starts, their hidden states where the engine kept them, how it
    was made): read from a --texts file train-medusa wrote with the same settings, else written now (and saved
    there, if named)."""
    settings = text_settings(args, model_path)
    if args.texts and Path(args.texts).is_file():
        try:
            saved = json.loads(Path(args.texts).read_text())
            texts, starts, data, made_with = saved["texts"], saved["starts"], saved["data"], saved.get("made_with", {})
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"gorgon train-medusa: error: {args.texts} is not a --texts file that train-medusa wrote "
                             f"({e!r})") from None
        differs = [f"{name} {made_with.get(name)!r} (now {value!r})" for name, value in settings.items()
                   if made_with.get(name) != value]
        if differs:
            raise SystemExit(f"gorgon train-medusa: error: {args.texts} holds text written with other settings (or "
                             f"by an older train-medusa, which did not record them): "
                             f"{'; '.join(differs)}. Remove it to write the text again, or name another --texts file")
        return texts, starts, None, data
    try:
        texts, starts, hidden_states, data = training_text(args, llm, prompts, training_end)
    except (ValueError, OSError) as e:  # a chat template that hides the user's text, a --data file unread
        raise SystemExit(f"gorgon train-medusa: error: {e}") from None
    if args.texts:
        Path(args.texts).write_text(json.dumps({"texts": texts, "starts": starts, "data": data,
                                                "made_with": settings}))
    return texts, starts, hidden_states, data


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retime:
        try:
            model_path = resolve_model(args.model)
            choice, path = retime(model_path, Path(args.out), args.timing_tokens, args.timing_repeats, args.seed)
        except (ValueError, OSError, KeyError, TypeError) as e:  # a broken tree.json, heads without config.json, ...
            raise SystemExit(f"gorgon train-medusa: error: {e}") from None
        print(f"{choice.summary}\nwrote {path}")
        return
    start = time.perf_counter()
    init = None
    try:
        model_path = resolve_model(args.model)
        # writes the text; its model is the frozen base. Neither packed nor dequantized, at most MAX_ROWS sequences a
        # step: the decode kernels take them, where larger steps would multiply dequantized tiles of quantized weights
        args.dtype = args.dtype or writer_dtype(model_path)
        packed = writer_packed(model_path, args.dtype)
        dequantize = not packed and writer_dequantizes(model_path, args.dtype)
        llm = LLM(model_path, max_model_len=min(2048, model_config(model_path).max_model_len), dtype=args.dtype,
                  dequantize=dequantize, batch_invariant=True if packed else None,
                  max_num_seqs=WRITER_SEQS if dequantize or packed else MAX_ROWS)
        model = llm.model
        if args.lr is None:
            args.lr = default_lr(model.config.hidden_size)
        if args.init_heads:  # before the (slow) training text, so a bad folder fails at once
            init = load_medusa_heads(args.init_heads, model.config.hidden_size, model.config.vocab_size)
            c = init.config
            args.heads, args.layers, args.own_lm_head = c.num_heads, c.num_layers, c.own_lm_head
            args.head_kind = init.kind
        share = 1.0 if llm.tokenizer.chat_template else args.prompt_share
        num_prompts = round(args.samples * share) if args.prompts else 0
        prompts = prompts_from(Path(args.prompts), num_prompts, args.seed) if num_prompts else []
        if not llm.tokenizer.chat_template and any(isinstance(p, list) for p in prompts):
            raise ValueError(f"{args.prompts} holds chat messages, but the model has no chat template to answer them")
    except (ValueError, OSError) as e:  # OSError: missing file, a folder, no permission
        raise SystemExit(f"gorgon train-medusa: error: {e}") from None
    training_end = start + TRAINING_END * args.minutes * 60 if args.minutes else math.inf
    texts, starts, hidden_states, data = load_texts(args, llm, model_path, prompts, training_end)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    num_held_out = max(1, int(len(texts) * args.held_out))
    if num_held_out >= len(texts):
        raise SystemExit(f"gorgon train-medusa: {len(texts)} texts leave nothing to train on after "
                         f"holding out {num_held_out}")
    held_out, train = order[:num_held_out], order[num_held_out:]

    def cache_of(rows: list[int], progress: bool = False) -> HiddenCache:
        if hidden_states:  # the engine kept them as it wrote the texts
            return captured_cache([texts[t] for t in rows], [starts[t] for t in rows],
                                  [hidden_states[t] for t in rows], args.heads)
        return build_cache(model, [texts[t] for t in rows], args.heads, [starts[t] for t in rows], progress=progress)

    train_cache, held_out_cache = cache_of(train, progress=True), cache_of(held_out)
    hidden_states = None  # the caches hold copies (a 7B model's 8192 answers: 7.5 GB); cache_of is not called again
    config = train_config(args)
    valid = train_cache.targets[:, 0][train_cache.targets[:, 0] >= 0]
    draft_vocab = draft_vocabulary(valid, model.config.vocab_size, args.draft_coverage)
    heads, history = train_heads(model, train_cache, config, draft_vocab, init=init, held_out=held_out_cache,
                                 deadline=training_end)
    ranks = held_out_ranks(heads, model, held_out_cache)
    accuracy = accuracy_of(ranks)
    held_out_targets = held_out_cache.targets[:, 0][held_out_cache.targets[:, 0] >= 0]
    held_out_coverage = 1.0 if draft_vocab is None else torch.isin(held_out_targets, draft_vocab).float().mean().item()
    # in the dtype they draft in (engine.medusa.speculator.DRAFT_DTYPE): fp32 would double the files for nothing
    save_medusa_heads(heads.to(torch.bfloat16), args.out, base_model=args.model or "models/default")
    train_seconds = time.perf_counter() - start
    choice = None
    (Path(args.out) / TREE_FILE).unlink(missing_ok=True)  # timed for the heads this run replaces
    if not args.no_tree:
        timing_prompts = [texts[t][:starts[t] or args.seq_len // 4] for t in held_out] * max(TIMING_BATCHES)
        choice = choose_tree(model_path, Path(args.out), candidate_trees(ranks), len(ranks), timing_prompts,
                             args.timing_tokens, args.timing_repeats,
                             start + args.minutes * 60 if args.minutes else math.inf)
        choice.save(Path(args.out) / TREE_FILE)
    report = {"config": asdict(config), "init_heads": args.init_heads, "data": data,
              "train_texts": len(train), "held_out_texts": num_held_out,
              "train_positions": len(train_cache), "held_out_positions": len(ranks),
              "steps_trained": len(history), "loss_first": history[0], "loss_last": history[-1],
              "held_out_accuracy": accuracy,
              "draft_vocab_size": heads.num_draft_tokens, "draft_vocab_held_out_coverage": held_out_coverage,
              "tree": choice.summary if choice else None, "threads": torch.get_num_threads(),
              "budget_minutes": args.minutes,
              "training_time_s": train_seconds, "wall_time_s": time.perf_counter() - start}
    (Path(args.out) / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"draft vocabulary: {heads.num_draft_tokens} tokens, {held_out_coverage:.1%} of the held-out text")
    print(f"weighted loss {history[0]:.3f} -> {history[-1]:.3f}; held-out accuracy per head:")
    for k, acc in enumerate(accuracy):
        print(f"  head {k} (token +{k + 2}): top-1 {acc['top1']:.3f}  top-5 {acc['top5']:.3f}")
    if choice:
        print(choice.summary)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
