"""Prometheus metrics of the server (GET /metrics), one registry per app.

    phi3v_edge_requests_running / _waiting        gauges, read from Engine.stats() at scrape time
    phi3v_edge_time_to_first_token_seconds         histogram: request arrival -> first generated token
    phi3v_edge_engine_time_to_first_token_seconds  histogram: the engine's own (submit -> first token)
    phi3v_edge_inter_token_latency_seconds         histogram: between two generated tokens of a row
    phi3v_edge_e2e_request_latency_seconds         histogram: arrival -> last token
    phi3v_edge_prompt_tokens_total, _cached_prompt_tokens_total, _generation_tokens_total   counters
    phi3v_edge_request_success_total{finish_reason}  counter (stop / length)
    phi3v_edge_request_errors_total{status}          counter of error answers by HTTP status

The two time-to-first-token histograms side by side give the server's own cost (HTTP, JSON, images).
"""
from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for app.py)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

PREFIX = "phi3v_edge"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, float("inf"))
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               float("inf"))


class Metrics:
    def __init__(self, stats=None):
        """stats: a callable returning Engine.stats() (None until the engine is loaded)."""
        self.registry = r = CollectorRegistry()
        self.stats = stats
        self.running = Gauge(f"{PREFIX}_requests_running", "Requests in the engine's slots", registry=r)
        self.waiting = Gauge(f"{PREFIX}_requests_waiting", "Requests waiting for a slot", registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Request arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.engine_ttft = Histogram(f"{PREFIX}_engine_time_to_first_token_seconds",
                                     "The engine's own time to first token (submit to first token)",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between two generated tokens of a row",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Request arrival to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens (image tokens included)", registry=r)
        self.cached_tokens = Counter(f"{PREFIX}_cached_prompt_tokens", "Prompt tokens whose KV came from the cache",
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens", registry=r)
        self.success = Counter(f"{PREFIX}_request_success", "Finished requests by finish reason", ["finish_reason"],
                               registry=r)
        self.errors = Counter(f"{PREFIX}_request_errors", "Error answers by HTTP status", ["status"], registry=r)

    def finished(self, results, arrival: float, end: float) -> None:
        first = results[0]
        self.prompt_tokens.inc(first.prompt_tokens)
        self.cached_tokens.inc(first.cached_tokens)
        for res in results:
            self.generation_tokens.inc(len(res.token_ids))
            self.success.labels(res.finish_reason).inc()
        self.e2e.observe(end - arrival)
        if "ttft" in first.timings:
            self.engine_ttft.observe(first.timings["ttft"])

    def render(self) -> bytes:
        if self.stats is not None:
            try:
                s = self.stats()
                self.running.set(s.get("running", 0))
                self.waiting.set(s.get("waiting", 0))
            except Exception:  # a closed engine: keep the last values
                pass
        return generate_latest(self.registry)
