"""A server started with a pruning plan reports usage.pruning and per-axis savings in /metrics."""
from __future__ import annotations

import re

import httpx
import openai
import pytest

from trident.engine.loader import load_checkpoint
from trident.engine.pruning.plan import ExitPoint, LayerPlan, PruningPlan
from tests.test_server import MODEL_NAME, REPO_ROOT, RemoteServer, free_port


@pytest.fixture(scope="module")
def pruned_server(tiny_model_dir, tmp_path_factory):
    config = load_checkpoint(str(tiny_model_dir)).config
    plan = PruningPlan.dense(config)
    plan.layers[3].keep = False
    # An exit whose probe scores 0.5 everywhere: the plan's threshold never fires, a request's 0 always does.
    plan.layers[1] = LayerPlan(kept_q_heads=[0, 1], kept_ffn_channels=list(range(48)),
                               exit=ExitPoint(threshold=0.9, probe_weight=[0.0] * config.hidden_size))
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
    samples = [line.rsplit(" ", 1) for line in httpx.get(f"{pruned_server.url}/metrics").text.splitlines()
               if line.startswith("trident:") and f'model_name="{MODEL_NAME}"' in line]

    def total(name: str) -> float:
        return sum(float(value) for key, value in samples if key.startswith(name + "{"))

    def per_axis(name: str) -> dict[str, float]:
        found = {re.search(r'axis="(\w+)"', key).group(1): float(value)
                 for key, value in samples if key.startswith(name + "{")}
        return {axis: found.get(axis, 0.0) for axis in ("depth", "width", "length")}

    flops, seconds = per_axis("trident:flops_saved_total"), per_axis("trident:seconds_saved_total")
    assert sum(flops.values()) == pytest.approx(total("trident:flops_dense_total") - total("trident:flops_executed_total"))
    assert flops["depth"] > 0 and flops["width"] > 0 and flops["length"] == 0
    assert seconds["depth"] > 0 and seconds["width"] > 0 and seconds["length"] == 0


def test_a_request_chooses_its_exit_threshold(pruned_server):
    url = f"{pruned_server.url}/v1/completions"
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(url, json=body).json()["usage"]["pruning"]["early_exit"]
    assert plain["tokens_exited"] == 0 and plain["checks"] == 5
    forced = httpx.post(url, json={**body, "pruning": {"exit_threshold": 0}}).json()["usage"]["pruning"]["early_exit"]
    assert forced["exits_after_layers"] == {"2": 5}
    assert httpx.post(url, json={**body, "pruning": {"early_exit": False}}).json()["usage"]["pruning"]["early_exit"] \
        == {"tokens_exited": 0, "exits_after_layers": {}, "checks": 0, "classifier_and_fill_flops": 0.0}
    r = httpx.post(url, json={**body, "pruning": {"exit_threshold": 3}})
    assert r.status_code == 400 and "exit_threshold must be in [0, 1]" in r.json()["error"]["message"]
    metrics = httpx.get(f"{pruned_server.url}/metrics").text
    count = re.search(r'trident:exit_layer_count\{[^}]*\} (\S+)', metrics)
    assert count and float(count.group(1)) >= 5


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


LONG_PROMPT = ("Once upon a time there was a dragon who liked to read books in the library. The quick brown fox "
               "jumps over the lazy dog. Write a short poem about the sea. Explain why the sky is blue.")


def test_the_pruning_object_is_honoured_per_request(pruned_server):
    """`pruning` changes what runs for that request only, and usage.pruning says what ran."""
    client = openai.OpenAI(base_url=f"{pruned_server.url}/v1", api_key="unused", max_retries=0)
    body = {"pruning": {"kv_budget": 8, "prefill_keep": [[0, 0.5]]}}
    pruned = client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT, max_tokens=12, temperature=0,
                                       extra_body=body)
    length = pruned.usage.model_extra["pruning"]["length"]
    assert length["prompt_tokens_dropped"] > 0 and length["kv_slots_evicted"] > 0 and length["kv_bytes_saved"] > 0
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": LONG_PROMPT}],
                                          max_tokens=6, temperature=0, extra_body={"pruning": {"prefill_keep": 0.5}})
    assert chat.usage.model_extra["pruning"]["length"]["prompt_tokens_dropped"] > 0
    plain = client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT, max_tokens=12, temperature=0)
    assert plain.usage.model_extra["pruning"]["length"]["kv_slots_evicted"] == 0
    text = httpx.get(f"{pruned_server.url}/metrics").text
    series = lambda name: [float(l.split()[-1]) for l in text.splitlines()
                           if l.startswith(f'trident:{name}_total{{') and 'axis="length"' in l]
    assert series("flops_saved") and series("flops_saved")[0] != 0
    assert series("prompt_tokens_dropped")[0] >= length["prompt_tokens_dropped"] > 0
    assert series("kv_slots_evicted")[0] >= length["kv_slots_evicted"] > 0
    assert series("kv_bytes_saved")[0] > 0


