"""`trident bench soak`: hostile mixed load on a server of its own for N minutes, then leak checks.

Example:
    trident bench soak --minutes 10 --json bench/results/soak-cpu.json

It starts `trident serve` (so that it can read the server's memory), keeps `--concurrency` clients
busy with a mix of streaming, non-streaming and chat requests, clients that disconnect mid-stream
or mid-request, bodies over the size limit, and invalid requests, more than the engine runs at once
(so the waiting queue fills and 429s are part of the mix). Each kind has the statuses it may get;
anything else (a 5xx, a stream without `data: [DONE]`, a transport error) is a failure. Then it
checks that the engine returns to idle (no sequence running or waiting, no KV block in use) and
reports RSS after warm-up, at the middle and at the end. Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from trident.bench.launch import _healthy, free_port, stop_process, trident_command
from trident.bench.serve import recorded_command

MAX_REQUEST_BYTES = 256 * 1024
CLIENT_TIMEOUT_S = 600.0
PROMPTS = ["The quick brown fox", "Once upon a time", "Write a short poem about the sea.",
           "List three prime numbers:", "Explain why the sky is blue."]
# kind -> (weight, statuses it may get). 429: the queue is full, by design of the load.
KINDS = {
    "stream": (4, {200, 429}),
    "completion": (3, {200, 429}),
    "chat": (2, {200, 429}),
    "stream_disconnect": (2, {200, 429}),
    "request_disconnect": (1, {200, 429}),
    "oversized": (1, {413}),
    "invalid": (2, {400}),
}
INVALID_BODIES = [b'{"prompt": "\\ud800x", "max_tokens": 2}', b'{"prompt": "x", "max_tokens": "2"}',
                  b'{"prompt": "x", "temperature": 100}', b'{"messages": [{"role": "user"', b'{"prompt": []}',
                  b'{"prompt": [1, 2, 1000000000]}', b'{"prompt": "x", "max_tokens": 100000}']


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def one_request(http: httpx.AsyncClient, kind: str, rng: random.Random) -> str:
    """Sends one request of `kind`; returns its outcome (a status code, or what went wrong)."""
    prompt, max_tokens = rng.choice(PROMPTS), rng.randint(8, 48)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.8])}
    if kind in ("stream", "stream_disconnect"):
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return str(r.status_code)
            lines, done = 0, False
            async for line in r.aiter_lines():
                lines += line.startswith("data: ")
                done = done or line == "data: [DONE]"
                if kind == "stream_disconnect" and lines == 3:
                    return "200"                         # leaves mid-stream: the server must abort
            return "200" if done else "stream without [DONE]"
    if kind == "request_disconnect":
        try:
            r = await http.post("/v1/completions", json={**body, "max_tokens": 200, "ignore_eos": True},
                                timeout=0.2)
            return str(r.status_code)
        except httpx.TimeoutException:
            return "200"                                 # gave up waiting: the server must abort
    if kind == "chat":
        r = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens})
        return str(r.status_code)
    if kind == "oversized":
        r = await http.post("/v1/completions", content=b'{"prompt": "' + b"a" * (MAX_REQUEST_BYTES + 1) + b'"}',
                            headers={"content-type": "application/json"})
        return str(r.status_code)
    if kind == "invalid":
        r = await http.post("/v1/completions", content=rng.choice(INVALID_BODIES),
                            headers={"content-type": "application/json"})
        return str(r.status_code)
    r = await http.post("/v1/completions", json=body)
    return str(r.status_code)


async def drive(base_url: str, seconds: float, concurrency: int, seed: int, pid: int) -> dict:
    """Runs the mix for `seconds`; counts outcomes per kind and samples RSS."""
    kinds, weights = list(KINDS), [w for w, _ in KINDS.values()]
    outcomes: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    rss: dict[str, int] = {}
    start = time.monotonic()
    deadline = start + seconds

    async def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        # A request unanswered after CLIENT_TIMEOUT_S counts as a hang. On a busy 2-core CPU a request
        # that waits behind a full queue of SmolLM2 generations can take minutes, not hours.
        async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT_S) as http:
            while time.monotonic() < deadline:
                kind = rng.choices(kinds, weights)[0]
                try:
                    outcome = await one_request(http, kind, rng)
                except httpx.HTTPError as exc:
                    outcome = f"transport error: {type(exc).__name__}"
                outcomes[kind][outcome] += 1

    async def sampler() -> None:
        for name, at in (("after_warmup", 0.2), ("middle", 0.5), ("end", 0.98)):
            await asyncio.sleep(max(0.0, start + at * seconds - time.monotonic()))
            rss[name] = rss_bytes(pid)

    await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
    return {"outcomes": {kind: dict(counts) for kind, counts in outcomes.items()}, "rss_bytes": rss}


def wait_idle(base_url: str, timeout_s: float = 60.0) -> dict:
    """The engine's load from /health once it is idle (or the last one seen at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = httpx.get(f"{base_url}/health", timeout=10).json()
        idle = (load["running"], load["waiting"], load["kv_blocks_used"]) == (0, 0, 0)
        if idle or time.monotonic() > deadline:
            return {key: load[key] for key in ("running", "waiting", "kv_blocks_used", "kv_blocks_total")}
        time.sleep(0.2)


