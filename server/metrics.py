"""Prometheus collectors of the HTTP server, in a registry of their own (one per app).

Names follow Prometheus conventions (`trident_` prefix, `_total` counters, `_seconds` histograms).
Latencies are measured at the server, so they include queueing and detokenization.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Bucket edges in seconds: token latencies from sub-millisecond (GPU decode) to seconds (CPU).
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                  0.75, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """Request counts, token counters and latency histograms for `GET /metrics`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("trident_http_requests", "HTTP requests by endpoint and status code",
                                     ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("trident_prompt_tokens", "Prompt tokens of finished or aborted requests",
                                     registry=r)
        self.generation_tokens = Counter("trident_generation_tokens", "Generated tokens", registry=r)
        self.requests_finished = Counter("trident_requests_finished", "Completions (choices; n per request) by finish reason",
                                         ["finish_reason"], registry=r)
        self.requests_aborted = Counter("trident_requests_aborted",
                                        "Engine requests aborted because the client went away", registry=r)
        self.requests_running = Gauge("trident_requests_running",
                                      "Engine requests the server is waiting on right now", registry=r)
        self.engine_ready = Gauge("trident_engine_ready", "1 when the model is loaded and the engine is healthy",
                                  registry=r)
        self.engine_waiting = Gauge("trident_engine_waiting_requests",
                                    "Requests in the engine's waiting queue (at --max-waiting new ones get 429)",
                                    registry=r)
        self.time_to_first_token = Histogram("trident_time_to_first_token_seconds",
                                             "Arrival to first generated token", buckets=_TOKEN_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("trident_inter_token_latency_seconds",
                                             "Time between successive outputs of one request",
                                             buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e_latency = Histogram("trident_e2e_request_latency_seconds", "Arrival to last token",
                                     buckets=_REQUEST_BUCKETS, registry=r)

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)


class EngineCollector:
    """Engine-side figures read at scrape time: busy time, FLOPs executed vs dense, and the time
    and FLOPs each pruning axis saved (step time attributed by FLOP share), KV-cache use."""

    def __init__(self, async_engine) -> None:
        self.async_engine = async_engine

    def collect(self):
        engine = self.async_engine.engine
        if engine is None:
            return
        yield CounterMetricFamily("trident_engine_busy_seconds", "Time spent in engine steps",
                                  value=engine.busy_seconds)
        flops = engine.total_flops
        yield CounterMetricFamily("trident_flops_executed", "Matrix FLOPs the engine executed",
                                  value=flops.executed)
        yield CounterMetricFamily("trident_flops_dense", "Matrix FLOPs the dense model would have executed",
                                  value=flops.dense)
        saved_flops = CounterMetricFamily("trident_pruning_saved_flops", "FLOPs saved, by pruning axis",
                                          labels=["axis"])
        saved_time = CounterMetricFamily("trident_pruning_saved_seconds",
                                         "Step time saved, by pruning axis (attributed by FLOP share)",
                                         labels=["axis"])
        for axis, value in flops.saved.items():
            saved_flops.add_metric([axis], value)
            saved_time.add_metric([axis], engine.saved_seconds[axis])
        yield saved_flops
        yield saved_time
        bm = engine.block_manager
        yield GaugeMetricFamily("trident_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
                                value=1.0 - bm.num_free_blocks / bm.num_blocks)
        yield CounterMetricFamily("trident_preemptions", "Sequences preempted for recompute",
                                  value=engine.scheduler.num_preemptions)


class RequestCounterMiddleware:
    """Pure ASGI middleware counting responses by endpoint and status.

    Pure ASGI (not BaseHTTPMiddleware) so that streaming responses and client-disconnect detection
    pass through untouched. Unknown paths share the label "other" to bound label cardinality.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, endpoints: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500   # stays 500 if the app fails before starting a response

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.http_requests.labels(endpoint=endpoint, status=str(status)).inc()