@pytest.mark.parametrize("pruning, message", [
    ({"kv_budgett": 8}, "kv_budgett"),
    ({"kv_budget": "8"}, "kv_budget"),
    ({"kv_budget": 2}, "at least"),
    ({"prefill_keep": 1.5}, "fraction"),
    ({"prefill_keep": [[99, 0.5]]}, "layer"),
    ({"prefill_keep": [[3, 0.5]]}, "dropped by the plan"),
    ({"profile": "aggressive"}, "not served here"),
    ("balanced", "pruning"),
])
def test_bad_pruning_objects_get_a_400_naming_the_problem(pruned_server, pruning, message):
    for path, body in (("/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})):
        reply = httpx.post(f"{pruned_server.url}{path}", json={**body, "pruning": pruning}, timeout=30)
        assert reply.status_code == 400, reply.text
        assert message in reply.json()["error"]["message"], reply.text


@pytest.fixture(scope="module")
def speculative_server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("speculative") / "server.log"
    server = RemoteServer(tiny_model_dir, log, "--speculative-draft", "1,2", "--num-draft-tokens", "2")
    yield server
    server.stop()


def test_speculative_server_streams_what_dense_greedy_emits(speculative_server):
    client = openai.OpenAI(base_url=f"{speculative_server.url}/v1", api_key="unused")
    base = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=24, temperature=0)
    dense = client.completions.create(**base, extra_body={"ignore_eos": True, "pruning": {"speculative": False}})
    assert "pruning" not in (dense.usage.model_extra or {})
    stream = client.completions.create(**base, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True, "pruning": {"num_draft_tokens": 4}})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == dense.choices[0].text
    spec = [c.usage for c in chunks if c.usage is not None][-1].model_extra["pruning"]["speculative"]
    assert spec["draft_tokens"] > 0 and 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]
    assert spec["verify_steps"] > 0 and spec["acceptance_rate"] == pytest.approx(
        spec["accepted_tokens"] / spec["draft_tokens"])
    metrics = httpx.get(f"{speculative_server.url}/metrics").text
    proposed = re.search(r'trident:draft_tokens_proposed_total\{[^}]*axis="depth"[^}]*\} (\S+)', metrics)
    assert proposed and float(proposed.group(1)) >= spec["draft_tokens"]
    assert re.search(r'trident:speculative_verify_steps_total\{[^}]*\} [1-9]', metrics)


@pytest.mark.parametrize("pruning, message", [
    ({"num_draft_tokens": 99}, "num_draft_tokens must be in"),
    ({"speculative": "yes"}, "speculative"),
    ({"speculative": True, "kv_budget": 64}, "length pruning"),
])
def test_speculative_fields_that_cannot_run_are_400(speculative_server, pruning, message):
    r = httpx.post(f"{speculative_server.url}/v1/completions",
                   json={"prompt": "hi", "max_tokens": 2, "pruning": pruning})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_one_server_serves_several_plans_chosen_per_request(tiny_model_dir, tmp_path):
    config = load_checkpoint(str(tiny_model_dir)).config
    paths = []
    for name, drop in (("wide", None), ("shallow", 2)):
        plan = PruningPlan.dense(config)
        plan.name = name
        if drop is not None:
            plan.layers[drop].keep = False
        paths.append(tmp_path / f"{name}.json")
        plan.save(paths[-1])
    server = RemoteServer(tiny_model_dir, tmp_path / "server.log", "--plans", ",".join(map(str, paths)))
    try:
        def complete(pruning=None):
            body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
            if pruning is not None:
                body["pruning"] = pruning
            return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)

        default, shallow = complete(), complete({"profile": "shallow"})
        assert default.status_code == 200 and shallow.status_code == 200
        # The shallow plan skips a layer: its request ran fewer layers per token than the default's.
        assert shallow.json()["usage"]["pruning"]["layers_per_token"] < default.json()["usage"]["pruning"]["layers_per_token"]
        refused = complete({"profile": "narrow"})
        assert refused.status_code == 400 and "served plans: ['wide', 'shallow']" in refused.text
        metrics = httpx.get(f"{server.url}/metrics").text
        for name in ("wide", "shallow"):
            assert re.search(rf'trident:plan_weight_bytes{{[^}}]*plan="{name}"[^}}]*}} [1-9]', metrics), name
    finally:
        server.stop()
