"""The SSE parser and request bodies of bench/client.py, against a scripted transport (no server)."""
import asyncio
import json

import httpx
import pytest

from trident.bench.client import GenerationRequest, ServerTarget, build_payload, stream_request


def _sse(*events) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


def _run(handler, endpoint="chat", prompt="hi"):
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await stream_request(client, ServerTarget("http://test"), endpoint, "m",
                                        GenerationRequest(prompt=prompt, max_tokens=4, expected_prompt_len=2))
    return asyncio.run(go())


def test_chat_stream_counts_content_chunks_and_usage():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["path"], seen["body"] = request.url.path, json.loads(request.content)
        return httpx.Response(200, content=_sse(
            {"choices": [{"delta": {"role": "assistant"}}]},           # no content: not a token chunk
            {"choices": [{"delta": {"content": "Hel"}}]},
            {"choices": [{"delta": {"content": "lo"}}]},
            {"choices": [{"delta": {}, "finish_reason": "length"}]},
            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}},
        ))

    record = _run(handler)
    assert record.success and record.error == ""
    assert len(record.chunk_times) == 2 and record.generated_text == "Hello"
    assert (record.output_tokens, record.prompt_tokens) == (3, 5)
    assert seen["path"] == "/v1/chat/completions"
    assert seen["body"]["stream_options"] == {"include_usage": True}
    assert seen["body"]["messages"] == [{"role": "user", "content": "hi"}]


def test_completions_stream_text_chunks():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        return httpx.Response(200, content=_sse({"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]}))

    record = _run(handler, endpoint="completions")
    assert record.success and record.generated_text == "ab" and record.output_tokens is None
    assert record.num_output_tokens == 2


def test_http_error_is_recorded_with_status_and_body():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "max_tokens too large"}})

    record = _run(handler)
    assert not record.success
    assert record.error.startswith("HTTP 400:") and "max_tokens too large" in record.error


def test_stream_without_content_or_with_error_event_fails():
    assert "without any content" in _run(lambda r: httpx.Response(200, content=_sse())).error
    record = _run(lambda r: httpx.Response(200, content=_sse({"error": {"message": "engine died"}})))
    assert not record.success and "engine died" in record.error


def test_payload_merges_extra_body_last():
    request = GenerationRequest(prompt=[1, 2, 3], max_tokens=8, extra_body={"pruning": "balanced", "max_tokens": 2})
    body = build_payload("completions", "m", request)
    assert body["prompt"] == [1, 2, 3] and body["pruning"] == "balanced" and body["max_tokens"] == 2
    with pytest.raises(ValueError, match="text prompts"):
        build_payload("chat", "m", request)
    with pytest.raises(ValueError, match="endpoint"):
        build_payload("embeddings", "m", request)


def test_finished_stream_without_visible_text_times_the_finish_chunk():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_sse(
            {"choices": [{"text": "", "finish_reason": "length"}]},
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}},
        ))

    record = _run(handler, endpoint="completions")
    assert record.success and len(record.chunk_times) == 1 and record.num_output_tokens == 5


def test_output_tokens_without_usage_are_counted_by_the_servers_tokenizer(capsys):
    from trident.bench.metrics import RequestRecord
    from trident.bench.runner import count_missing_output_tokens

    def tokenizing(request: httpx.Request) -> httpx.Response:       # one token per word
        body = json.loads(request.content)
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": list(range(len(body["prompt"].split())))})
        return httpx.Response(200, json={"prompt": "x"})

    def no_tokenizer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "not found"}})

    def records():
        # A server that streams four tokens a chunk and sends no usage: chunks are no count.
        return [RequestRecord(start_time=0.0, chunk_times=[1.0, 2.0], success=True,
                              generated_text="one two three four five six seven eight"),
                RequestRecord(start_time=0.0, chunk_times=[1.0], success=True, output_tokens=3,
                              generated_text="a b c d e")]

    async def run(handler, recs):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await count_missing_output_tokens(client, ServerTarget("http://test"), "m", recs)
        return recs

    counted = asyncio.run(run(tokenizing, records()))
    assert [r.num_output_tokens for r in counted] == [8, 3]                    # usage wins where sent
    assert "warning" not in capsys.readouterr().err
    fallback = asyncio.run(run(no_tokenizer, records()))
    assert [r.num_output_tokens for r in fallback] == [2, 3]
    assert "a lower bound" in capsys.readouterr().err


def test_exit_code_is_the_one_error_wrapper_of_the_bench_commands(capsys):
    from trident.bench.client import ServerError, exit_code

    def fails(exc):
        def work():
            raise exc
        return work

    assert exit_code(lambda: None) == 0
    request = httpx.Request("GET", "http://127.0.0.1:9/v1/models")
    for exc in (ValueError("bad flag"), OSError("no file"), ServerError("500 from server"),
                httpx.ConnectError("refused", request=request)):
        assert exit_code(fails(exc)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == ["error: bad flag", "error: no file", "error: 500 from server"]
    assert err[3].startswith("error: cannot reach http://127.0.0.1:9/v1/models (ConnectError")
    with pytest.raises(KeyError):                   # a bug is not a user error: it propagates
        exit_code(fails(KeyError("x")))
