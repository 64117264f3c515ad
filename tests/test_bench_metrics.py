"""Serving metric arithmetic on synthetic timelines, against hand-computed values."""
import math

import numpy as np
import pytest

from trident.bench.metrics import RequestRecord, parse_goodput, percentile_key, summarize
from trident.bench.runner import arrival_offsets
from trident.bench.serve import parse_percentiles, recorded_command


def _records() -> list[RequestRecord]:
    return [
        # TTFT 0.1, E2E 0.6, ITL 0.2 and 0.3, TPOT (0.6 - 0.1) / (5 - 1) = 0.125
        RequestRecord(start_time=0.0, chunk_times=[0.1, 0.3, 0.6], output_tokens=5, expected_prompt_len=7,
                      success=True),
        # one output token: TTFT = E2E = 0.5, no ITL, no TPOT
        RequestRecord(start_time=1.0, chunk_times=[1.5], output_tokens=1, prompt_tokens=3, success=True),
        # TTFT 0.2, E2E 0.3, ITL 0.1, TPOT 0.1
        RequestRecord(start_time=2.0, chunk_times=[2.2, 2.3], output_tokens=2, prompt_tokens=10, success=True),
        RequestRecord(start_time=2.5, expected_prompt_len=99, error="HTTP 400: too long"),
    ]


def test_per_request_timeline():
    first = _records()[0]
    assert first.ttft == pytest.approx(0.1)
    assert first.e2el == pytest.approx(0.6)
    assert first.itl == pytest.approx([0.2, 0.3])
    assert first.tpot == pytest.approx(0.125)
    assert _records()[1].tpot is None


def test_summary_counts_and_throughput():
    s = summarize(_records(), duration_s=4.0)
    assert (s.num_requests, s.completed, s.failed) == (4, 3, 1)
    assert s.total_input_tokens == 7 + 3 + 10          # the failed request's 99 is not counted
    assert s.total_output_tokens == 5 + 1 + 2
    assert s.request_throughput == pytest.approx(3 / 4)
    assert s.output_throughput == pytest.approx(8 / 4)
    assert s.total_token_throughput == pytest.approx(28 / 4)
    assert s.request_goodput is None
    assert s.errors == {"HTTP 400: too long": 1}


def test_summary_latency_statistics():
    s = summarize(_records(), duration_s=4.0, percentiles=[50, 90, 99])
    # TTFT over [100, 500, 200] ms; numpy's linear percentile: p90 at rank 1.8 -> 200 + 0.8 * 300
    assert s.ttft.mean_ms == pytest.approx(800 / 3)
    assert s.ttft.median_ms == pytest.approx(200)
    assert s.ttft.percentiles_ms == pytest.approx({"p50": 200, "p90": 440, "p99": 494})
    assert s.ttft.std_ms == pytest.approx(np.std([100, 500, 200]))
    # TPOT over [125, 100] ms (the one-token request is excluded)
    assert s.tpot.mean_ms == pytest.approx(112.5)
    assert s.tpot.percentiles_ms["p90"] == pytest.approx(122.5)
    # ITL over [200, 300, 100] ms
    assert s.itl.mean_ms == pytest.approx(200)
    assert s.itl.percentiles_ms["p90"] == pytest.approx(280)
    # E2E over [600, 500, 300] ms
    assert s.e2el.mean_ms == pytest.approx(1400 / 3)
    assert s.e2el.median_ms == pytest.approx(500)
    assert s.e2el.percentiles_ms["p99"] == pytest.approx(598)


def test_goodput_requires_every_slo():
    records = _records()
    # TTFT <= 300 ms: requests 1 and 3
    assert summarize(records, 4.0, goodput_slos_ms={"ttft": 300}).request_goodput == pytest.approx(2 / 4)
    # TPOT <= 110 ms: request 1 (125) fails; request 2 has one token and counts TPOT 0
    assert summarize(records, 4.0, goodput_slos_ms={"tpot": 110}).request_goodput == pytest.approx(2 / 4)
    assert summarize(records, 4.0, goodput_slos_ms={"ttft": 300, "tpot": 110}).request_goodput == pytest.approx(1 / 4)
    assert summarize(records, 4.0, goodput_slos_ms={"e2el": 550}).request_goodput == pytest.approx(2 / 4)


def test_output_tokens_fall_back_to_chunks_without_usage():
    record = RequestRecord(start_time=0.0, chunk_times=[1.0, 2.0, 4.0], success=True)
    assert record.num_output_tokens == 3
    assert record.tpot == pytest.approx(1.5)


def test_all_failed_reports_zeros():
    s = summarize([RequestRecord(0.0, error="boom"), RequestRecord(0.0, error="boom")], 1.0)
    assert (s.completed, s.failed, s.errors) == (0, 2, {"boom": 2})
    assert s.ttft.mean_ms == 0 and s.itl.percentiles_ms["p99"] == 0 and s.output_throughput == 0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        summarize(_records(), duration_s=0.0)
    with pytest.raises(ValueError, match="NAME:MS"):
        parse_goodput(["latency:5"])
    with pytest.raises(ValueError, match="number"):
        parse_goodput(["ttft:fast"])
    with pytest.raises(ValueError):
        parse_percentiles("50,101")
    assert parse_goodput(["ttft:500", "e2el:2e3"]) == {"ttft": 500.0, "e2el": 2000.0}
    assert parse_percentiles("50, 99.9") == [50.0, 99.9]
    assert percentile_key(99.9) == "p99.9" and percentile_key(90.0) == "p90"


def test_arrival_offsets():
    rng = np.random.default_rng(0)
    assert arrival_offsets(4, math.inf, 1.0, rng) == [0.0] * 4
    assert arrival_offsets(0, 2.0, 1.0, rng) == []
    offsets = arrival_offsets(20001, 4.0, 1.0, np.random.default_rng(1))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)       # mean gap = 1 / rate
    assert gaps.std() == pytest.approx(0.25, rel=0.05)        # Poisson: std = mean
    bursty = np.diff(arrival_offsets(20001, 4.0, 0.25, np.random.default_rng(1)))
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)     # same rate ...
    assert bursty.std() == pytest.approx(0.5, rel=0.05)       # ... gamma shape k: std = mean / sqrt(k)
    assert arrival_offsets(5, 3.0, 1.0, np.random.default_rng(7)) == arrival_offsets(5, 3.0, 1.0, np.random.default_rng(7))


def test_recorded_command_hides_the_api_key():
    assert recorded_command("serve", ["--api-key", "s3cret", "--api-key=x", "--seed", "1"]) == [
        "trident", "bench", "serve", "--api-key", "***", "--api-key=***", "--seed", "1"]
