"""What every endpoint shares: the engine, the metrics, request checks, SSE framing and usage."""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from trident.engine.outputs import RequestOutput
from trident.engine.pruning.accounting import merge_summaries
from trident.engine.sampling_params import SamplingParams
from trident.server.errors import APIError, engine_error
from trident.server.generation import ClientDisconnected, Generation, unless_disconnected
from trident.server.metrics import ServerMetrics
from trident.server.protocol import ChatCompletionRequest, CompletionRequest, UsageInfo, make_usage

if TYPE_CHECKING:
    from trident.engine.async_engine import AsyncEngine

SSE_DONE = "data: [DONE]\n\n"


@dataclass
class ServerContext:
    engine: AsyncEngine
    metrics: ServerMetrics
    served_model_name: str | None = None   # overrides engine.model_name in requests and responses
    start_error: str | None = None         # why the engine failed to start, once it has

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.model_name

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_ready(self) -> None:
        """503 while the model loads and after the engine failed."""
        if self.start_error is not None or self.engine.errored:
            reason = self.start_error or "the engine stopped after an unrecoverable error"
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
        return Generation(self.engine, self.metrics, request_id, prompts, params)


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
