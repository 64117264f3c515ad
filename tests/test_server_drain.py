"""Graceful drain: a real `trident serve` process gets SIGTERM (or SIGINT) while a stream runs and a
request waits.

With `--max-num-seqs 1` one request runs and the next waits in the engine's queue. After the signal,
/health and new requests get OpenAI-shaped 503s; what is in flight either finishes (a long
--shutdown-timeout) or is ended with a well-formed error (a short one); the process exits 0.
"""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from tests.test_server import PROMPT, RemoteServer


class Stream(threading.Thread):
    """Reads one SSE stream to its end in the background; `events` holds the parsed payloads."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list = []
        self.status: int | None = None
        self.first_chunk = threading.Event()

    def run(self) -> None:
        with httpx.stream("POST", f"{self.url}/v1/completions", json={**self.body, "stream": True}, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line.removeprefix("data: ")
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                    self.first_chunk.set()


class Call(threading.Thread):
    """One non-streaming request in the background."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.response: httpx.Response | None = None

    def run(self) -> None:
        self.response = httpx.post(f"{self.url}/v1/completions", json=self.body, timeout=120)


def start_load(srv: RemoteServer, max_tokens: int) -> tuple[Stream, Call]:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True}
    stream = Stream(srv.url, body)
    stream.start()
    assert stream.first_chunk.wait(30), srv.log()
    queued = Call(srv.url, body)
    queued.start()
    deadline = time.monotonic() + 10     # the second request reaches the engine's waiting queue
    while httpx.get(f"{srv.url}/health").json().get("waiting") != 1:
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.02)
    return stream, queued


def assert_refuses_new_work(srv: RemoteServer) -> None:
    deadline = time.monotonic() + 5
    while (health := httpx.get(f"{srv.url}/health")).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert health.json()["error"]["code"] == "server_shutting_down"
    late = httpx.post(f"{srv.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down"


def test_sigterm_lets_running_requests_finish(tiny_model_dir, tmp_path):
    srv = RemoteServer(tiny_model_dir, tmp_path / "server.log", "--max-num-seqs", "1", "--shutdown-timeout", "60")
    try:
        stream, queued = start_load(srv, max_tokens=60)
        srv.proc.send_signal(signal.SIGTERM)
        assert_refuses_new_work(srv)
        stream.join(60), queued.join(60)
        assert stream.status == 200 and stream.events[-1] == "[DONE]"
        assert stream.events[-2]["choices"][0]["finish_reason"] == "length"
        assert queued.response.status_code == 200, queued.response.text
        assert queued.response.json()["usage"]["completion_tokens"] == 60
        assert srv.proc.wait(timeout=30) == 0, srv.log()
    finally:
        srv.stop()


def test_sigint_ends_what_outlives_the_timeout(tiny_model_dir, tmp_path):
    # A 0.1 s drain: the rest of 480 tokens outlives it even on a fast CPU (on one, a 1 s drain
    # let the stream finish, and the test saw no error event).
    srv = RemoteServer(tiny_model_dir, tmp_path / "server.log", "--max-num-seqs", "1", "--shutdown-timeout", "0.1")
    try:
        stream, queued = start_load(srv, max_tokens=480)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGINT)          # Ctrl-C drains the same way
        assert_refuses_new_work(srv)
        stream.join(30), queued.join(30)
        assert stream.status == 200 and stream.events[-1] == "[DONE]"
        error = stream.events[-2]["error"]
        assert error["code"] == "server_shutting_down" and error["type"] == "service_unavailable_error"
        assert queued.response.status_code == 503
        assert queued.response.json()["error"]["code"] == "server_shutting_down"
        assert srv.proc.wait(timeout=30) == 0, srv.log()
        assert time.monotonic() - signalled < 15
    finally:
        srv.stop()