def verdict(report: dict, max_rss_growth: float) -> list[str]:
    """The checks that failed, as readable lines (empty: the soak passed)."""
    problems = []
    for kind, counts in report["outcomes"].items():
        allowed = {str(s) for s in KINDS[kind][1]}
        bad = {outcome: n for outcome, n in counts.items() if outcome not in allowed}
        if bad:
            problems.append(f"{kind}: unexpected outcomes {bad}")
        if not counts:
            problems.append(f"{kind}: never sent")
    load = report["engine_after"]
    if (load["running"], load["waiting"], load["kv_blocks_used"]) != (0, 0, 0):
        problems.append(f"the engine did not return to idle: {load}")
    if report["rss_growth"] > max_rss_growth:
        problems.append(f"RSS grew {report['rss_growth']:.1%} after warm-up (limit {max_rss_growth:.0%})")
    return problems


def soak(model: str, minutes: float, concurrency: int, seed: int, server_args: list[str],
         max_rss_growth: float) -> dict:
    port = free_port()
    command = trident_command(model, port, extra_args=["--max-request-bytes", str(MAX_REQUEST_BYTES),
                                                       "--log-level", "warning", *server_args])
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while not _healthy(base_url):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"server did not start:\n{log.read().decode(errors='replace')[-3000:]}")
                time.sleep(0.2)
            started = time.monotonic()
            report = asyncio.run(drive(base_url, minutes * 60, concurrency, seed, process.pid))
            report["seconds"] = round(time.monotonic() - started, 1)
            report["engine_after"] = wait_idle(base_url)
            rss = report["rss_bytes"]
            report["rss_growth"] = rss["end"] / rss["after_warmup"] - 1
            report["server_alive"] = process.poll() is None
        finally:
            stop_process(process)
    # recorded as `python -m ...`: the interpreter's path says nothing about the run
    report.update(server_command=["python", *command[1:]], concurrency=concurrency, seed=seed, minutes=minutes,
                  requests=sum(sum(c.values()) for c in report["outcomes"].values()))
    report["problems"] = verdict(report, max_rss_growth) + ([] if report["server_alive"] else ["the server died"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trident bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="what `trident serve --model` gets")
    parser.add_argument("--concurrency", type=int, default=12, help="clients busy at once (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-growth", type=float, default=0.05,
                        help="allowed RSS growth from after warm-up (20%% of the run) to the end (default 0.05)")
    parser.add_argument("--server-args", default="--max-num-seqs 4 --max-waiting 10",
                        help="more `trident serve` flags (default: %(default)s, so the queue fills)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    report = soak(args.model, args.minutes, args.concurrency, args.seed, args.server_args.split(), args.max_rss_growth)
    report = {"command": recorded_command("soak", list(sys.argv[1:] if argv is None else argv)), **report}
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
