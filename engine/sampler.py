"""Sampler: logits of the rows that sample -> next token ids (greedy, temperature, top-k, top-p, seeds)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row: (logprob of the chosen token, {token_id: logprob} of the top-n), or None when not asked for
    logprobs: list[tuple[float, dict[int, float]] | None]


class Sampler:
    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> SamplerOutput:
        """logits: [num_rows, vocab]. Row i is sampled with params[i] and generators[i] (None: global RNG)."""
        logits = logits.float()
        if all(p.greedy for p in params):
            token_ids = logits.argmax(dim=-1)
        else:
            probs = self.filtered_probs(logits, params)
            token_ids = torch.empty(len(params), dtype=torch.long, device=logits.device)
            for i, (p, gen) in enumerate(zip(params, generators)):
                if p.greedy:
                    token_ids[i] = logits[i].argmax()
                else:
                    token_ids[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
        ids = token_ids.tolist()
        return SamplerOutput(ids, self._logprobs(logits, ids, params))

    @staticmethod
    def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Softmax of logits / temperature restricted to each row's top-k and top-p set."""
        device = logits.device
        temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
        logits = logits / temperature[:, None]
        top_k = [p.top_k for p in params]
        if any(k > 0 for k in top_k):
            vocab = logits.shape[-1]
            k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=device)
            kth_largest = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth_largest, float("-inf"))
        top_p = [p.top_p for p in params]
        if any(p < 1.0 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            # drop a token when the tokens ranked above it already reach top_p
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop_sorted = mass_before >= torch.tensor(top_p, device=device)[:, None]
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(dim=-1)

    @staticmethod
    def _logprobs(logits: torch.Tensor, token_ids: list[int],
                  params: list[SamplingParams]) -> list[tuple[float, dict[int, float]] | None]:
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
