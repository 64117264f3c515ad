"""Server pieces without a running server: CLI parsing, request -> SamplingParams, usage merging."""
from __future__ import annotations

import argparse

import pydantic
import pytest

from trident.engine.config import CacheConfig, SchedulerConfig
from trident.server import cli
from trident.server.protocol import ChatCompletionRequest, CompletionRequest

CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("text, size", [("1GiB", 2**30), ("512MiB", 512 * 2**20), ("2G", 2 * 10**9),
                                        ("1048576", 1048576), ("1.5KiB", 1536), ("64 mib", 64 * 2**20)])
def test_parse_size(text, size):
    assert cli.parse_size(text) == size


def test_parse_size_rejects_garbage():
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size("lots")


def test_engine_config_from_flags():
    args = cli.build_parser().parse_args([
        "serve", "--model", "m.gguf", "--dtype", "bfloat16", "--device", "cpu", "--seed", "7",
        "--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "128", "--max-waiting", "3",
        "--block-size", "32", "--kv-cache-memory", "64MiB", "--num-kv-blocks", "10"])
    config = cli.engine_config_from_args(args)
    assert (config.model, config.dtype, config.device, config.seed) == ("m.gguf", "bfloat16", "cpu", 7)
    assert config.scheduler == SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=256,
                                               max_waiting=3)
    assert config.cache == CacheConfig(block_size=32, num_blocks=10, kv_cache_memory=64 * 2**20)


def test_unset_flags_keep_config_defaults():
    args = cli.build_parser().parse_args(["serve", "--device", "cpu"])
    config = cli.engine_config_from_args(args)
    assert config.model == cli.DEFAULT_MODEL and (args.host, args.port) == ("127.0.0.1", 8000)
    assert config.scheduler == SchedulerConfig() and config.cache == CacheConfig()


def test_hardening_flags():
    args = cli.build_parser().parse_args(["serve", "--shutdown-timeout", "2.5", "--max-request-bytes", "1MiB",
                                          "--allowed-origins", "https://a.example, https://b.example",
                                          "--message-special-tokens", "parse"])
    assert (args.shutdown_timeout, args.max_request_bytes, args.message_special_tokens) == (2.5, 2**20, "parse")
    defaults = cli.build_parser().parse_args(["serve"])
    assert (defaults.shutdown_timeout, defaults.max_request_bytes) == (30.0, 4 * 2**20)
    assert (defaults.allowed_origins, defaults.message_special_tokens) == ("", "text")


def test_bench_serve_forwards_its_arguments(monkeypatch):
    import trident.bench.serve

    seen = []
    monkeypatch.setattr(trident.bench.serve, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "serve", "--num-prompts", "5", "--help"]) == 0
    assert seen == [["--num-prompts", "5", "--help"]]


def test_completion_request_to_sampling_params():
    params = CompletionRequest(prompt="x", echo=True, logprobs=2, stop="\n", seed=3, top_k=5,
                               unknown_field=1).to_sampling_params()
    assert (params.logprobs, params.prompt_logprobs, params.stop, params.seed, params.top_k) == (2, 2, ["\n"], 3, 5)
    assert params.max_tokens == 16                            # OpenAI's completions default
    assert CompletionRequest(prompt="x", temperature=None, max_tokens=None).to_sampling_params().temperature == 1.0
    assert CompletionRequest(prompt="x", logprobs=1).to_sampling_params().prompt_logprobs is None   # no echo
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest(prompt="x", logprobs=6)             # completions allow at most 5
    with pytest.raises(ValueError, match="top_p"):
        CompletionRequest(prompt="x", top_p=0).to_sampling_params()


def test_chat_request_to_sampling_params():
    params = ChatCompletionRequest(messages=CHAT, max_tokens=5, max_completion_tokens=9, logprobs=True,
                                   top_logprobs=4).to_sampling_params()
    assert (params.max_tokens, params.logprobs, params.prompt_logprobs) == (9, 4, None)
    plain = ChatCompletionRequest(messages=CHAT).to_sampling_params()
    assert plain.max_tokens is None and plain.logprobs is None   # a chat reply may fill the context
    with pytest.raises(ValueError, match="top_logprobs"):
        ChatCompletionRequest(messages=CHAT, top_logprobs=2).to_sampling_params()
    with pytest.raises(ValueError, match="stream_options"):
        ChatCompletionRequest(messages=CHAT, stream_options={"include_usage": True}).to_sampling_params()
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest(messages=CHAT, n=1000)
    parts = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}])
    assert parts.messages[0].to_template_dict() == {"role": "user", "content": "ab"}


@pytest.mark.parametrize("field, value", [("logit_bias", {"5": 10}), ("response_format", {"type": "json_object"}),
                                          ("tools", [{"type": "function"}]), ("best_of", 3)])
def test_options_that_change_the_output_are_refused(field, value):
    with pytest.raises(pydantic.ValidationError, match=f"`{field}`"):
        ChatCompletionRequest(messages=CHAT, **{field: value})
    ChatCompletionRequest(messages=CHAT, **{field: None})     # null means "not set"
