"""End-to-end tests of the HTTP server: a real `python -m trident.server serve` process on the tiny random
model (conftest's `tiny_model_dir`), driven by the official OpenAI SDK (and httpx for raw checks).

Greedy requests (temperature 0) make outputs reproducible; checks compare one path of the server
with another (stream vs JSON, echo logprobs vs decode, stop vs no stop) rather than fixed strings.
"""
from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest


REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny-test"
MODEL_LABEL = f'{{model_name="{MODEL_NAME}"}}'       # the label set of the model's series in /metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """`python -m trident.server serve` in a subprocess on a free port; waits for /health 200."""

    def __init__(self, model_dir: Path, log_file: Path, *extra_args: str, startup_timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file
        args = [sys.executable, "-m", "trident.server", "serve", "--model", str(model_dir), "--port", str(self.port),
                "--served-model-name", MODEL_NAME, "--kv-cache-memory", "16MiB", "--log-level", "warning",
                *extra_args]
        with open(log_file, "w") as log:
            self.proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not healthy after {startup_timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_file.read_text()[-4000:]

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample of /metrics, e.g. metric("trident:generation_tokens_total", MODEL_LABEL)."""
        text = httpx.get(f"{self.url}/metrics").text
        match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def tokenize(self, prompt: str) -> list[int]:
        return httpx.post(f"{self.url}/tokenize", json={"prompt": prompt}).json()["tokens"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = RemoteServer(tiny_model_dir, tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
GREEDY = {"temperature": 0.0}
NO_EOS = {"extra_body": {"ignore_eos": True}}


def test_models_and_health(server, client):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].max_model_len == 512


def test_completion_usage_and_length(server, client):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, **GREEDY, **NO_EOS)
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == len(server.tokenize(PROMPT))
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_stream_matches_non_stream(client):
    full = client.completions.create(model="", prompt=PROMPT, max_tokens=16, **GREEDY, **NO_EOS)
    chunks = list(client.completions.create(prompt=PROMPT, model=MODEL_NAME, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY, **NO_EOS))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in text_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 16
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    plain = list(client.completions.create(prompt=PROMPT, model=MODEL_NAME, max_tokens=4, stream=True, **NO_EOS))
    assert plain and all(c.choices for c in plain)   # no usage chunk unless asked


def test_chat_non_stream_and_stream(server, client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, **GREEDY, **NO_EOS)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 10
    templated = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES})
    assert full.usage.prompt_tokens == templated.json()["count"]
    stream = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=10,
                                                 stream=True, stream_options={"include_usage": True},
                                                 **GREEDY, **NO_EOS))
    assert stream[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert content == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"
    assert stream[-1].choices == [] and stream[-1].usage.total_tokens == full.usage.total_tokens


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, logprobs=True,
                                         top_logprobs=3, **GREEDY, **NO_EOS)
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert entry.logprob == pytest.approx(values[0])   # greedy picks the most likely token
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_echo_prompt_logprobs_agree_with_decoding(server, client):
    """echo + max_tokens 0 scores the prompt; each position's best alternative must be what greedy
    decoding of the prefix produces, with the same logprob (prefill and decode paths agree)."""
    ids = server.tokenize(PROMPT)
    scored = client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, max_tokens=0, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == PROMPT and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for i in range(1, len(ids)):
        best_token, best_lp = max(lp.top_logprobs[i].items(), key=lambda kv: kv[1])
        assert lp.token_logprobs[i] == pytest.approx(lp.top_logprobs[i][lp.tokens[i]])
        step = client.completions.create(model=MODEL_NAME, prompt=ids[:i], max_tokens=1, logprobs=1, **GREEDY,
                                         **NO_EOS).choices[0].logprobs
        assert step.tokens[0] == best_token
        assert step.token_logprobs[0] == pytest.approx(best_lp, abs=1e-4)


def test_seeds(client):
    def sample(seed):
        return client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=1.0,
                                         seed=seed, **NO_EOS).choices[0].text
    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_n_and_prompt_lists(server, client):
    prompts = [PROMPT, "Once upon a time"]
    out = client.completions.create(model=MODEL_NAME, prompt=prompts, n=2, max_tokens=8, **GREEDY, **NO_EOS)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.text for c in out.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]   # greedy: the n copies agree
    alone = client.completions.create(model=MODEL_NAME, prompt=prompts[1], max_tokens=8, **GREEDY, **NO_EOS)
    assert texts[2] == alone.choices[0].text               # index = prompt_index * n + i
    assert out.usage.completion_tokens == 32
    assert out.usage.prompt_tokens == sum(len(server.tokenize(p)) for p in prompts)   # once per prompt, any n
    sampled = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, n=3, max_tokens=12, seed=5,
                                             temperature=1.0, **NO_EOS)
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    assert len({c.message.content for c in sampled.choices}) > 1   # distinct derived seeds


def test_stop_strings(client):
    base = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, **GREEDY, **NO_EOS)
    text = base.choices[0].text
    # a two-character stop string whose first occurrence is well inside the text
    start = next(i for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text[i:i + 2].strip())
    stop = text[start:start + 2]
    cut = text[:text.index(stop)]
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, stop=[stop], **GREEDY,
                                    **NO_EOS)
    assert out.choices[0].text == cut
    assert out.choices[0].finish_reason == "stop" and out.choices[0].model_extra["stop_reason"] == stop
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, stop=stop, stream=True,
                                         **GREEDY, **NO_EOS)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_concurrent_requests(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as aclient:
            return await asyncio.gather(*[
                aclient.completions.create(model=MODEL_NAME, prompt=f"{PROMPT} {i}", max_tokens=20 + i,
                                           **NO_EOS) for i in range(8)])
    outs = asyncio.run(run())
    assert [o.usage.completion_tokens for o in outs] == [20 + i for i in range(8)]
    assert all(o.choices[0].finish_reason == "length" for o in outs)
    assert len({o.id for o in outs}) == 8


def test_tokenize_detokenize_round_trip(server):
    text = "Once upon a time there was a dragon."
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 3 and tokens["max_model_len"] == 512
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back["prompt"] == text
    both = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "messages": MESSAGES})
    assert both.status_code == 400
    # Special tokens survive the round trip (a chat-templated prompt starts with <|im_start|>).
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": chat}).json()["prompt"]
    assert "<|im_start|>" in text
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"] == chat


def test_echo_of_token_ids_keeps_special_tokens(server, client):
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    out = client.completions.create(model=MODEL_NAME, prompt=ids, echo=True, max_tokens=0, logprobs=0)
    choice = out.choices[0]
    assert choice.text.startswith("<|im_start|>")
    assert "".join(choice.logprobs.tokens) == choice.text                  # offsets index the text
    assert choice.logprobs.text_offset[-1] < len(choice.text)


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "n": "many"}, "n"),                          # pydantic: 400, not 422
    ({"prompt": PROMPT, "logprobs": 9}, "logprobs"),
    ({"prompt": PROMPT, "max_tokens": 600}, "maximum context length is 512"),
    ({"prompt": [5] * 600}, "maximum context length is 512"),
    ({"prompt": [1, 2, 10**6]}, "outside the vocabulary"),
    ({"prompt": []}, "empty"),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream"),
])
def test_bad_requests_are_400(server, body, fragment):
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert fragment in error["message"]


def test_errors_through_the_sdk(server, client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="no-such-model", prompt=PROMPT)
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, top_logprobs=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=[])
    broken = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                        headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]


def test_metrics(server, client):
    before = server.metric("trident:generation_tokens_total", MODEL_LABEL)
    requests_before = server.metric("trident_http_requests_total", '{endpoint="/v1/completions",status="200"}')
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=7, **NO_EOS)
    assert server.metric("trident:generation_tokens_total", MODEL_LABEL) == before + 7
    assert server.metric("trident_http_requests_total",
                         '{endpoint="/v1/completions",status="200"}') == requests_before + 1
    httpx.post(f"{server.url}/v1/completions", json={"prompt": []})          # a 400 of this test's own
    assert server.metric("trident_http_requests_total", '{endpoint="/v1/completions",status="400"}') > 0
    assert server.metric("trident:time_to_first_token_seconds_count", MODEL_LABEL) > 0
    assert server.metric("trident:inter_token_latency_seconds_count", MODEL_LABEL) > 0
    assert server.metric("trident:e2e_request_latency_seconds_count", MODEL_LABEL) > 0
    assert server.metric("trident_engine_ready") == 1.0
    assert server.metric("trident:num_requests_running", MODEL_LABEL) == 0.0
    # Generated tokens count while a stream runs, not only when it ends.
    before = server.metric("trident:generation_tokens_total", MODEL_LABEL)
    # 480 tokens take the tiny model seconds; the scrape after 5 chunks takes milliseconds.
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=480, stream=True, **NO_EOS)
    seen = 0
    for chunk in stream:
        seen += 1
        if seen == 5:
            mid = server.metric("trident:generation_tokens_total", MODEL_LABEL)
    assert before < mid < before + 480 == server.metric("trident:generation_tokens_total", MODEL_LABEL)
