"""The FastAPI app: engine lifecycle, API-key check, routes.

The engine starts in the background when the app starts, so the port answers at once:
`/health` is 503 while the model loads, after the engine failed and while the server shuts down,
200 when ready, and every model endpoint answers 503 until then. `/health` and `/metrics` need no
API key. Bodies over `max_request_bytes` get 413 before parsing (server/limits.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, Response
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from trident.server.chat import ChatServer, chat_prompt_ids
from trident.server.completions import CompletionServer
from trident.server.context import ServerContext
from trident.server.errors import APIError, install_error_handlers
from trident.server.engine_stats import EngineStats
from trident.server.limits import DEFAULT_MAX_REQUEST_BYTES, InFlight, RequestGuard, drain
from trident.server.metrics import RequestCounterMiddleware, ServerMetrics
from trident.server.openapi import error_responses, install_openapi
from trident.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                     CompletionResponse, DetokenizeRequest, DetokenizeResponse, HealthResponse,
                                     ModelCard, ModelList, TokenizeRequest, TokenizeResponse)

logger = logging.getLogger(__name__)


async def _start_engine(ctx: ServerContext, on_failure: Callable[[str], None] | None) -> None:
    """Loads the model; a failure is kept for /health and every later request (503), then passed
    to `on_failure`."""
    try:
        await ctx.engine.start()
        EngineStats.attach(ctx.metrics, ctx.engine, ctx.model_name)
        logger.info("engine ready: serving %s (max_model_len %d)", ctx.model_name, ctx.engine.max_model_len)
    except Exception as exc:
        ctx.start_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (ValueError, OSError)):      # bad input (model, plan, flags): the message says it
            logger.error("engine failed to start: %s", ctx.start_error)
        else:
            logger.exception("engine failed to start")
        if on_failure is not None:
            on_failure(ctx.start_error)


class BearerAuthMiddleware:
    """Pure ASGI middleware answering 401 on `protected` paths unless the request carries
    `Authorization: Bearer <api_key>` (the scheme is case-insensitive, RFC 9110). It runs before the
    route reads the body, so a request without the key gets 401 whatever its body holds (a route
    dependency runs after FastAPI has parsed the body, and bad JSON would answer 400 first)."""

    def __init__(self, app: ASGIApp, api_key: str, protected: set[str]) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and get_route_path(scope) in self.protected:   # relative to a mount
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.expected)):
                response = APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                                    code="invalid_api_key").to_response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine, api_key: str | None = None, served_model_name: str | None = None,
              on_start_failure: Callable[[str], None] | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, allowed_origins: list[str] = (),
              parse_message_special_tokens: bool = False) -> FastAPI:
    """The OpenAI-compatible app around `engine` (an AsyncEngine, not started yet).

    api_key: when set, every endpoint but /health and /metrics needs it as a Bearer token.
    served_model_name: the name clients use and responses carry; default `engine.model_name`.
    on_start_failure: called with the reason when the engine fails to start (`trident serve`
    then exits); without it the app stays up and answers 503.
    max_request_bytes: larger bodies get 413 before they are parsed.
    allowed_origins: browser origins allowed by CORS ("*" for any); none by default.
    parse_message_special_tokens: read special-token text in chat messages as control tokens
    (default: as plain text, so user content cannot forge a turn).
    `app.state.drain(timeout_s)` runs the shutdown drain (server/limits.py).
    """
    ctx = ServerContext(engine, ServerMetrics(), served_model_name,
                        parse_message_special_tokens=parse_message_special_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(_start_engine(ctx, on_start_failure))
        try:
            yield
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            try:
                await engine.shutdown()
            except Exception:
                logger.exception("engine shutdown failed")
            ctx.close_threads()
            ctx.metrics.close()

    app = FastAPI(title="Trident", summary="OpenAI-compatible pruning-aware LLM server", lifespan=lifespan)
    install_error_handlers(app)
    install_openapi(app)
    # 200 is JSON, or an SSE stream with `"stream": true`
    model_errors = {**error_responses(400, 401, 404, 413, 429, 500, 503),
                    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}
    tool_errors = error_responses(400, 401, 404, 413, 500, 503)

    @app.get("/health", responses=error_responses(503))
    async def health() -> HealthResponse:
        ctx.check_ready()
        return HealthResponse(model=ctx.model_name, **ctx.engine_load())

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        ready = engine.ready and not engine.errored
        ctx.metrics.engine_ready.set(1 if ready else 0)
        return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)

    @app.get("/v1/models", responses=error_responses(401, 503))
    async def models() -> ModelList:
        ctx.check_ready()
        return ModelList(data=[ModelCard(id=ctx.model_name, max_model_len=engine.max_model_len)])

    @app.post("/v1/completions", responses=model_errors, response_model=CompletionResponse)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await CompletionServer(ctx, body).serve(raw)

    @app.post("/v1/chat/completions", responses=model_errors, response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await ChatServer(ctx, body).serve(raw)

    @app.post("/tokenize", responses=tool_errors)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """Exactly one of `prompt` and `messages` (400 otherwise); a text too long to fit the context is a 400."""
        ctx.check_ready()
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of `prompt` or `messages`")
        if body.messages is not None:
            messages = [m.to_template_dict() for m in body.messages]
            ctx.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
            token_ids = await ctx.run_blocking(chat_prompt_ids, ctx, messages, body.add_generation_prompt)
        else:
            ctx.check_prompt_chars(len(body.prompt), "prompt")
            token_ids = await ctx.run_blocking(ctx.tokenizer.encode, body.prompt, body.add_special_tokens)
        return TokenizeResponse(tokens=token_ids, count=len(token_ids), max_model_len=engine.max_model_len)

    @app.post("/detokenize", responses=tool_errors)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        ctx.check_ready()
        ctx.check_model(body.model)

        def checked_decode(tokens: list[int]) -> str:   # a 4 MB list takes a while: off the event loop
            if tokens:
                ctx.check_token_ids(tokens, "tokens")
            return ctx.tokenizer.decode(tokens, skip_special_tokens=False)

        return DetokenizeResponse(prompt=await ctx.run_blocking(checked_decode, body.tokens))

    if api_key:      # every route but health and metrics
        app.add_middleware(BearerAuthMiddleware, api_key=api_key,
                           protected={route.path for route in app.routes} - {"/health", "/metrics"})
    in_flight = InFlight()
    app.add_middleware(RequestGuard, max_request_bytes=max_request_bytes, in_flight=in_flight)
    if allowed_origins:   # outside the key check: browsers send CORS preflights without credentials
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(RequestCounterMiddleware, metrics=ctx.metrics,     # outermost: counts 401s too
                       endpoints={route.path for route in app.routes})
    app.state.drain = lambda timeout_s: drain(ctx, in_flight, timeout_s)
    return app
