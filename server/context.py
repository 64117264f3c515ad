"""What every endpoint shares: the engine, the metrics, request checks, SSE framing and usage.

Tokenizing and chat templating run in one worker thread (`ServerContext.run_blocking`), never on the
event loop, and at a lower CPU priority than the engine: a multi-megabyte prompt then delays no other
request's stream. The server drains on
shutdown: `draining` turns new requests (and /health) into 503s while running ones finish.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from trident.engine.outputs import RequestOutput
from trident.engine.pruning.accounting import merge_summaries
from trident.engine.sampling_params import SamplingParams
from trident.server.errors import APIError, context_length_error, engine_error
from trident.server.generation import ClientDisconnected, Generation, unless_disconnected
from trident.server.metrics import ServerMetrics
from trident.server.protocol import ChatCompletionRequest, CompletionRequest, UsageInfo, make_usage

if TYPE_CHECKING:
    from trident.engine.async_engine import AsyncEngine

SSE_DONE = "data: [DONE]\n\n"
# Niceness of the tokenizer thread: below the engine's threads, so on a busy CPU a megabyte prompt
# being tokenized takes the cores the running streams leave, not the other way round.
TOKENIZER_NICENESS = 19
T = TypeVar("T")
# Normalizers can shrink text (NFC composes up to 3 code points into 1): a margin on the bound below.
_NORMALIZER_MARGIN = 4


def _yield_to_the_engine() -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads on their own niceness)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TOKENIZER_NICENESS)
    except (AttributeError, OSError):      # no per-thread priority here: it runs at the engine's
        pass


@dataclass
class ServerContext:
    engine: AsyncEngine
    metrics: ServerMetrics
    served_model_name: str | None = None   # overrides engine.model_name in requests and responses
    start_error: str | None = None         # why the engine failed to start, once it has
    parse_message_special_tokens: bool = False   # True: special-token text in chat content is control
    draining: bool = False                 # shutting down: new requests get 503, running ones finish
    closed: bool = False                   # the drain timed out: nothing new reaches the engine
    generations: set = field(default_factory=set)   # the Generations running now (drain ends them)
    _blocking: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="trident-tokenize", initializer=_yield_to_the_engine))

    async def run_blocking(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` in the tokenizer thread. One thread: HF tokenizers are not safe to share across
        threads, and the event loop stays free either way (the Rust tokenizer releases the GIL)."""
        return await asyncio.get_running_loop().run_in_executor(self._blocking, fn, *args)

    def close_threads(self) -> None:
        self._blocking.shutdown(wait=False, cancel_futures=True)

    @cached_property
    def max_prompt_chars(self) -> int:
        """Characters beyond which a text cannot fit the context whatever it says.

        No token covers more input characters than the longest vocabulary entry, so a text longer than
        that times max_model_len (times a margin for normalizers) needs more tokens than fit. Such a
        prompt is refused without tokenizing it: a 10 MB prompt costs microseconds, not seconds."""
        longest = max(map(len, self.tokenizer.hf.get_vocab()))
        return _NORMALIZER_MARGIN * longest * self.engine.max_model_len

    @cached_property
    def special_token_texts(self) -> tuple[str, ...]:
        """The texts the tokenizer turns into added (control) tokens, such as `<|im_start|>`."""
        return tuple(t.content for t in self.tokenizer.hf.added_tokens_decoder.values() if t.content)

    @cached_property
    def plain_text_tokenizer(self):
        """A copy of the Rust tokenizer that reads special-token text as plain characters (a copy, as
        flipping the flag on the shared one would race with other requests)."""
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(self.tokenizer.hf.backend_tokenizer.to_str())
        plain.encode_special_tokens = True
        return plain

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        """400 context_length_exceeded for a text too long to fit the context (see max_prompt_chars)."""
        if num_chars > self.max_prompt_chars:
            raise context_length_error(
                f"this model's maximum context length is {self.engine.max_model_len} tokens; a text of "
                f"{num_chars} characters cannot fit it (at most {self.max_prompt_chars} characters are tokenized)",
                param)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.model_name

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_ready(self) -> None:
        """503 while the model loads, after the engine failed, and while the server shuts down."""
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another replica",
                           code="server_shutting_down")
        if self.start_error is not None or self.engine.errored:
            error = self.engine.error
            reason = self.start_error or "the engine stopped after an unrecoverable error" + (
                f" ({type(error).__name__}: {error})" if error is not None else "")
            raise APIError(503, f"engine unavailable: {reason}", code="engine_dead")
        if not self.engine.ready:
            raise APIError(503, "the model is still loading; retry when /health answers 200",
                           code="model_loading")

    def check_model(self, model: str | None) -> None:
        """404 unless `model` is absent, empty, or the served name."""
        if model and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        """400 for an empty prompt or token ids outside the vocabulary."""
        if not token_ids:
            raise APIError(400, "the prompt is empty", param=param)
        vocab_size = self.tokenizer.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param=param)

    def new_generation(self, request_id: str, prompts: list[list[int]], params: SamplingParams) -> Generation:
        if self.closed:
            raise APIError(503, "the server shut down before this request started", code="server_shutting_down")
        return Generation(self.engine, self.metrics, request_id, prompts, params, registry=self.generations)

    def engine_load(self) -> dict[str, int]:
        """What the engine holds right now: sequences running and waiting, KV blocks in use. All three
        return to 0 when the server is idle; the soak checks that they do."""
        engine = self.engine.engine
        scheduler, blocks = engine.scheduler, engine.block_manager
        return {"running": len(scheduler.running), "waiting": len(scheduler.waiting),
                "kv_blocks_used": blocks.num_blocks - blocks.num_free_blocks, "kv_blocks_total": blocks.num_blocks}


