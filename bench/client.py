"""HTTP client parts shared by the benchmarks: any OpenAI-compatible server, no SDK.

Everything here is a plain async function over an `httpx.AsyncClient`, so the load generator,
the quality tools and the side-by-side comparison reuse the same request code.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from trident.bench.metrics import RequestRecord

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
MAX_ERROR_CHARS = 1000


class ServerError(RuntimeError):
    """A non-streaming call answered with an HTTP error or an unreadable body."""


@dataclass(frozen=True)
class ServerTarget:
    """Where to send requests and who to say we are."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None          # None: ask GET /v1/models and take the first id
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt with its per-request generation settings."""

    prompt: str | list[int]           # text, or token ids (completions endpoint only)
    max_tokens: int
    expected_prompt_len: int = 0      # the dataset's prompt length in tokens (estimated or exact)
    temperature: float = 0.0
    extra_body: dict = field(default_factory=dict)   # merged last into the JSON body


def build_payload(endpoint: str, model: str, request: GenerationRequest, stream: bool = True) -> dict:
    """JSON body of a completions or chat request; streaming asks for the final usage chunk."""
    if endpoint not in ENDPOINT_PATHS:
        raise ValueError(f"endpoint must be one of {sorted(ENDPOINT_PATHS)}, got {endpoint!r}")
    body: dict = {"model": model, "max_tokens": request.max_tokens, "temperature": request.temperature}
    if endpoint == "chat":
        if not isinstance(request.prompt, str):
            raise ValueError("the chat endpoint needs text prompts, not token ids")
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    body.update(request.extra_body)
    return body


def _chunk_content(endpoint: str, choice: dict) -> str:
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _error_text(status: int, body: str) -> str:
    return f"HTTP {status}: {body.strip()[:MAX_ERROR_CHARS]}"


async def stream_request(
    client: httpx.AsyncClient, target: ServerTarget, endpoint: str, model: str, request: GenerationRequest
) -> RequestRecord:
    """Send one streaming request and record when each content chunk arrived.

    Never raises for server or network trouble: the record comes back with success=False and
    the HTTP status and body (or the exception) in `error`.
    """
    payload = build_payload(endpoint, model, request, stream=True)
    record = RequestRecord(start_time=time.perf_counter(), expected_prompt_len=request.expected_prompt_len)
    pieces: list[str] = []
    finish_time = None      # arrival of the first chunk with a finish_reason
    try:
        async with client.stream("POST", target.url(ENDPOINT_PATHS[endpoint]), json=payload,
                                 headers=target.headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                record.error = _error_text(response.status_code, body)
                return record
            async for line in response.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = f"stream error: {json.dumps(chunk['error'])[:MAX_ERROR_CHARS]}"
                    return record
                for choice in chunk.get("choices") or []:
                    content = _chunk_content(endpoint, choice)
                    if content:
                        record.chunk_times.append(now)
                        pieces.append(content)
                        break
                    if choice.get("finish_reason") and finish_time is None:
                        finish_time = now
                usage = chunk.get("usage")
                if usage:
                    record.output_tokens = usage.get("completion_tokens")
                    record.prompt_tokens = usage.get("prompt_tokens")
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    record.generated_text = "".join(pieces)
    if not record.chunk_times:
        if finish_time is None:
            record.error = "the stream ended without any content or finish_reason"
            return record
        # finished, but its tokens decode to no visible text (e.g. skipped special tokens or
        # incomplete UTF-8): the finish chunk is the only arrival there is to time
        record.chunk_times.append(finish_time)

    record.success = True
    return record


def exit_code(work: Callable[[], object]) -> int:
    """Run a bench command's `work`: 0 when it returns; 1 with one `error: ...` line on stderr when it
    fails on bad input (ValueError), a file (OSError), the server (ServerError, any HTTP error, an
    unreachable URL) or its own run (RuntimeError). Other exceptions are bugs and propagate."""
    try:
        work()
    except httpx.TransportError as exc:
        print(f"error: {transport_error_text(exc)}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError, httpx.HTTPError) as exc:    # ServerError is a RuntimeError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def transport_error_text(exc: httpx.TransportError) -> str:
    """'cannot reach URL (ConnectError: ...)' for a connection-level failure."""
    try:
        where = str(exc.request.url)
    except RuntimeError:     # raised by httpx when the error carries no request
        where = "the server"
    return f"cannot reach {where} ({type(exc).__name__}: {exc})"


async def post_json(client: httpx.AsyncClient, target: ServerTarget, path: str, payload: dict) -> dict:
    """POST a JSON body and return the decoded answer; raise ServerError on any HTTP error."""
    response = await client.post(target.url(path), json=payload, headers=target.headers)
    if response.status_code != 200:
        raise ServerError(f"POST {path}: {_error_text(response.status_code, response.text)}")
    try:
        return response.json()
    except json.JSONDecodeError as exc:
        raise ServerError(f"POST {path}: the answer is not JSON ({exc})") from None


async def resolve_model(client: httpx.AsyncClient, target: ServerTarget) -> str:
    """The target's model, or the first id that GET /v1/models lists."""
    if target.model:
        return target.model
    response = await client.get(target.url("/v1/models"), headers=target.headers)
    if response.status_code != 200:
        raise ServerError(f"GET /v1/models: {_error_text(response.status_code, response.text)}")
    models = response.json().get("data") or []
    if not models:
        raise ServerError(f"{target.base_url} lists no models; pass --model")
    return models[0]["id"]


class ServerTokenizer:
    """The server's tokenizer through POST /tokenize and /detokenize (vLLM's request format)."""

    def __init__(self, client: httpx.AsyncClient, target: ServerTarget, model: str):
        self.client, self.target, self.model = client, target, model

    @classmethod
    async def probe(cls, client: httpx.AsyncClient, target: ServerTarget, model: str) -> "ServerTokenizer | None":
        """A tokenizer when the server has both endpoints, else None."""
        tokenizer = cls(client, target, model)
        try:
            ids = await tokenizer.encode("Hello world", add_special_tokens=False)
            await tokenizer.decode(ids)
        except (ServerError, KeyError, TypeError, httpx.HTTPError):
            return None
        return tokenizer

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the model's BOS when add_special_tokens is set."""
        answer = await post_json(self.client, self.target, "/tokenize",
                                 {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens})
        return [int(t) for t in answer["tokens"]]

    async def decode(self, token_ids: list[int]) -> str:
        """Text of `token_ids`."""
        answer = await post_json(self.client, self.target, "/detokenize", {"model": self.model, "tokens": token_ids})
        return answer["prompt"]
