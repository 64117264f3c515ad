"""The FastAPI app: engine lifecycle, API-key check, routes.

The engine starts in the background when the app starts, so the port answers at once:
`/health` is 503 while the model loads or after the engine failed, 200 when ready, and every
model endpoint answers 503 until then. `/health` and `/metrics` need no API key.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from trident.server.chat import ChatServer, chat_prompt_ids
from trident.server.completions import CompletionServer
from trident.server.context import ServerContext
from trident.server.errors import APIError, install_error_handlers
from trident.server.engine_stats import EngineStats
from trident.server.metrics import RequestCounterMiddleware, ServerMetrics
from trident.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
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
    `Authorization: Bearer <api_key>`. It runs before the route reads the body, so a request
    without the key gets 401 whatever its body holds (a route dependency runs after FastAPI has
    parsed the body, and bad JSON would answer 400 first)."""

    def __init__(self, app: ASGIApp, api_key: str, protected: set[str]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and get_route_path(scope) in self.protected:   # relative to a mount
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                                    code="invalid_api_key").to_response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine, api_key: str | None = None, served_model_name: str | None = None,
              on_start_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The OpenAI-compatible app around `engine` (an AsyncEngine, not started yet).

    api_key: when set, every endpoint but /health and /metrics needs it as a Bearer token.
    served_model_name: the name clients use and responses carry; default `engine.model_name`.
    on_start_failure: called with the reason when the engine fails to start (`trident serve`
    then exits); without it the app stays up and answers 503.
    """
    ctx = ServerContext(engine, ServerMetrics(), served_model_name)

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
            ctx.metrics.close()

    app = FastAPI(title="Trident", summary="OpenAI-compatible pruning-aware LLM server", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        ctx.check_ready()
        return {"status": "ok", "model": ctx.model_name}

    @app.get("/metrics")
    async def metrics() -> Response:
        ready = engine.ready and not engine.errored
        ctx.metrics.engine_ready.set(1 if ready else 0)
        return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)

    @app.get("/v1/models")
    async def models() -> ModelList:
        ctx.check_ready()
        return ModelList(data=[ModelCard(id=ctx.model_name, max_model_len=engine.max_model_len)])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await CompletionServer(ctx, body).serve(raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await ChatServer(ctx, body).serve(raw)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ctx.check_ready()
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of `prompt` or `messages`")
        if body.messages is not None:
            messages = [m.to_template_dict() for m in body.messages]
            token_ids = chat_prompt_ids(ctx, messages, body.add_generation_prompt)
        else:
            token_ids = ctx.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(tokens=token_ids, count=len(token_ids), max_model_len=engine.max_model_len)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        ctx.check_ready()
        ctx.check_model(body.model)
        if body.tokens:
            ctx.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens, skip_special_tokens=False))

    if api_key:      # every route but health and metrics
        app.add_middleware(BearerAuthMiddleware, api_key=api_key,
                           protected={route.path for route in app.routes} - {"/health", "/metrics"})
    app.add_middleware(RequestCounterMiddleware, metrics=ctx.metrics,     # outermost: counts 401s too
                       endpoints={route.path for route in app.routes})
    return app
