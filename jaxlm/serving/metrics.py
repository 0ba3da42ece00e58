"""The server's Prometheus metrics (``GET /metrics``), with prometheus-client.

Engine state (requests running and waiting, KV pages, prefix-cache hits,
compilations) is read at scrape time from the loop thread's latest snapshot;
per-request timings (time to first token, time per output token) are
observed by the loop thread when each request finishes. One registry per
server, so several servers can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxlm.serving import engine as engine_lib
from jaxlm.serving.loop import AsyncEngine, Observer

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats
        gauges = (
            ("jaxlm_num_requests_running", "Requests decoding or prefilling in an engine slot.", s["running"]),
            ("jaxlm_num_requests_waiting", "Requests accepted and waiting for a slot.", s["waiting"]),
            ("jaxlm_kv_cache_pages_used", "KV-cache pages held by requests (cached, unheld pages count as free).",
             s["pages_used"]),
            ("jaxlm_kv_cache_pages_total", "KV-cache pages in the pool.", s["pages_total"]),
            ("jaxlm_prefix_cache_hit_rate", "Share of prompt pages looked up in the prefix cache and found.",
             s["hit_rate"]),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("jaxlm_prefix_cache_hits", "Prompt pages found in the prefix cache.", s["prefix_hits"]),
            ("jaxlm_prefix_cache_queries", "Prompt pages looked up in the prefix cache.", s["prefix_lookups"]),
            ("jaxlm_preemptions", "Running requests preempted (recomputed later) when pages ran out.",
             s["preemptions"]),
            ("jaxlm_generation_tokens", "Tokens generated.", s["tokens_generated"]),
            ("jaxlm_compilations", "XLA compilations in this process (none should follow warm-up).",
             engine_lib.compile_count()),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        finished = CounterMetricFamily("jaxlm_requests_finished", "Requests finished, by finish reason.",
                                       labels=["finish_reason"])
        for reason in ("stop", "length", "abort", "error"):
            finished.add_metric([reason], s["finished"].get(reason, 0))
        yield finished


class ServerMetrics(Observer):
    """The metrics registry; as the engine's `Observer` it records each finished request."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("jaxlm_time_to_first_token_seconds", "Seconds from a request's arrival at the "
                              "engine to its first token.", buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("jaxlm_time_per_output_token_seconds", "Seconds per output token after the first: "
                              "(latency - TTFT) / (output tokens - 1).", buckets=_TPOT_BUCKETS,
                              registry=self.registry)
        self.prompt_tokens = Counter("jaxlm_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=self.registry)

    def attach(self, engine: AsyncEngine) -> None:
        self.registry.register(_EngineCollector(engine))

    def request_finished(self, reason, prompt_tokens, completion_tokens, ttft, tpot) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)

    def render(self) -> bytes:
        return generate_latest(self.registry)
