"""Fault injection: an engine step that raises, and a client that stops reading its stream.

The step failure is injected from the test (the engine's `step` is replaced on the running
instance); the engine code itself has no test hooks.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx

from tests.test_server import MODEL_LABEL, RemoteServer
from tests.test_server_guards import started
from tests.tiny_model import build_tiny_hf_model
from trident.engine.async_engine import AsyncEngine
from trident.engine.config import CacheConfig, EngineConfig
from trident.engine.outputs import CompletionOutput, RequestOutput
from trident.engine.sampling_params import SamplingParams
from trident.server.app import build_app
from trident.server.generation import Generation
from trident.server.metrics import ServerMetrics, plan_labels

BODY = {"prompt": "The quick brown fox", "max_tokens": 400, "ignore_eos": True}


def blocks_accounted_for(llm) -> bool:
    """Every block is free or referenced exactly as often as the live sequences' tables hold it."""
    bm, scheduler = llm.block_manager, llm.scheduler
    refs: dict[int, int] = {}
    for seq in [*scheduler.running, *scheduler.waiting]:
        for block in seq.block_table:
            refs[block] = refs.get(block, 0) + 1
    in_use = {b for b, count in enumerate(bm.ref_counts) if count}
    return in_use == set(refs) and all(bm.ref_counts[b] == n for b, n in refs.items()) \
        and bm.num_free_blocks == bm.num_blocks - len(in_use)


def test_a_failing_step_ends_requests_cleanly_and_health_says_why(tiny_model_dir):
    engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir), device="cpu",
                                      cache=CacheConfig(kv_cache_memory=2**22)))
    client = started(build_app(engine))
    try:
        llm = engine.engine
        events: list = []

        def read_stream() -> None:
            with client.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line.removeprefix("data: ")
                        events.append(data if data == "[DONE]" else json.loads(data))

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while len(events) < 3:
            assert time.monotonic() < deadline and reader.is_alive()
            time.sleep(0.01)

        waiting: list = []
        caller = threading.Thread(target=lambda: waiting.append(client.post("/v1/completions", json=BODY)),
                                  daemon=True)
        caller.start()

        def boom():
            raise RuntimeError("injected step failure")

        llm.step = boom
        reader.join(30), caller.join(30)
        assert not reader.is_alive() and not caller.is_alive(), "a request hung after the step failed"
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_dead"
        assert "injected step failure" in events[-2]["error"]["message"]
        assert waiting[0].status_code == 503 and waiting[0].json()["error"]["code"] == "engine_dead"
        health = client.get("/health")
        assert health.status_code == 503 and "injected step failure" in health.json()["error"]["message"]
        assert client.post("/v1/completions", json=BODY).status_code == 503      # at once, not a hang
        assert blocks_accounted_for(llm)
    finally:
        client.__exit__(None, None, None)


class FastEngine:
    """An engine that produces `num_outputs` cumulative outputs as fast as it can."""

    def __init__(self, num_outputs: int) -> None:
        self.num_outputs = num_outputs
        self.produced = 0

    async def generate(self, prompt_ids, params, request_id):
        for i in range(1, self.num_outputs + 1):
            self.produced = i
            output = CompletionOutput(index=0, text="x" * i, token_ids=list(range(i)),
                                      finish_reason="length" if i == self.num_outputs else None)
            yield RequestOutput(request_id, list(prompt_ids), [output], finished=i == self.num_outputs)
            await asyncio.sleep(0)


def test_a_reader_that_stops_holds_one_output_per_prompt():
    """Outputs are cumulative: a stream nobody reads keeps the newest one, not all of them."""

    async def run() -> tuple[int, int, str]:
        engine = FastEngine(2000)
        metrics = ServerMetrics()     # bound to the model as a started engine binds it; requests come after
        metrics.bind("fast", max_model_len=4096, num_layers=1, plan_info=plan_labels(None, None))
        generation = Generation(engine, metrics, "cmpl-x", [[1, 2], [3]], SamplingParams(max_tokens=2000))
        await generation.start()
        while engine.produced < 2000 or not all(t.done() for t in generation._tasks):
            await asyncio.sleep(0.01)
        held = len(generation._news)
        finals = await generation.collect()          # the reader comes back: it gets the last state
        return held, len(finals), finals[0].outputs[0].text

    held, num_finals, text = asyncio.run(run())
    assert held <= 2 and num_finals == 2 and text == "x" * 2000


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_clients_that_stop_reading_do_not_grow_server_memory(tmp_path):
    """A real server and real sockets: four clients ask for 3,000-token streams and never read a
    byte. The engine generates every token regardless (the generation counter says so), while the
    server's RSS grows by far less than keeping every cumulative output (all token ids and text so
    far, once per token) would cost: that variant grew it by about 200 MB here, the server by 20."""
    model_dir = build_tiny_hf_model(tmp_path / "tiny-long", max_position_embeddings=4096)
    server = RemoteServer(model_dir, tmp_path / "server.log", "--max-model-len", "4096")
    try:
        body = json.dumps({"prompt": "hello world", "max_tokens": 3000, "ignore_eos": True, "stream": True})
        request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "hello", "max_tokens": 50})   # warm-up
        before = rss_bytes(server.proc.pid)
        tokens_before = server.metric("trident:generation_tokens_total", MODEL_LABEL)
        sockets = []
        for _ in range(4):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)    # fills after a few chunks
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(request)
            sockets.append(sock)
        deadline = time.monotonic() + 240
        while server.metric("trident:generation_tokens_total", MODEL_LABEL) - tokens_before < 4 * 3000:
            assert time.monotonic() < deadline, "the engine stopped generating for unread streams"
            time.sleep(0.5)
        growth = rss_bytes(server.proc.pid) - before
        assert growth < 64 * 2**20, f"server RSS grew by {growth / 2**20:.0f} MiB"
        for sock in sockets:
            sock.close()
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()
