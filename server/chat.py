"""POST /v1/chat/completions: messages through the tokenizer's chat template, one engine request.

Streams follow OpenAI: each choice's first chunk carries `delta.role = "assistant"`, then content
deltas, and the chunk with `finish_reason` closes the choice. Logprobs use OpenAI's chat format:
`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}` with decoded token text.
"""
from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from trident.engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from trident.server.context import (ChoiceStream, ServerContext, random_id, respond, sampling_params_of, sse_event,
                            usage_of)
from trident.server.errors import APIError
from trident.server.generation import Generation
from trident.server.protocol import (ChatChoice, ChatChoiceLogprobs, ChatCompletionChunk, ChatCompletionRequest,
                             ChatCompletionResponse, ChatMessageOut, ChatStreamChoice, ChatTokenLogprob,
                             ChatTopLogprob, DeltaMessage)


def _render(ctx: ServerContext, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except ValueError as exc:
        raise APIError(400, f"invalid messages: {exc}", param="messages") from exc


def _special_in(text: str | None, specials: tuple[str, ...]) -> str | None:
    return next((s for s in specials if s in text), None) if text else None


def _ids_with_plain_content(ctx: ServerContext, messages: list[dict], add_generation_prompt: bool,
                            text: str, special: str) -> list[int]:
    """Token ids of `text` (the rendered conversation) in which each message's content is tokenized
    as plain text: the template is rendered again with a unique mark for each content, the marks
    cut it into template pieces (control tokens parsed) and contents (special tokens split)."""
    nonce = secrets.token_hex(8)
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    marked = _render(ctx, [{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt)
    pieces, rest = [], marked
    for mark in marks:
        before, found, rest = rest.partition(mark)
        if not found or mark in rest:
            break
        pieces.append(before)
    contents = [m["content"] for m in messages]
    rebuilt = "".join(p + c for p, c in zip(pieces, contents)) + rest
    if len(pieces) != len(messages) or rebuilt != text:   # the template drops, repeats or edits content
        raise APIError(400, f"a message holds the special token {special!r}, which this model's chat template "
                            f"cannot keep as plain text; remove it (or start the server with "
                            f"--message-special-tokens parse)", param="messages")
    encode, plain = ctx.tokenizer.encode, ctx.plain_text_tokenizer
    token_ids: list[int] = []
    for piece, content in zip(pieces, contents):
        token_ids += encode(piece, add_special_tokens=False)
        token_ids += plain.encode(content, add_special_tokens=False).ids
    return token_ids + encode(rest, add_special_tokens=False)


def chat_prompt_ids(ctx: ServerContext, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the templated conversation; a template that rejects the messages is a 400.

    The template's own markers are the only control tokens: special-token text inside a message
    (`<|im_end|>\\n<|im_start|>system` typed by a user) is tokenized as the plain characters it is,
    so content cannot close its turn and open another. `--message-special-tokens parse` restores
    parsing it, for templates that need it. A role or name holding such text is a 400.
    Runs in the tokenizer thread (ctx.run_blocking)."""
    specials = ctx.special_token_texts
    for i, message in enumerate(messages):
        for key in ("role", "name"):
            found = _special_in(message.get(key), specials)
            if found is not None:
                raise APIError(400, f"messages[{i}].{key} holds the special token {found!r}",
                               param=f"messages.{i}.{key}")
    text = _render(ctx, messages, add_generation_prompt)
    special = next((s for m in messages if (s := _special_in(m["content"], specials))), None)
    if special is None or ctx.parse_message_special_tokens:
        # the template writes BOS and other special tokens itself
        token_ids = ctx.tokenizer.encode(text, add_special_tokens=False)
    else:
        token_ids = _ids_with_plain_content(ctx, messages, add_generation_prompt, text, special)
    ctx.check_token_ids(token_ids, "messages")
    return token_ids


class ChatServer:
    """Serves one ChatCompletionRequest."""

    def __init__(self, ctx: ServerContext, request: ChatCompletionRequest) -> None:
        ctx.check_ready()
        ctx.check_model(request.model)
        self.ctx, self.request = ctx, request
        self.params = sampling_params_of(request)
        self.messages = [m.to_template_dict() for m in request.messages]
        ctx.check_prompt_chars(sum(len(m["content"]) for m in self.messages), "messages")
        self.request_id = random_id("chatcmpl")
        self.model = ctx.model_name
        self.created = int(time.time())

    def _top(self, token_id: int, logprob: float) -> dict:
        text = self.ctx.tokenizer.decode([token_id], skip_special_tokens=False)   # <|im_end|>, not ""
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, token_ids: list[int], entries: list[TokenLogprobs] | None) -> ChatChoiceLogprobs | None:
        """Logprobs of `token_ids`, each with its `top_logprobs` best alternatives."""
        if self.params.logprobs is None or not token_ids:
            return None
        content = []
        for token_id, entry in zip(token_ids, entries or []):
            ranked = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:self.params.logprobs]
            content.append(ChatTokenLogprob(**self._top(token_id, entry[token_id]),
                                            top_logprobs=[ChatTopLogprob(**self._top(i, lp)) for i, lp in ranked]))
        return ChatChoiceLogprobs(content=content)

    async def serve(self, raw: Request) -> Response:
        """JSON answer or SSE stream; the engine request is aborted if the client leaves."""
        prompt_ids = await self.ctx.run_blocking(chat_prompt_ids, self.ctx, self.messages)
        generation = self.ctx.new_generation(self.request_id, [prompt_ids], self.params)
        return await respond(raw, generation, self.request.stream, self._events, self._response)

    def _response(self, finals: list[RequestOutput]) -> ChatCompletionResponse:
        choices = [ChatChoice(index=o.index, message=ChatMessageOut(content=o.text),
                              logprobs=self._logprobs(o.token_ids, o.logprobs),
                              finish_reason=o.finish_reason, stop_reason=o.stop_reason)
                   for o in sorted(finals[0].outputs, key=lambda o: o.index)]
        return ChatCompletionResponse(id=self.request_id, model=self.model, created=self.created, choices=choices,
                                      usage=usage_of(finals))

    def _chunk(self, choices: list[ChatStreamChoice], usage=None) -> str:
        return sse_event(ChatCompletionChunk(id=self.request_id, model=self.model, created=self.created,
                                             choices=choices, usage=usage))

    def _delta(self, output: CompletionOutput, state: ChoiceStream) -> ChatStreamChoice | None:
        """The news of `output` since `state`; None when there is none."""
        text = output.text[state.num_chars:]
        new_entries = output.logprobs[state.num_tokens:] if output.logprobs is not None else None
        logprobs = self._logprobs(output.token_ids[state.num_tokens:], new_entries)
        state.num_chars, state.num_tokens = len(output.text), len(output.token_ids)
        state.finished = output.finish_reason is not None
        if not (text or logprobs or state.finished):
            return None
        return ChatStreamChoice(index=output.index, delta=DeltaMessage(content=text or None), logprobs=logprobs,
                                finish_reason=output.finish_reason, stop_reason=output.stop_reason)

    async def _events(self, generation: Generation) -> AsyncIterator[str]:
        """Role chunks, content deltas as the engine produces them, then usage if asked for."""
        for index in range(self.params.n):
            yield self._chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
        states = [ChoiceStream() for _ in range(self.params.n)]
        async for _, out in generation.outputs():
            for output in out.outputs:
                if states[output.index].finished:
                    continue
                choice = self._delta(output, states[output.index])
                if choice is not None:
                    yield self._chunk([choice])
        if self.request.include_usage:
            yield self._chunk([], usage=usage_of(generation.finals))
