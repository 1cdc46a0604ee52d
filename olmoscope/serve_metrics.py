"""`/metrics` of `olmoscope serve`, in Prometheus' text format (prometheus-client): the engine's state read from
the snapshot its thread publishes, and latency histograms the thread feeds as tokens arrive.

    >>> metrics = Metrics(lambda: engine.stats); body, content_type = metrics.render()
    >>> b"olmoscope_kv_blocks_used" in body
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from olmoscope.serving_engine import EngineStats, Observer

# vLLM's buckets, so that dashboards made for it read these the same way
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0)


class Metrics(Observer):
    """The registry behind /metrics; the engine thread calls the Observer methods (prometheus-client locks)."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("olmoscope_time_to_first_token_seconds", "From a request's arrival to a choice's "
                              "first token.", buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("olmoscope_inter_token_latency_seconds", "Between two tokens of one choice.",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("olmoscope_e2e_request_latency_seconds", "From a request's arrival to its end.",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.requests = Counter("olmoscope_requests_finished", "Requests ended, by finish reason.",
                                ["finish_reason"], registry=self.registry)
        self.rejected = Counter("olmoscope_requests_rejected", "Requests answered with an error before running, by "
                                "HTTP status.", ["status"], registry=self.registry)
        self.registry.register(_EngineCollector(stats))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, seconds: float, reason: str) -> None:
        self.e2e.observe(seconds)
        self.requests.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        """(the text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's latest snapshot at each scrape."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gauges = [
            ("olmoscope_requests_running", "Sequences running (a request with n choices runs n).", s.running),
            ("olmoscope_requests_waiting", "Sequences waiting to be scheduled (new or preempted).", s.waiting),
            ("olmoscope_kv_blocks_total", "KV cache blocks sequences can hold.", s.blocks_total),
            ("olmoscope_kv_blocks_used", "KV cache blocks held by sequences.", s.blocks_used),
            ("olmoscope_kv_blocks_free", "KV cache blocks free (unused cached prefix blocks included).",
             s.blocks_free),
            ("olmoscope_kv_blocks_cached", "Full blocks findable by their prefix hash.", s.blocks_cached),
            ("olmoscope_prefix_cache_hit_rate", "Prefix blocks found over prefix blocks looked up, since start.",
             s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("olmoscope_prompt_tokens", "Prompt tokens taken in.", s.prompt_tokens),
            ("olmoscope_generation_tokens", "Tokens generated.", s.generation_tokens),
            ("olmoscope_prefix_cache_queries", "Prefix blocks looked up in the cache.", s.prefix_queries),
            ("olmoscope_prefix_cache_hits", "Prefix blocks found in the cache.", s.prefix_hits),
            ("olmoscope_preemptions", "Sequences preempted because the KV cache ran out.", s.preemptions),
            ("olmoscope_engine_steps", "Forward passes run.", s.steps),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