@dataclass
class ChoiceStream:
    """What has been sent of one streamed choice, to turn cumulative outputs into deltas."""

    num_chars: int = 0        # generated text already sent
    num_tokens: int = 0       # generated tokens whose logprobs were sent
    text_offset: int = 0      # completions logprobs: offset of the next token in the choice text
    started: bool = False     # a first chunk went out (echo and role ride on it)
    finished: bool = False    # the finish_reason went out


def sampling_params_of(request: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    """The request's SamplingParams; their checks fail as 400s naming the field when they can."""
    try:
        return request.to_sampling_params()
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]   # engine messages start with the field: "top_p must be ..."
        raise APIError(400, str(exc), param=field if field in type(request).model_fields else None) from exc


def random_id(prefix: str) -> str:
    """OpenAI-style object id, e.g. "cmpl-3f2a..."."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_of(finals: list[RequestOutput]) -> UsageInfo:
    """Usage summed over the prompts of one HTTP request (each prompt counted once for any n)."""
    prompt_tokens = sum(out.num_prompt_tokens for out in finals)
    completion_tokens = sum(out.num_output_tokens for out in finals)
    return make_usage(prompt_tokens, completion_tokens, merge_summaries([out.pruning for out in finals]))


def sse_event(payload: BaseModel | dict) -> str:
    """One server-sent event: `data: {json}` and a blank line."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def sse_response(generation: Generation, events: AsyncIterator[str]) -> StreamingResponse:
    """Streams `events`, then `data: [DONE]`. An error mid-stream becomes an error event.

    The generation is closed (its unfinished requests aborted) when the stream ends, fails, or the
    client leaves: Starlette then stops iterating and runs the background task.
    """

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except Exception as exc:   # the status line is already sent: report in-band
            yield sse_event(engine_error(exc).to_body())
        finally:
            generation.close()
        yield SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(generation.aclose))


async def respond(raw: Request, generation: Generation, stream: bool,
                  events: Callable[[Generation], AsyncIterator[str]],
                  build: Callable[[list[RequestOutput]], BaseModel]) -> Response:
    """Runs `generation` for one HTTP request: SSE of `events(generation)`, or JSON of `build(finals)`.

    A stream starts only once every prompt has its first output, so admission errors get their own
    status code. A client that leaves while we wait gets its requests aborted (and a 499 nobody reads).
    """
    streaming = False
    try:
        if stream:
            await unless_disconnected(raw, generation.start())
            streaming = True   # from here on the response owns the generation
            return sse_response(generation, events(generation))
        finals = await unless_disconnected(raw, generation.collect())
        # pydantic's JSON writes NaN/inf logprobs as null where json.dumps would refuse them
        return Response(build(finals).model_dump_json(), media_type="application/json")
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        if not streaming:
            generation.close()
