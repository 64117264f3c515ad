"""Monitoring without a Prometheus: the series /metrics exports, the engine observer, several
worker processes, the dashboard generator, the alert rules and the compose stack's files.
(tests/test_monitoring_prometheus.py runs the dashboard and the rules against a real Prometheus.)"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deploy import render_dashboard
from trident.engine.config import CacheConfig, EngineConfig
from trident.engine.llm_engine import LLMEngine
from trident.engine.sampling_params import SamplingParams
from trident.server.engine_stats import EngineStats
from trident.server.metrics import ServerMetrics, one_two_five
from tests.test_monitoring_prometheus import DEPLOY, METRIC_NAME, alert_rules, ensure_prometheus
from tests.test_server import REPO_ROOT

PLAN = {"name": "p", "profile": "file", "checkpoint_digest": "abc"}


def samples(metrics: ServerMetrics) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of what /metrics would answer."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(found: dict, sample: str, **labels) -> float:
    return found[sample][tuple(sorted({"model_name": "m", **labels}.items()))]


def test_every_series_exists_at_zero_once_bound():
    metrics = ServerMetrics()
    assert not any(name.startswith("trident:") for name in samples(metrics))     # no model yet
    metrics.bind("m", max_model_len=100, num_layers=4, plan_info=PLAN)
    found = samples(metrics)
    for axis in ("depth", "width", "length"):
        assert value(found, "trident:flops_saved_total", axis=axis) == 0
        assert value(found, "trident:seconds_saved_total", axis=axis) == 0
    assert value(found, "trident:prompt_tokens_dropped_total", axis="length") == 0
    assert value(found, "trident:kv_slots_evicted_total", axis="length") == 0
    assert value(found, "trident:draft_tokens_accepted_total", axis="depth") == 0
    assert value(found, "trident:exit_layer_count", axis="depth") == 0
    assert value(found, "trident:exit_layer_bucket", axis="depth", le="4.0") == 0
    for reason in ("stop", "length", "abort"):
        assert value(found, "trident:request_success_total", finished_reason=reason) == 0
    assert value(found, "trident:pruning_plan_info", name="p", profile="file", checkpoint_digest="abc") == 1
    assert value(found, "trident:request_prompt_tokens_bucket", le="100.0") == 0
    assert one_two_five(100) == (1, 2, 5, 10, 20, 50, 100)


def test_each_served_plan_exports_its_weight_bytes():
    metrics = ServerMetrics()
    metrics.bind("m", max_model_len=100, num_layers=4, plan_info=PLAN,
                 plan_weights={"balanced": 5_000_000, "aggressive": 1_200_000})
    found = samples(metrics)
    assert value(found, "trident:plan_weight_bytes", plan="balanced") == 5_000_000
    assert value(found, "trident:plan_weight_bytes", plan="aggressive") == 1_200_000


def test_dashboard_and_alerts_name_only_exported_series():
    metrics = ServerMetrics()
    metrics.bind("m", max_model_len=100, num_layers=4, plan_info=PLAN)
    metrics.http_requests.labels(endpoint="/health", status="200").inc()
    exported = set(samples(metrics))
    queries = [*render_dashboard.expressions(json.loads((DEPLOY / "grafana-dashboard.json").read_text())),
               *(rule["expr"] for rule in alert_rules())]
    named = {name for q in queries for name in METRIC_NAME.findall(q)}
    assert len(named) > 20 and not named - exported, sorted(named - exported)


@pytest.fixture(scope="module")
def observed(tiny_model_dir):
    """A real engine on the tiny model, observed by EngineStats, that ran two requests."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", cache=CacheConfig(num_blocks=64)))
    metrics = ServerMetrics()
    EngineStats.attach(metrics, SimpleNamespace(engine=engine, num_waiting=0), "m")
    engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.add_request("b", [6, 7, 8], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    num_steps = 0
    while engine.has_unfinished_requests():
        if num_steps == 2:   # counters the length and depth work will add to FlopCount, read as they appear
            engine.total_flops.prompt_tokens_dropped = 7
            engine.total_flops.exit_layer_tokens = {2: 3, 4: 1}
        engine.step()
        num_steps += 1
    return engine, metrics, num_steps


def test_engine_stats_follow_the_engine(observed):
    engine, metrics, num_steps = observed
    found = samples(metrics)
    for histogram in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert value(found, f"trident:{histogram}_count") == 2, histogram
    assert value(found, "trident:iteration_tokens_total_count") == num_steps
    assert value(found, "trident:iteration_tokens_total_sum") == 5 + 3 + (4 - 1) + (6 - 1)
    flops = engine.total_flops
    assert value(found, "trident:flops_executed_total") == pytest.approx(flops.executed)
    assert value(found, "trident:flops_dense_total") == pytest.approx(flops.dense)
    assert value(found, "trident:engine_busy_seconds_total") == pytest.approx(engine.busy_seconds)
    assert value(found, "trident:prompt_tokens_dropped_total", axis="length") == 7
    assert value(found, "trident:kv_slots_evicted_total", axis="length") == 0
    assert value(found, "trident:exit_layer_count", axis="depth") == 4
    assert value(found, "trident:exit_layer_bucket", axis="depth", le="2.0") == 3
    assert value(found, "trident:exit_layer_sum", axis="depth") == 2 * 3 + 4
    assert value(found, "trident:num_requests_running") == 0
    assert value(found, "trident:kv_cache_usage_perc") == 0


def test_several_worker_processes_add_up(tmp_path):
    """prometheus_client's multiprocess mode: counters sum over workers, live gauges over live ones,
    and a worker that stopped keeps its counts."""
    worker = textwrap.dedent("""
        import sys
        from trident.server.metrics import ServerMetrics
        m = ServerMetrics()
        m.bind("m", max_model_len=100, num_layers=4, plan_info={"name": "p", "profile": "file",
                                                               "checkpoint_digest": "abc"})
        m.generation_tokens.labels("m").inc(3)
        m.num_requests_running.labels("m").set(2)
        if sys.argv[1] == "stops":
            m.close()
    """)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for mode in ("stops", "stays", "stays"):
        subprocess.run([sys.executable, "-c", worker, mode], env=env, cwd=REPO_ROOT, check=True, timeout=60)
    scrape = "from trident.server.metrics import ServerMetrics; print(ServerMetrics().render().decode())"
    text = subprocess.run([sys.executable, "-c", scrape], env=env, cwd=REPO_ROOT, check=True, timeout=60,
                          capture_output=True, text=True).stdout
    assert re.search(r'^trident:generation_tokens_total\{model_name="m"\} 9\.0$', text, re.M), text
    # The gauges of the worker that stopped left the sum; those of the two still "running" stay.
    assert re.search(r'^trident:num_requests_running\{model_name="m"\} 4\.0$', text, re.M), text


def generator():
    """deploy/dashboard.py; its builder library, grafana-foundation-sdk, needs Python 3.11+."""
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk needs Python 3.11+")
    from deploy import dashboard
    return dashboard


def test_dashboard_json_is_what_the_generator_builds():
    dashboard = generator()
    assert (DEPLOY / "grafana-dashboard.json").read_text() == dashboard.render()


def test_dashboard_is_templated_on_data_source_and_model():
    board = generator().build()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "model_name" in variables["model_name"]["query"]
    titles = [p["title"] for p in render_dashboard.panels(board)]
    assert len(titles) == len(set(titles)) >= 17
    for panel in render_dashboard.panels(board):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            # The HTTP counter is per process, not per model: the error-rate panel alone reads it.
            if "trident:" in target["expr"]:
                assert 'model_name="$model_name"' in target["expr"], target["expr"]
            assert "group_left (" not in target["expr"]


def test_promtool_accepts_the_rules_and_the_config_and_the_rules_fire_as_tested():
    ensure_prometheus()
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"],
                 ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run(["promtool", *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_compose_stack_files_fit_together():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"trident", "prometheus", "grafana"}
    build = services["trident"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    mounts = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} is missing"
                mounts[target] = (DEPLOY / source).resolve()
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
    # Prometheus scrapes the trident service on the port it serves, with the rule file next to its config.
    command = services["trident"]["command"]
    port = command[command.index("--port") + 1]
    prometheus = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == [f"trident:{port}"]
    assert mounts["/etc/prometheus/" + prometheus["rule_files"][0]] == (DEPLOY / "alerts.yml").resolve()
    # Grafana: the provisioned data source is the prometheus service; the dashboard provider reads the mounted JSON.
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "trident.yml").read_text())["providers"]
    dashboards = [t for t, path in mounts.items() if path == (DEPLOY / "grafana-dashboard.json").resolve()]
    assert dashboards and dashboards[0].rsplit("/", 1)[0] == provider["options"]["path"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dashboards[0]
