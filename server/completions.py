"""POST /v1/completions: prompts in, OpenAI `text_completion` objects out, as JSON or SSE.

Several prompts (strings or token-id lists) run as separate engine requests; choice `index` is
prompt_index * n + completion_index. `echo` prepends the prompt (and, with `logprobs`, the prompt's
logprobs, first entry null), which with `max_tokens: 0` scores a text: what perplexity harnesses do.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from trident.engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from trident.server.context import (ChoiceStream, ServerContext, random_id, respond, sampling_params_of, sse_event,
                            usage_of)
from trident.server.errors import APIError
from trident.server.generation import Generation
from trident.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse


@dataclass
class Prompt:
    text: str              # what `echo` prepends: the string given, or the decoded token ids
    token_ids: list[int]


def prompt_items(ctx: ServerContext, prompt: str | list[str] | list[int] | list[list[int]]) -> list:
    """The request's prompts as a list (texts or token-id lists), checked before any tokenizing."""
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    items = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    limit = ctx.engine.config.scheduler.max_waiting
    if len(items) > limit:        # it could never be queued whole: 429 would invite endless retries
        raise APIError(400, f"a request holds at most {limit} prompts on this server (--max-waiting), "
                            f"got {len(items)}", param="prompt")
    for item in items:
        ctx.check_prompt_chars(len(item) if isinstance(item, str) else 0, "prompt")
    return items


def parse_prompts(ctx: ServerContext, items: list) -> list[Prompt]:
    """The prompts of `prompt_items`, tokenized (strings get the tokenizer's special tokens, e.g. BOS).
    Runs in the tokenizer thread (ctx.run_blocking)."""
    tokenizer, prompts = ctx.tokenizer, []
    for item in items:
        token_ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
        ctx.check_token_ids(token_ids, "prompt")
        # Token-id prompts echo as their tokens read, special tokens included (as the logprobs show them).
        text = item if isinstance(item, str) else tokenizer.decode(token_ids, skip_special_tokens=False)
        prompts.append(Prompt(text, token_ids))
    return prompts


def append_logprobs(logprobs: CompletionLogprobs, tokenizer, token_ids: list[int],
                    entries: list[TokenLogprobs | None] | None, text_offset: int) -> int:
    """Appends one position per token; returns the text offset after the last one.

    Token strings are each token's decoded text, as OpenAI and vLLM return them (" Paris", not the
    tokenizer's raw "ĠParis"); offsets advance by that text's length.
    """
    entries = entries if entries is not None else [None] * len(token_ids)
    for token_id, entry in zip(token_ids, entries):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        logprobs.tokens.append(text)
        logprobs.text_offset.append(text_offset)
        text_offset += len(text)
        if entry is None:   # the first prompt token has no context to be scored in
            logprobs.token_logprobs.append(None)
            logprobs.top_logprobs.append(None)
            continue
        logprobs.token_logprobs.append(entry.get(token_id))
        ranked = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)
        logprobs.top_logprobs.append({tokenizer.decode([i], skip_special_tokens=False): lp for i, lp in ranked})
    return text_offset


class CompletionServer:
    """Serves one CompletionRequest."""

    def __init__(self, ctx: ServerContext, request: CompletionRequest) -> None:
        ctx.check_ready()
        ctx.check_model(request.model)
        self.ctx, self.request = ctx, request
        self.params = sampling_params_of(request)
        self.items = prompt_items(ctx, request.prompt)
        self.prompts: list[Prompt] = []
        self.request_id = random_id("cmpl")
        self.model = ctx.model_name
        self.created = int(time.time())

    def _choice(self, prompt_index: int, prompt: Prompt, out: RequestOutput, output: CompletionOutput,
                state: ChoiceStream) -> CompletionChoice | None:
        """The delta of `output` since `state`; None when there is nothing new to send."""
        tokenizer, echo = self.ctx.tokenizer, self.request.echo and not state.started
        text = (prompt.text if echo else "") + output.text[state.num_chars:]
        logprobs = None
        if self.params.logprobs is not None:
            logprobs = CompletionLogprobs()
            if echo:
                append_logprobs(logprobs, tokenizer, prompt.token_ids, out.prompt_logprobs, 0)
                state.text_offset = len(prompt.text)
            new_entries = output.logprobs[state.num_tokens:] if output.logprobs is not None else None
            state.text_offset = append_logprobs(logprobs, tokenizer, output.token_ids[state.num_tokens:],
                                                new_entries, state.text_offset)
        has_news = text or (logprobs and logprobs.tokens) or output.finish_reason
        state.num_chars, state.num_tokens = len(output.text), len(output.token_ids)
        state.started, state.finished = True, output.finish_reason is not None
        if not has_news:
            return None
        return CompletionChoice(index=prompt_index * self.params.n + output.index, text=text, logprobs=logprobs,
                                finish_reason=output.finish_reason, stop_reason=output.stop_reason)

    async def serve(self, raw: Request) -> Response:
        """JSON answer or SSE stream; the engine requests are aborted if the client leaves."""
        self.prompts = await self.ctx.run_blocking(parse_prompts, self.ctx, self.items)
        generation = self.ctx.new_generation(self.request_id, [p.token_ids for p in self.prompts], self.params)
        return await respond(raw, generation, self.request.stream, self._events, self._response)

    def _response(self, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for prompt_index, (prompt, out) in enumerate(zip(self.prompts, finals)):
            for output in out.outputs:
                choices.append(self._choice(prompt_index, prompt, out, output, ChoiceStream()))
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(id=self.request_id, model=self.model, created=self.created, choices=choices,
                                  usage=usage_of(finals))

    async def _events(self, generation: Generation) -> AsyncIterator[str]:
        """SSE events: one chunk per choice with news, then the usage chunk if asked for."""
        states: dict[int, ChoiceStream] = {}
        async for prompt_index, out in generation.outputs():
            for output in out.outputs:
                state = states.setdefault(prompt_index * self.params.n + output.index, ChoiceStream())
                if state.finished:
                    continue
                choice = self._choice(prompt_index, self.prompts[prompt_index], out, output, state)
                if choice is not None:
                    yield sse_event(CompletionResponse(id=self.request_id, model=self.model, created=self.created,
                                                       choices=[choice]))
        if self.request.include_usage:
            yield sse_event(CompletionResponse(id=self.request_id, model=self.model, created=self.created, choices=[],
                                               usage=usage_of(generation.finals)))
