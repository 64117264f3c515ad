"""A server started with a pruning plan reports usage.pruning and per-axis savings in /metrics."""
from __future__ import annotations

import httpx
import openai
import pytest

from trident.engine.loader import load_checkpoint
from trident.engine.pruning.plan import LayerPlan, PruningPlan
from tests.test_server import MODEL_NAME, REPO_ROOT, RemoteServer, free_port


@pytest.fixture(scope="module")
def pruned_server(tiny_model_dir, tmp_path_factory):
    config = load_checkpoint(str(tiny_model_dir)).config
    plan = PruningPlan.dense(config)
    plan.layers[3].keep = False
    plan.layers[1] = LayerPlan(kept_q_heads=[0, 1], kept_ffn_channels=list(range(48)))
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.save(path)
    server = RemoteServer(tiny_model_dir, path.with_suffix(".log"), "--plan", str(path))
    yield server
    server.stop()


def test_usage_carries_pruning_and_metrics_split_savings(pruned_server):
    client = openai.OpenAI(base_url=f"{pruned_server.url}/v1", api_key="unused")
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=5, temperature=0)
    pruning = chat.usage.model_extra["pruning"]
    assert pruning["executed_flops"] < pruning["dense_flops"]
    assert pruning["saved_fraction"]["depth"] > 0 and pruning["saved_fraction"]["width"] > 0
    assert pruning["saved_fraction"]["length"] == 0
    stream = client.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=4, stream=True,
                                       stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert usage.model_extra["pruning"]["total_saved_fraction"] > 0
    # /metrics splits the savings by axis: FLOPs saved per axis add up to dense minus executed, and
    # the seconds attributed to each axis (by FLOP share) are positive exactly where FLOPs were saved.
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in httpx.get(f"{pruned_server.url}/metrics").text.splitlines() if line.startswith("trident_")}
    flops = {axis: samples[f'trident_pruning_saved_flops_total{{axis="{axis}"}}'] for axis in ("depth", "width", "length")}
    seconds = {axis: samples[f'trident_pruning_saved_seconds_total{{axis="{axis}"}}'] for axis in flops}
    assert sum(flops.values()) == pytest.approx(samples["trident_flops_dense_total"] - samples["trident_flops_executed_total"])
    assert flops["depth"] > 0 and flops["width"] > 0 and flops["length"] == 0
    assert seconds["depth"] > 0 and seconds["width"] > 0 and seconds["length"] == 0


def test_bad_plan_fails_fast(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "trident.server", "serve", "--plan", str(tmp_path / "missing.json")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "missing.json" in result.stderr
    no_model = subprocess.run([sys.executable, "-m", "trident.server", "serve", "--model", str(tmp_path / "nowhere")],
                              capture_output=True, text=True, timeout=60)
    assert no_model.returncode == 2 and "neither an existing path nor a known alias" in no_model.stderr


def test_plan_that_does_not_fit_the_model_stops_the_server(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    config = load_checkpoint(str(tiny_model_dir)).config
    plan = PruningPlan.dense(config)
    plan.layers[0] = LayerPlan(kept_q_heads=[0, 9])        # the tiny model has 4 query heads
    plan.save(tmp_path / "plan.json")
    (tmp_path / "broken.json").write_text('{"version": 1, "name": "x", "model": {}, "layers": ["keep"]}')
    serve = [sys.executable, "-m", "trident.server", "serve", "--model", str(tiny_model_dir), "--port", str(free_port())]
    unfit = subprocess.run([*serve, "--plan", str(tmp_path / "plan.json")], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert unfit.returncode == 1
    assert "engine failed to start: PlanError: layer 0: query head 9 is out of range" in unfit.stderr
    malformed = subprocess.run([*serve, "--plan", str(tmp_path / "broken.json")], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=120)
    assert malformed.returncode == 2 and "layer 0: must be an object" in malformed.stderr
