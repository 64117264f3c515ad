"""The soak tool for one minute on the tiny model: hostile mixed load, then the engine back at idle
(no sequence running or waiting, no KV block in use) and RSS within 5% of its size after warm-up."""
from __future__ import annotations

from trident.bench.soak import KINDS, soak


def test_one_minute_soak(tiny_model_dir):
    report = soak(str(tiny_model_dir), minutes=1.0, concurrency=12, seed=0, max_rss_growth=0.05,
                  server_args=["--kv-cache-memory", "16MiB", "--max-num-seqs", "4", "--max-waiting", "10"])
    assert report["problems"] == [], report
    assert report["server_alive"] and report["requests"] > 100
    assert set(report["outcomes"]) == set(KINDS)
    served = sum(counts.get("200", 0) for kind, counts in report["outcomes"].items())
    assert served > 50, report["outcomes"]
