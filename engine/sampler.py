"""Sampler: logits of the rows that sample -> next token ids.

Per row, in vLLM's order: the structured-output mask (engine.structured), the ban on stop tokens before
min_tokens, logit_bias, repetition penalty, presence
and frequency penalties (greedy rows take the argmax here), then temperature, min_p, top-k, top-p, and a draw with
the row's generator. Logprobs are those of the model's raw logits."""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from itertools import chain

import torch

from engine.config import SamplingParams
from engine.structured import mask_
from models.kernels.decode import DecodeKernels


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row: (logprob of the chosen token, {token_id: logprob} of the top-n), or None when not asked for
    logprobs: list[tuple[float, dict[int, float]] | None]


def has_penalties(p: SamplingParams) -> bool:
    """Whether the row's logits depend on its token history."""
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


@dataclass
class TokenCounts:
    """Token history of some rows, as the penalties read it."""

    output: torch.Tensor  # [rows, vocab] float: occurrences of each token among the generated ones
    seen: torch.Tensor  # [rows, vocab] bool: the token occurs in the prompt or the generated tokens

    @classmethod
    def of(cls, token_ids: list[list[int]], num_prompt_tokens: list[int], vocab_size: int,
           device: torch.device) -> TokenCounts:
        """Row i's history is token_ids[i], of which the first num_prompt_tokens[i] are the prompt. The
        per-token work happens in C (list -> tensor, scatter), the Python work is per row."""
        counts = cls(torch.zeros(len(token_ids), vocab_size, device=device),
                     torch.zeros(len(token_ids), vocab_size, dtype=torch.bool, device=device))
        prompts = [t[:n] for t, n in zip(token_ids, num_prompt_tokens)]
        outputs = [t[n:] for t, n in zip(token_ids, num_prompt_tokens)]
        counts.add(torch.repeat_interleave(torch.arange(len(outputs)), torch.tensor([len(t) for t in outputs])),
                   torch.tensor(list(chain.from_iterable(outputs)), dtype=torch.long))
        prompt_rows = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor([len(t) for t in prompts]))
        prompt_ids = torch.tensor(list(chain.from_iterable(prompts)), dtype=torch.long, device=device)
        counts.seen[prompt_rows.to(device), prompt_ids] = True
        return counts

    def add(self, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count token_ids[j] as generated in row rows[j]."""
        rows, token_ids = rows.to(self.output.device), token_ids.to(self.output.device)
        self.output.index_put_((rows, token_ids), torch.ones_like(token_ids, dtype=self.output.dtype), accumulate=True)
        self.seen[rows, token_ids] = True

    def repeat_interleave(self, n: torch.Tensor) -> TokenCounts:
        """Row i n[i] times, consecutively."""
        n = n.to(self.output.device)  # (CUDA's index_select, which it runs, takes no host index)
        return TokenCounts(self.output.repeat_interleave(n, dim=0), self.seen.repeat_interleave(n, dim=0))


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], counts: TokenCounts | None = None,
                  penalized_rows: list[int] | None = None) -> torch.Tensor:
    """logit_bias and penalties. logits: [rows, vocab] float; counts describe the rows penalized_rows
    (default: those whose params have penalties), in that order. Returns new logits, or `logits` itself
    when no row changes."""
    if any(p.logit_bias for p in params):
        rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
        ids = [t for p in params for t in p.logit_bias]
        bias = [b for p in params for b in p.logit_bias.values()]
        logits = logits.index_put((torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)),
                                  torch.tensor(bias, device=logits.device), accumulate=True)
    if penalized_rows is None:
        penalized_rows = [i for i, p in enumerate(params) if has_penalties(p)]
    if not penalized_rows:
        return logits
    assert counts is not None and counts.output.shape[0] == len(penalized_rows), "penalties need the token history"
    device = logits.device

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=device)[:, None]

    chosen = [params[i] for i in penalized_rows]
    rows = torch.tensor(penalized_rows, device=device)
    x = logits[rows]
    repetition = column([p.repetition_penalty for p in chosen])
    x = torch.where(counts.seen, torch.where(x > 0, x / repetition, x * repetition), x)
    x = x - column([p.frequency_penalty for p in chosen]) * counts.output
    x = x - column([p.presence_penalty for p in chosen]) * (counts.output > 0)
    return logits.index_put((rows,), x)


def ban_(logits: torch.Tensor, banned: list[Collection[int]]) -> None:
    """Mask, in place, the tokens banned[i] of each row i of logits [rows, vocab] (stop tokens before min_tokens)."""
    rows = [i for i, ids in enumerate(banned) for _ in ids]
    ids = [t for b in banned for t in b]
    index = torch.tensor([rows, ids], dtype=torch.long, device=logits.device)
    logits[index[0], index[1]] = float("-inf")


# top-p looks for each row's nucleus among its likeliest tokens: first this many, then 16x as many, then all of them
NUCLEUS_CANDIDATES = 256


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution a sampled row draws from: softmax of logits / temperature restricted to each row's
    min_p, top-k and top-p set. logits: [rows, vocab], already adjusted. No full sort of the vocabulary: top-k
    reads the k-th largest logit from topk(), and top-p sorts only the likeliest tokens, as many as hold every
    row's nucleus (a full sort of SmolLM2's 49152 logits took ~4 ms on a CPU, most of a decode step)."""
    device = logits.device
    temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
    logits = logits / temperature[:, None]
    if any(p.min_p > 0 for p in params):
        # p(x) < min_p * p(likeliest)  <=>  logit(x) < max logit + log(min_p)
        min_p = torch.tensor([p.min_p for p in params], device=device)
        floor = logits.max(dim=-1, keepdim=True).values + min_p.log()[:, None]
        logits = logits.masked_fill(logits < floor, float("-inf"))
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        largest = logits.topk(max(top_k), dim=-1).values  # [rows, max k], descending
        kth_largest = largest.gather(1, torch.tensor([max(k, 1) - 1 for k in top_k], device=device)[:, None])
        kth_largest[torch.tensor([k == 0 for k in top_k], device=device)] = float("-inf")
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        logits = logits.masked_fill(~nucleus(logits.softmax(dim=-1), [p.top_p for p in params]), float("-inf"))
    return logits.softmax(dim=-1)


def nucleus(probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Which tokens each row's top-p keeps (a row of top_p 1 keeps all): in order of probability, a token goes
    once the tokens ranked above it reach top_p, unless it ties with the last one kept (as top-k keeps its ties:
    which of two tied tokens a sort puts first depends on how many it sorts, so on the rest of the batch, and a
    seeded request's tokens would too). Only the n likeliest are sorted, where n is the first of
    NUCLEUS_CANDIDATES, 16x as many and the whole row whose tokens reach every row's top_p: any token below
    them goes."""
    threshold = torch.tensor(top_p, dtype=probs.dtype, device=probs.device)[:, None]
    filtered = threshold < 1.0
    vocab = probs.shape[-1]
    for n in (NUCLEUS_CANDIDATES, 16 * NUCLEUS_CANDIDATES, vocab):
        likeliest = (probs.topk(n, dim=-1) if n < vocab else probs.sort(dim=-1, descending=True)).values
        mass_before = likeliest.cumsum(dim=-1) - likeliest
        if n >= vocab or bool(((mass_before[:, -1:] + likeliest[:, -1:] >= threshold) | ~filtered).all()):
            break
    last_kept = likeliest.masked_fill(mass_before >= threshold, float("inf")).min(dim=-1, keepdim=True).values
    last_kept = torch.minimum(last_kept, likeliest[:, :1])  # the likeliest stays (top_p 0 keeps it alone)
    return (probs >= last_kept) | ~filtered


def seeded_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's generator. torch's CPU generator keeps only a seed's low 32 bits, so seeds that differed above
    them drew the same tokens; there a seed outside [0, 2^32) is first mixed into 32 bits (splitmix64's finalizer)
    and the seeds inside keep their streams. (CUDA's takes all 64.)"""
    if torch.device(device).type == "cpu" and not 0 <= seed < 1 << 32:
        mask = (1 << 64) - 1
        z = seed & mask
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
        seed = (z ^ (z >> 31)) & 0xFFFFFFFF
    return torch.Generator(device=device).manual_seed(seed)


def draw_tokens(probs: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
    """One token from each row of probs [rows, vocab] by inverse transform sampling: a uniform number per row from
    the row's generator (None: torch's default), found in the row's cumulative sum (float64: its rounding stays far
    below any token's probability). Exact, as torch.multinomial is, and one draw per row; but multinomial takes
    ~1 ms a row of SmolLM2's 49152 tokens on a CPU (at batch 4, 4.6 ms of a 22 ms plain step), this ~55 us."""
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in generators])
    cumulative = probs.cumsum(dim=-1, dtype=torch.float64)
    ids = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)
    return ids.clamp_(max=probs.shape[-1] - 1).flatten().tolist()


def argmax_ids(logits: torch.Tensor, kernels: DecodeKernels | None) -> list[int]:
    """Each row's argmax of logits [rows, vocab], the first among equals: the CPU kernels' where the engine
    runs them (torch's CPU argmax is a scalar loop, ~80 us a row of SmolLM2's 49152 logits)."""
    ids = kernels.ops.argmax_rows(logits) if kernels is not None and logits.is_cpu else logits.argmax(dim=-1)
    return ids.tolist()


@dataclass
class Sampler:
    kernels: DecodeKernels | None = None  # the engine's CPU kernels (argmax_ids)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 token_ids: list[list[int]] | None = None, num_prompt_tokens: list[int] | None = None,
                 matchers: list | None = None, banned: list[Collection[int]] | None = None) -> SamplerOutput:
        """logits: [num_rows, vocab]. Row i is sampled with params[i] and generators[i] (None: global RNG).
        token_ids[i]: row i's prompt and output so far, of which num_prompt_tokens[i] are the prompt; only
        rows with penalties read them (they may be omitted when no row has penalties). matchers[i]: row i's
        structured-output matcher, or None (all None when omitted). banned[i]: tokens row i may not sample."""
        raw = logits.float()
        constrained = raw
        constrained_rows = matchers is not None and any(m is not None for m in matchers)
        banned_rows = banned is not None and any(banned)
        if constrained_rows or banned_rows:
            constrained = raw.clone()  # logprobs stay the model's own
            if constrained_rows:
                mask_(constrained, matchers)
            if banned_rows:
                ban_(constrained, banned)
        penalized = [i for i, p in enumerate(params) if has_penalties(p)]
        counts = None
        if penalized:
            assert token_ids is not None and num_prompt_tokens is not None, "penalties need the token history"
            counts = TokenCounts.of([token_ids[i] for i in penalized], [num_prompt_tokens[i] for i in penalized],
                                    raw.shape[-1], raw.device)
        adjusted = adjust_logits(constrained, params, counts, penalized)
        ids = argmax_ids(adjusted, self.kernels)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            probs = filtered_probs(adjusted[sampled], [params[i] for i in sampled])
            # each row draws from its own generator; the draws come to the host together (one sync on CUDA)
            for i, token in zip(sampled, draw_tokens(probs, [generators[i] for i in sampled])):
                ids[i] = token
        return SamplerOutput(ids, token_logprobs(raw, ids, params))


def token_logprobs(logits: torch.Tensor, token_ids: list[int],
                   params: list[SamplingParams]) -> list[tuple[float, dict[int, float]] | None]:
    """Per row of the model's own logits [rows, vocab] (fp32): the log-probability of token_ids[row] and of the
    params[row].logprobs likeliest tokens, or None where the request asked for none."""
    wanted = [p.logprobs is not None for p in params]
    if not any(wanted):
        return [None] * len(params)
    logprobs = logits.log_softmax(dim=-1)
    out: list[tuple[float, dict[int, float]] | None] = []
    for i, (want, p) in enumerate(zip(wanted, params)):
        if not want:
            out.append(None)
            continue
        top = logprobs[i].topk(p.logprobs) if p.logprobs else None
        alternatives = dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}
        out.append((logprobs[i, token_ids[i]].item(), alternatives))
    return out
