"""The dashboard and the alert rules against a real Prometheus scraping a real Trident server.

Trident (tiny model, a plan that drops a layer and narrows another, a KV cache small enough to
preempt) and Prometheus (Debian's package; installed here when missing, as root) run on loopback.
Traffic exercises every series: finish reasons stop, length and abort, 4xx errors, a waiting
queue, preemptions, per-axis savings. Then every PromQL expression of the dashboard and of the
alert rules must return a result through Prometheus's HTTP API, and every metric they name must
be one that Trident exported. The run's data is drawn into a PNG (deploy/render_dashboard.py):
set TRIDENT_DASHBOARD_PNG to keep it, e.g. as deploy/dashboard.png.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from deploy import render_dashboard
from trident.engine.loader import load_checkpoint
from trident.engine.pruning.plan import LayerPlan, PruningPlan
from tests.test_server import MODEL_NAME, REPO_ROOT, RemoteServer, free_port

DEPLOY = REPO_ROOT / "deploy"
TRAFFIC_SECONDS = 25
# Metric names in PromQL: Trident's all start with `trident:` or `trident_`.
METRIC_NAME = re.compile(r"\btrident[:_][A-Za-z0-9_:]*")


def ensure_prometheus() -> str:
    """The `prometheus` binary; installs Debian's package when it is missing and we are root."""
    found = shutil.which("prometheus")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("no `prometheus` on PATH, and Debian's package needs apt-get as root to install")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "-q", "prometheus"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "prometheus"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if command[1] == "install" and result.returncode == 0:
            break
    found = shutil.which("prometheus")
    if not found:
        pytest.skip(f"could not install Debian's prometheus package: {result.stderr.strip()[-500:]}")
    return found


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def as_bool(expr: str) -> str:
    """An alert expression whose comparisons keep every series (0 or 1) instead of filtering:
    a rule that does not fire must still show that its query has data."""
    return re.sub(r"(?<![=!<>~])(>=|<=|==|!=|>|<)(?![=~])\s*", r"\1 bool ", expr)


