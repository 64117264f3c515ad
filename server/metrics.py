"""Prometheus series of the server, in a registry of their own (one per app).

Serving series are named like vLLM's (`vllm:` becomes `trident:`) and carry a `model_name` label,
so a dashboard or alert built for vLLM works after renaming the prefix. Pruning series add an
`axis` label (`depth`, `width`, `length`); an axis the engine does not run yet exports zeros, so
dashboards never change names. Two process-level series keep plain names: the HTTP request
counter `trident_http_requests_total{endpoint,status}` and `trident_engine_ready`.

TTFT and end-to-end latency start when the HTTP request arrives (stamped by the outermost
middleware, before the body is read or tokenized), on the monotonic clock.

Several worker processes: set `PROMETHEUS_MULTIPROC_DIR` to an empty folder shared by them before
they start. prometheus_client then keeps every value in a file per process, `/metrics` sums the
files, gauges count live processes only, and nothing resets on scrape.
"""
from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trident.engine.outputs import RequestOutput

AXES = ("depth", "width", "length")
FINISH_REASONS = ("stop", "length", "abort")
# Seconds: token latencies from sub-millisecond (GPU decode) to seconds (CPU, long queues).
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SPEEDUP_BUCKETS = (1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.4, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0)

disable_created_metrics()     # `*_created` series double the output and no dashboard reads them

_arrival: contextvars.ContextVar[float] = contextvars.ContextVar("trident_request_arrival")


def request_arrival() -> float:
    """When the HTTP request being served arrived (time.monotonic), or now outside a request."""
    return _arrival.get(time.monotonic())


