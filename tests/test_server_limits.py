"""Server limits and failure paths: API key (401), full queue (429), client disconnects (abort),
engine loading or failed (503).

One real server runs with `--api-key --max-num-seqs 1 --max-waiting 1`, so a single long request
occupies the engine and a flood overflows the queue. The 503 paths run the app in-process on an
engine that is not started or cannot load its model.
"""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from trident.engine.async_engine import AsyncEngine
from trident.engine.config import EngineConfig
from trident.server.app import build_app
from tests.test_server import MODEL_LABEL, MODEL_NAME, PROMPT, RemoteServer

API_KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ABORTED = f'{{finished_reason="abort",model_name="{MODEL_NAME}"}}'
LONG = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = RemoteServer(tiny_model_dir, tmp_path_factory.mktemp("logs") / "server.log",
                       "--api-key", API_KEY, "--max-num-seqs", "1", "--max-waiting", "1")
    yield srv
    srv.stop()


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).status_code == 401
    bad_json = httpx.post(f"{server.url}/v1/completions", content=b"not json",
                          headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 401                              # the key is checked before the body
    assert httpx.post(f"{server.url}/v1/completions", content=b"not json", headers=AUTH).status_code == 400
    many = httpx.post(f"{server.url}/v1/completions", headers=AUTH, json={"prompt": [[5, 6]] * 3, "max_tokens": 1})
    assert many.status_code == 400 and "at most 1 prompts" in many.json()["error"]["message"]   # --max-waiting 1
    assert httpx.get(f"{server.url}/health").status_code == 200    # open without the key
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    assert good.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3).usage.completion_tokens <= 3


def test_queue_full_is_429(server):
    async def flood():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as aclient:
            return await asyncio.gather(*[
                aclient.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=64,
                                           extra_body={"ignore_eos": True}) for _ in range(6)],
                return_exceptions=True)

    results = asyncio.run(flood())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(refused) + len(served) == 6, results
    assert refused and served
    assert all(r.body["code"] == "queue_full" for r in refused)
    assert all(r.usage.completion_tokens == 64 for r in served)
    assert server.metric("trident_http_requests_total", '{endpoint="/v1/completions",status="429"}') == len(refused)


def _engine_is_free(server, aborted_before: float) -> bool:
    """The server counted the abort, and the engine itself let go: no sequence running or waiting,
    every KV block back in the free list (what /health reads from the scheduler and block manager)."""
    load = httpx.get(f"{server.url}/health").json()
    return (server.metric("trident:request_success_total", ABORTED) == aborted_before + 1
            and server.metric("trident:num_requests_running", MODEL_LABEL) == 0
            and (load["running"], load["waiting"], load["kv_blocks_used"]) == (0, 0, 0))


def test_stream_disconnect_aborts(server):
    aborted = server.metric("trident:request_success_total", ABORTED)
    tokens = server.metric("trident:generation_tokens_total", MODEL_LABEL)
    with httpx.Client(headers=AUTH) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            events = (line for line in r.iter_lines() if line.startswith("data: "))
            for _ in range(3):
                next(events)
    # leaving the blocks closed the connection mid-stream
    assert wait_for(lambda: _engine_is_free(server, aborted)), server.log()
    assert server.metric("trident:generation_tokens_total", MODEL_LABEL) - tokens < LONG["max_tokens"]
    # the single sequence slot is free again: a new request runs at once
    r = httpx.post(f"{server.url}/v1/completions", headers=AUTH, json={"prompt": PROMPT, "max_tokens": 4}, timeout=5)
    assert r.status_code == 200


def test_non_stream_disconnect_aborts(server):
    aborted = server.metric("trident:request_success_total", ABORTED)
    tokens = server.metric("trident:generation_tokens_total", MODEL_LABEL)
    with pytest.raises(httpx.ReadTimeout):   # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/completions", headers=AUTH, json=LONG, timeout=0.3)
    assert wait_for(lambda: _engine_is_free(server, aborted)), server.log()
    assert server.metric("trident:generation_tokens_total", MODEL_LABEL) - tokens < LONG["max_tokens"]


def test_api_key_holds_when_the_app_is_mounted_under_a_prefix():
    from fastapi import FastAPI

    parent = FastAPI()
    parent.mount("/trident", build_app(AsyncEngine(EngineConfig(model="not-loaded")), api_key=API_KEY))
    client = TestClient(parent)                     # no `with`: the engine never starts
    assert client.get("/trident/v1/models").status_code == 401
    assert client.get("/trident/v1/models", headers=AUTH).status_code == 503        # past the key: loading
    assert client.get("/trident/health").status_code == 503                         # open, and loading


def test_503_while_loading():
    app = build_app(AsyncEngine(EngineConfig(model="not-loaded-yet")))
    client = TestClient(app)   # no `with`: the lifespan never starts the engine
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 503
    assert client.get("/v1/models").status_code == 503


def test_503_after_engine_failure(tmp_path):
    app = build_app(AsyncEngine(EngineConfig(model=str(tmp_path / "missing-model"))))
    with TestClient(app) as client:   # the lifespan starts loading, which fails
        assert wait_for(lambda: client.get("/health").json()["error"]["code"] == "engine_dead")
        r = client.get("/health")
        assert r.status_code == 503 and "missing-model" in r.json()["error"]["message"]
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503
        assert "trident_engine_ready 0.0" in client.get("/metrics").text
