"""Start a server as a subprocess on a free loopback port, wait until it answers, always stop it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import httpx

HEALTH_PATHS = ("/health", "/v1/models")   # llama-cpp-python's server has no /health
LOG_TAIL_CHARS = 4000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trident_command(model: str, port: int, plan: str | None = None, extra_args: list[str] = ()) -> list[str]:
    """`trident serve` (as `python -m trident.server serve`) on 127.0.0.1:port; plan None or "dense" is the
    server's default, so no --plan flag is passed for it."""
    command = [sys.executable, "-m", "trident.server", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    if plan and plan != "dense":
        command += ["--plan", plan]
    return command + list(extra_args)


def llama_cpp_command(gguf: str, port: int) -> list[str]:
    """llama-cpp-python's OpenAI server; logits_all so that echo returns prompt logprobs."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--logits_all", "true"]


def _healthy(base_url: str) -> bool:
    for path in HEALTH_PATHS:
        try:
            if httpx.get(base_url + path, timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            continue
    return False


def _log_tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode("utf-8", "replace")[-LOG_TAIL_CHARS:]


@contextmanager
def launched_server(command: list[str], port: int, startup_timeout_s: float = 600.0,
                    env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `command` (a server listening on 127.0.0.1:port), yield its base URL once /health
    (or /v1/models) answers 200, and stop it on exit; raise RuntimeError with the server's log
    if it exits or stays silent past `startup_timeout_s`."""
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        # own session: stopping the server also stops any worker it spawned, and nothing else
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not _healthy(base_url):
                if process.poll() is not None:
                    raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}:\n{_log_tail(log)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(command)} not healthy after {startup_timeout_s:.0f} s:\n{_log_tail(log)}")
                time.sleep(0.5)
            yield base_url
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
