"""Prometheus metrics of one server, in a registry of its own (several apps can share a process)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from engine import RequestOutput

_INTER_TOKEN_BUCKETS = tuple(0.005 * 2 ** i for i in range(13))  # 5 ms to 20 s
# a request's times on a CPU reach minutes (a long answer, or a wait in the queue): 5 ms to about 1.5 hours
_REQUEST_BUCKETS = tuple(0.005 * 2 ** i for i in range(21))


class ServerMetrics:
    """Engine gauges are read at scrape time; request metrics are recorded as outputs arrive."""

    def __init__(self, llm) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def kv_cache_usage() -> float:
            stats = llm.stats()
            return 1.0 - stats.num_free_blocks / stats.num_blocks

        Gauge("gorgon_requests_running", "Requests being decoded", registry=r).set_function(
            lambda: llm.stats().num_running)
        Gauge("gorgon_requests_waiting", "Requests queued for admission", registry=r).set_function(
            lambda: llm.stats().num_waiting)
        Gauge("gorgon_kv_blocks_total", "KV cache blocks", registry=r).set(llm.stats().num_blocks)
        Gauge("gorgon_kv_blocks_free", "KV cache blocks not held by any request", registry=r).set_function(
            lambda: llm.stats().num_free_blocks)
        Gauge("gorgon_kv_cache_usage", "Fraction of KV blocks held by requests", registry=r).set_function(
            kv_cache_usage)
        r.register(_Preemptions(llm))
        self.ttft = Histogram("gorgon_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_REQUEST_BUCKETS, registry=r)
        self.inter_token = Histogram("gorgon_inter_token_latency_seconds", "Time between streamed tokens",
                                     buckets=_INTER_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("gorgon_request_latency_seconds", "Arrival to last token",
                             buckets=_REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("gorgon_request_queue_time_seconds", "Arrival to first scheduled (waiting for room)",
                               buckets=_REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gorgon_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_prompt_tokens = Counter("gorgon_prompt_tokens_cached",
                                            "Prompt tokens of finished requests whose KV the prefix cache held",
                                            registry=r)
        self.generation_tokens = Counter("gorgon_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("gorgon_requests", "Finished requests", ["model", "finish_reason"], registry=r)
        self.medusa_steps = Counter("gorgon_medusa_steps", "Medusa speculative steps", registry=r)
        self.medusa_accepted = Counter("gorgon_medusa_accepted_tokens",
                                       "Tokens emitted by Medusa steps (accepted + bonus)", registry=r)
        self.medusa_drafted = Counter("gorgon_medusa_draft_tokens", "Drafted tokens Medusa steps verified",
                                      registry=r)

    def request_tracker(self, model: str) -> RequestTracker:
        return RequestTracker(self, model)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Preemptions(Collector):
    """The engine's count of preemptions, read at scrape time."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def collect(self):
        yield CounterMetricFamily("gorgon_preemptions", "Sequences preempted (their KV freed, to be computed again)",
                                  value=self.llm.stats().num_preemptions)


class RequestTracker:
    """Records one request's outputs into ServerMetrics; `finish` is called once, with its last output
    (or None if it failed before producing one)."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        self.last_token_time: float | None = None

    def on_output(self, out: RequestOutput) -> None:
        if not out.new_token_ids:
            return
        m, now = self.metrics, time.perf_counter()
        m.generation_tokens.inc(len(out.new_token_ids))
        if self.last_token_time is None:
            if out.ttft_s is not None:
                m.ttft.observe(out.ttft_s)
        else:  # a Medusa step emits several tokens at once: spread the gap over them
            gap = (now - self.last_token_time) / len(out.new_token_ids)
            for _ in out.new_token_ids:
                m.inter_token.observe(gap)
        self.last_token_time = now

    def finish(self, out: RequestOutput | None, reason: str) -> None:
        m = self.metrics
        m.requests.labels(model=self.model, finish_reason=reason).inc()
        if out is None:
            return
        m.prompt_tokens.inc(len(out.prompt_token_ids))
        m.cached_prompt_tokens.inc(out.num_cached_tokens)
        m.e2e.observe(out.latency_s)
        if out.queue_s is not None:
            m.queue.observe(out.queue_s)
        m.medusa_steps.inc(len(out.accepted_lengths))
        m.medusa_accepted.inc(sum(out.accepted_lengths))
        m.medusa_drafted.inc(out.num_draft_tokens)
