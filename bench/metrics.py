"""Serving metrics from per-request timelines, with the definitions of vLLM's `bench serve`.

- TTFT: first content chunk arrival - request start.
- ITL: gaps between successive content chunks of one request.
- E2E latency: last content chunk arrival - request start.
- TPOT: (E2E - TTFT) / (output tokens - 1), only for requests with more than one output token.
- Throughputs divide totals of successful requests by the benchmark duration.
- Goodput: successful requests meeting every SLO, per second; a one-token request counts TPOT = 0.
Failed requests add nothing to latencies or token totals; they are counted and their errors kept.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """Timeline of one request as the load generator saw it (times from time.perf_counter, in s)."""

    start_time: float                                        # when the request was sent
    chunk_times: list[float] = field(default_factory=list)   # arrivals of chunks carrying content
    output_tokens: int | None = None     # completion_tokens of the final usage chunk, if sent
    prompt_tokens: int | None = None     # prompt_tokens of the final usage chunk, if sent
    expected_prompt_len: int = 0         # the dataset's prompt length, used when usage is missing
    success: bool = False
    error: str = ""                      # "HTTP 400: {body}" or the exception text
    generated_text: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start_time

    @property
    def e2el(self) -> float:
        return self.chunk_times[-1] - self.start_time

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def num_output_tokens(self) -> int:
        """Tokens from usage (or, without it, counted from the text by the server's tokenizer:
        bench.runner fills `output_tokens` in); else one token per content chunk (a lower bound)."""
        return self.output_tokens if self.output_tokens is not None else len(self.chunk_times)

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else self.expected_prompt_len

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None for a single-token output."""
        n = self.num_output_tokens
        return (self.e2el - self.ttft) / (n - 1) if n > 1 else None


@dataclass
class LatencyStats:
    """One latency metric over the successful requests, in milliseconds."""

    mean_ms: float
    std_ms: float
    median_ms: float
    percentiles_ms: dict[str, float]   # "p90" -> value; keys from percentile_key()

    @classmethod
    def of(cls, values_s: list[float], percentiles: list[float]) -> "LatencyStats":
        """Statistics of `values_s` (seconds); an empty list gives zeros, as vLLM reports."""
        data = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
        return cls(
            mean_ms=float(np.mean(data)),
            std_ms=float(np.std(data)),
            median_ms=float(np.median(data)),
            percentiles_ms={percentile_key(p): float(np.percentile(data, p)) for p in percentiles},
        )


@dataclass
class BenchmarkSummary:
    duration_s: float
    num_requests: int
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float          # completed requests / s
    output_throughput: float           # output tokens / s
    total_token_throughput: float      # (input + output tokens) / s
    request_goodput: float | None      # requests meeting all SLOs / s; None without SLOs
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    errors: dict[str, int]             # error message -> number of failed requests with it


def percentile_key(p: float) -> str:
    """Name of a percentile in reports: 99 -> "p99", 99.9 -> "p99.9"."""
    return f"p{p:g}"


def parse_goodput(items: list[str]) -> dict[str, float]:
    """Parse ["ttft:500", "tpot:50"] into SLOs in milliseconds; raise ValueError on bad input."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"goodput SLO {item!r} must look like NAME:MS with NAME in {', '.join(GOODPUT_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: {value!r} is not a number of milliseconds") from None
        if ms < 0:
            raise ValueError(f"goodput SLO {item!r} must not be negative")
        slos[name] = ms
    return slos


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """Whether a successful request meets every SLO (a one-token output has TPOT 0)."""
    values_s = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.e2el}
    return all(values_s[name] * 1000.0 <= limit for name, limit in slos_ms.items())


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    percentiles: list[float] = (50.0, 90.0, 99.0),
    goodput_slos_ms: dict[str, float] | None = None,
) -> BenchmarkSummary:
    """Aggregate request timelines of one benchmark run lasting `duration_s` seconds."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    total_input = sum(r.num_prompt_tokens for r in ok)
    total_output = sum(r.num_output_tokens for r in ok)
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    itls = [gap for r in ok for gap in r.itl]
    goodput = None
    if goodput_slos_ms:
        goodput = sum(meets_slos(r, goodput_slos_ms) for r in ok) / duration_s
    percentiles = list(percentiles)
    return BenchmarkSummary(
        duration_s=duration_s,
        num_requests=len(records),
        completed=len(ok),
        failed=len(failed),
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=len(ok) / duration_s,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        request_goodput=goodput,
        ttft=LatencyStats.of([r.ttft for r in ok], percentiles),
        tpot=LatencyStats.of(tpots, percentiles),
        itl=LatencyStats.of(itls, percentiles),
        e2el=LatencyStats.of([r.e2el for r in ok], percentiles),
        errors=dict(Counter(r.error for r in failed)),
    )