def one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit`: token-count buckets, as vLLM builds them."""
    edges, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(edges)
            edges.append(m * scale)
        scale *= 10


def plan_labels(plan, plan_arg: str | None) -> dict[str, str]:
    """The info labels of the active plan: its name, the profile it came from, its checkpoint digest."""
    if plan is None:
        return {"name": "none", "profile": "none", "checkpoint_digest": "none"}
    from trident.engine.pruning.profiles import PROFILES
    return {"name": plan.name, "profile": plan_arg if plan_arg in PROFILES else "file",
            "checkpoint_digest": plan.model.get("digest") or "none"}


class ServerMetrics:
    """Every series of `GET /metrics`. The model's series appear once `bind` knows the model."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.model: str | None = None          # the model_name label, set by bind()
        self.scrape_hooks: list[Callable[[], None]] = []   # run before each render (gauges read then)
        self.http_requests = Counter("trident_http_requests", "HTTP requests by endpoint and status code",
                                     ["endpoint", "status"], registry=self.registry)
        self.engine_ready = Gauge("trident_engine_ready", "1 when the model is loaded and the engine is healthy",
                                  registry=self.registry, multiprocess_mode="livemin")

    def _family(self, kind, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs):
        return kind(f"trident:{name}", doc, ["model_name", *labels], registry=self.registry, **kwargs)

    def bind(self, model_name: str, max_model_len: int, num_layers: int, plan_info: dict[str, str],
             plan_weights: dict[str, int] | None = None) -> None:
        """Creates the model's series, each at zero, for the served `model_name`. `plan_weights`:
        per served plan (`--plans`), the bytes of weights it holds beyond the ones it shares."""
        f, m = self._family, model_name
        self.model = m
        # Scheduler state (set after every engine step and at scrape time). Several workers: summed
        # over live processes; KV usage takes the fullest one, which is what an alert needs.
        self.num_requests_running = f(Gauge, "num_requests_running", "Requests in the engine's running batch",
                                      multiprocess_mode="livesum")
        self.num_requests_waiting = f(Gauge, "num_requests_waiting", "Requests waiting to be scheduled",
                                      multiprocess_mode="livesum")
        self.kv_cache_usage_perc = f(Gauge, "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1)",
                                     multiprocess_mode="livemax")
        self.num_preemptions = f(Counter, "num_preemptions", "Sequences preempted for recompute")
        self.engine_busy_seconds = f(Counter, "engine_busy_seconds", "Time spent in engine steps")
        # Requests and tokens.
        self.prompt_tokens = f(Counter, "prompt_tokens", "Prompt tokens of admitted requests")
        self.generation_tokens = f(Counter, "generation_tokens", "Generated tokens, counted as they stream")
        self.request_success = f(Counter, "request_success", "Finished completions (n per request) by finish reason",
                                 ("finished_reason",))
        self.time_to_first_token = f(Histogram, "time_to_first_token_seconds", "HTTP arrival to first token",
                                     buckets=TOKEN_BUCKETS)
        self.inter_token_latency = f(Histogram, "inter_token_latency_seconds",
                                     "Time between successive outputs of one request", buckets=TOKEN_BUCKETS)
        self.e2e_request_latency = f(Histogram, "e2e_request_latency_seconds", "HTTP arrival to last token",
                                     buckets=REQUEST_BUCKETS)
        self.request_queue_time = f(Histogram, "request_queue_time_seconds",
                                    "Engine arrival to first scheduled step", buckets=REQUEST_BUCKETS)
        self.request_prefill_time = f(Histogram, "request_prefill_time_seconds",
                                      "First scheduled step to first token", buckets=REQUEST_BUCKETS)
        self.request_decode_time = f(Histogram, "request_decode_time_seconds", "First token to last token",
                                     buckets=REQUEST_BUCKETS)
        self.request_prompt_tokens = f(Histogram, "request_prompt_tokens", "Prompt tokens per request",
                                       buckets=one_two_five(max_model_len))
        self.request_generation_tokens = f(Histogram, "request_generation_tokens",
                                           "Generated tokens per request (all n completions)",
                                           buckets=one_two_five(max_model_len))
        self.iteration_tokens = f(Histogram, "iteration_tokens_total", "Tokens run through the model per engine step",
                                  buckets=ITERATION_TOKEN_BUCKETS)
        # Pruning. Executed and dense-equivalent FLOPs are totals: what ran is not split by axis,
        # what was saved is (dense = executed + the sum of saved over the axes).
        self.flops_executed = f(Counter, "flops_executed", "Matrix FLOPs the engine executed, decisions included")
        self.flops_dense = f(Counter, "flops_dense", "Matrix FLOPs the dense model would have executed")
        self.flops_saved = f(Counter, "flops_saved", "FLOPs saved, by pruning axis", ("axis",))
        self.seconds_saved = f(Counter, "seconds_saved", "Step time saved, by pruning axis (attributed by FLOP share)",
                               ("axis",))
        self.exit_layer = f(Histogram, "exit_layer", "Layer after which a token left through an early exit",
                            ("axis",), buckets=tuple(range(1, num_layers + 1)))
        self.draft_tokens_proposed = f(Counter, "draft_tokens_proposed", "Self-speculative draft tokens proposed",
                                       ("axis",))
        self.draft_tokens_accepted = f(Counter, "draft_tokens_accepted", "Self-speculative draft tokens accepted",
                                       ("axis",))
        self.speculative_verify_steps = f(Counter, "speculative_verify_steps",
                                          "Self-speculative verify passes (one per sequence and step)", ("axis",))
        self.draft_flops = f(Counter, "draft_flops", "FLOPs the self-speculative drafts executed (in flops_executed)",
                             ("axis",))
        self.prompt_tokens_dropped = f(Counter, "prompt_tokens_dropped",
                                       "Prompt tokens dropped for deeper layers during prefill", ("axis",))
        self.kv_slots_evicted = f(Counter, "kv_slots_evicted", "KV-cache slots evicted by the decode budget",
                                  ("axis",))
        self.kv_bytes_saved = f(Counter, "kv_bytes_saved", "KV-cache bytes not held thanks to length pruning",
                                ("axis",))
        self.request_speedup = f(Histogram, "request_speedup_over_dense",
                                 "Per finished request: dense-equivalent FLOPs / executed FLOPs",
                                 buckets=SPEEDUP_BUCKETS)
        self.plan_info = f(Gauge, "pruning_plan_info", "The active pruning plan (value 1)",
                           ("name", "profile", "checkpoint_digest"), multiprocess_mode="livemax")
        self.plan_info.labels(m, plan_info["name"], plan_info["profile"], plan_info["checkpoint_digest"]).set(1)
        self.plan_weight_bytes = f(Gauge, "plan_weight_bytes", "Weight bytes each served plan holds beyond the "
                                   "tensors it shares with the first (embedding, LM head)", ("plan",),
                                   multiprocess_mode="livemax")
        for name, size in (plan_weights or {}).items():
            self.plan_weight_bytes.labels(m, name).set(size)
        for family in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage_perc,
                       self.num_preemptions, self.engine_busy_seconds, self.prompt_tokens, self.generation_tokens,
                       self.time_to_first_token, self.inter_token_latency, self.e2e_request_latency,
                       self.request_queue_time, self.request_prefill_time, self.request_decode_time,
                       self.request_prompt_tokens, self.request_generation_tokens, self.iteration_tokens,
                       self.flops_executed, self.flops_dense, self.request_speedup):
            family.labels(m)
        for reason in FINISH_REASONS:
            self.request_success.labels(m, reason)
        for axis in AXES:
            self.flops_saved.labels(m, axis)
            self.seconds_saved.labels(m, axis)
        self.exit_layer.labels(m, "depth")
        for family in (self.draft_tokens_proposed, self.draft_tokens_accepted, self.speculative_verify_steps,
                       self.draft_flops):
            family.labels(m, "depth")
        for family in (self.prompt_tokens_dropped, self.kv_slots_evicted, self.kv_bytes_saved):
            family.labels(m, "length")

    def request(self, num_choices: int) -> RequestTimer:
        """A timer for one engine request of the HTTP request being served."""
        return RequestTimer(self, request_arrival(), num_choices)

    def render(self) -> bytes:
        """The series in Prometheus text format: this registry, or every worker's files when
        `PROMETHEUS_MULTIPROC_DIR` is set."""
        for hook in self.scrape_hooks:
            hook()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


    def close(self) -> None:
        """At shutdown: with several workers, this process's live gauges leave the sums (its
        counters stay, so totals never go back)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            mark_process_dead(os.getpid())


class RequestTimer:
    """Latencies and token counts of one engine request, fed its cumulative outputs as they come."""

    def __init__(self, metrics: ServerMetrics, arrival: float, num_choices: int) -> None:
        self.metrics, self.arrival, self.num_choices = metrics, arrival, num_choices
        self.last_time = arrival
        self.num_seen = 0            # output tokens counted so far
        self.admitted = False        # the first output came: the prompt is in

    def output(self, out: RequestOutput) -> None:
        m, model, now = self.metrics, self.metrics.model, time.monotonic()
        if not self.admitted:
            self.admitted = True
            m.prompt_tokens.labels(model).inc(out.num_prompt_tokens)
        if out.num_output_tokens > self.num_seen:
            histogram = m.inter_token_latency if self.num_seen else m.time_to_first_token
            histogram.labels(model).observe(now - self.last_time)
            # Counted as they stream, so a token rate moves during long generations.
            m.generation_tokens.labels(model).inc(out.num_output_tokens - self.num_seen)
            self.num_seen, self.last_time = out.num_output_tokens, now

    def finished(self, out: RequestOutput) -> None:
        m, model = self.metrics, self.metrics.model
        m.e2e_request_latency.labels(model).observe(time.monotonic() - self.arrival)
        m.request_prompt_tokens.labels(model).observe(out.num_prompt_tokens)
        m.request_generation_tokens.labels(model).observe(out.num_output_tokens)
        for output in out.outputs:
            m.request_success.labels(model, output.finish_reason or "abort").inc()
        # Without a plan the engine runs the dense model: a speedup of exactly 1.
        summary = out.pruning
        speedup = summary["dense_flops"] / summary["executed_flops"] if summary.get("executed_flops") else 1.0
        m.request_speedup.labels(model).observe(speedup)

    def aborted(self, last: RequestOutput | None) -> None:
        """The client left (or the server gave up) before the request finished."""
        unfinished = self.num_choices if last is None else sum(o.finish_reason is None for o in last.outputs)
        self.metrics.request_success.labels(self.metrics.model, "abort").inc(unfinished)


class RequestCounterMiddleware:
    """Pure ASGI middleware stamping each request's arrival and counting responses by endpoint and status.

    Pure ASGI (not BaseHTTPMiddleware) so that streaming responses and client-disconnect detection
    pass through untouched, and the arrival stamp (a context variable) reaches the route. Unknown
    paths share the label "other" to bound label cardinality.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, endpoints: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        _arrival.set(time.monotonic())
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