class PrometheusServer:
    """`prometheus` on a free loopback port, scraping `target` every second, with deploy/alerts.yml."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(DEPLOY / "alerts.yml")],
                  "scrape_configs": [{"job_name": "trident", "static_configs": [{"targets": [target]}]}]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_file = workdir / "prometheus.log"
        with open(self.log_file, "w") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_file.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready after 60 s:\n{self.log_file.read_text()[-3000:]}")

    def api(self, path: str, **params):
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        assert body["status"] == "success", (params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def traffic(url: str, vocab_size: int, seconds: float) -> None:
    """Rounds of concurrent requests until `seconds` have passed: more than the running batch
    holds (a waiting queue), long enough to fill the KV cache (preemptions), with each finish
    reason and some client errors."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    http = httpx.AsyncClient(base_url=url, timeout=60)

    async def abandoned_stream() -> None:
        async with http.stream("POST", "/v1/completions", json={"prompt": "A stream left early", "max_tokens": 200,
                                                                 "ignore_eos": True, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break

    deadline = time.monotonic() + seconds
    round_index = 0
    while time.monotonic() < deadline:
        round_index += 1
        jobs = [client.completions.create(model=MODEL_NAME, prompt=f"Round {round_index}, request {i}: once upon",
                                          max_tokens=80, temperature=0, extra_body={"ignore_eos": True})
                for i in range(6)]
        jobs.append(client.completions.create(model=MODEL_NAME, prompt="Stop at once", max_tokens=20,
                                              extra_body={"stop_token_ids": list(range(vocab_size))}))
        jobs.append(client.chat.completions.create(model=MODEL_NAME, max_tokens=16,
                                                   messages=[{"role": "user", "content": "Hello there"}]))
        jobs.append(abandoned_stream())
        jobs.append(http.post("/v1/completions", json={"prompt": []}))                        # 400
        jobs.append(http.post("/v1/completions", json={"model": "nope", "prompt": "x"}))      # 404
        results = await asyncio.gather(*jobs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors
    await http.aclose()
    await client.close()


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    binary = ensure_prometheus()
    workdir = tmp_path_factory.mktemp("monitoring")
    config = load_checkpoint(str(tiny_model_dir)).config
    plan = PruningPlan.dense(config)
    plan.layers[3].keep = False
    plan.layers[1] = LayerPlan(kept_q_heads=[0, 1], kept_ffn_channels=list(range(48)))
    plan.name = "monitoring-test"
    plan.save(workdir / "plan.json")
    # 16 blocks of 16 tokens: four sequences of ~90 tokens do not fit, so some get preempted.
    trident = RemoteServer(tiny_model_dir, workdir / "trident.log", "--plan", str(workdir / "plan.json"),
                           "--max-num-seqs", "4", "--num-kv-blocks", "16", "--max-model-len", "256")
    prometheus = PrometheusServer(binary, trident.url.removeprefix("http://"), workdir)
    start = time.time()
    try:
        asyncio.run(traffic(trident.url, config.vocab_size, TRAFFIC_SECONDS))
        time.sleep(3)        # a few more scrapes and rule evaluations
        yield trident, prometheus, start, workdir
    finally:
        prometheus.stop()
        trident.stop()


def test_every_dashboard_query_returns_data(stack):
    _, prometheus, _, _ = stack
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    expressions = render_dashboard.expressions(dashboard)
    assert len(expressions) >= 20
    empty = [e for e in expressions if not prometheus.query(render_dashboard.expand(e, MODEL_NAME, "1m"))]
    assert not empty, f"queries without a result: {empty}"


def test_alert_rules_evaluate_and_have_data(stack):
    _, prometheus, _, _ = stack
    rules = alert_rules()
    assert len(rules) == 3
    for rule in rules:
        assert prometheus.query(as_bool(rule["expr"])), f"{rule['alert']}: no data for {as_bool(rule['expr'])}"
    evaluated = {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"]}
    for rule in rules:
        state = evaluated[rule["alert"]]
        assert state["health"] == "ok", state


def test_queries_name_only_exported_metrics(stack):
    _, prometheus, _, _ = stack
    exported = set(prometheus.api("label/__name__/values"))
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    named = {name for expr in [*render_dashboard.expressions(dashboard), *(r["expr"] for r in alert_rules())]
             for name in METRIC_NAME.findall(expr)}
    assert named and not named - exported, f"not exported by Trident: {sorted(named - exported)}"


def test_traffic_moved_every_serving_and_pruning_series(stack):
    _, prometheus, _, _ = stack
    m = f'{{model_name="{MODEL_NAME}"}}'
    window = f"[{TRAFFIC_SECONDS + 30}s]"
    for reason in ("stop", "length", "abort"):
        selector = f'{{model_name="{MODEL_NAME}",finished_reason="{reason}"}}'
        assert prometheus.value(f"max(trident:request_success_total{selector})") > 0, reason
    assert prometheus.value(f"max_over_time(trident:num_requests_waiting{m}{window})") > 0
    assert prometheus.value(f"max_over_time(trident:num_requests_running{m}{window})") > 0
    assert prometheus.value(f"max_over_time(trident:kv_cache_usage_perc{m}{window})") > 0.5
    assert prometheus.value(f"max(trident:num_preemptions_total{m})") > 0
    for axis in ("depth", "width"):
        assert prometheus.value(f'max(trident:flops_saved_total{{axis="{axis}",model_name="{MODEL_NAME}"}})') > 0
        assert prometheus.value(f'max(trident:seconds_saved_total{{axis="{axis}",model_name="{MODEL_NAME}"}})') > 0
    assert prometheus.value(f'max(trident:flops_saved_total{{axis="length",model_name="{MODEL_NAME}"}})') == 0
    assert prometheus.value(f"histogram_quantile(0.5, sum by (le) (trident:request_speedup_over_dense_bucket{m}))") > 1
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                      "request_prompt_tokens", "request_generation_tokens", "iteration_tokens_total"):
        assert prometheus.value(f"max(trident:{histogram}_count{m})") > 0, histogram
    assert prometheus.value('sum(trident_http_requests_total{status="400"})') > 0
    info = prometheus.query(f"trident:pruning_plan_info{m}")
    assert info and info[0]["metric"]["name"] == "monitoring-test" and info[0]["metric"]["profile"] == "file"


def test_dashboard_picture_renders_from_the_run(stack):
    _, prometheus, start, workdir = stack
    out = Path(os.environ.get("TRIDENT_DASHBOARD_PNG") or workdir / "dashboard.png")
    render_dashboard.render(prometheus.url, MODEL_NAME, start, time.time(), out, rate_interval="10s")
    assert out.stat().st_size > 50_000
