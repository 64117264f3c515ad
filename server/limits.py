"""Request guards and the shutdown drain.

`RequestGuard` (pure ASGI, so streams and disconnect detection pass through untouched) refuses a
body over `--max-request-bytes` with 413 before anything parses it, and counts the requests in
flight. `drain` is what SIGTERM and SIGINT start (see cli.DrainingServer):

1. new requests and /health get an OpenAI-shaped 503 (`server_shutting_down`);
2. requests already in flight run to their end, for up to `timeout_s`;
3. what still runs then is ended: a stream gets an error event and `data: [DONE]`, a JSON request
   a 503; then the server may exit.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trident.server.context import ServerContext
from trident.server.errors import APIError

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
UNTRACKED = {"/health", "/metrics"}   # probes: a drain does not wait for them
GRACE_AFTER_ABORT_S = 5.0             # for ended requests to send their error before the server exits


def too_large(limit: int) -> HTTPException:
    # An HTTPException passes through FastAPI's body parsing unchanged (any other error there is a 400).
    return HTTPException(413, f"the request body exceeds this server's limit of {limit} bytes "
                              f"(--max-request-bytes)")


@dataclass
class InFlight:
    count: int = 0       # HTTP requests being served now, probes (UNTRACKED) aside


class RequestGuard:
    """Pure ASGI middleware: 413 for bodies over `max_request_bytes`, declared or streamed, and a
    count of the requests in flight for the drain."""

    def __init__(self, app: ASGIApp, max_request_bytes: int, in_flight: InFlight) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            error = too_large(limit) if declared.isdigit() else HTTPException(400, "invalid Content-Length")
            code = "request_too_large" if error.status_code == 413 else None
            await APIError(error.status_code, error.detail, code=code).to_response()(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:       # a chunked body that declared no length
                    raise too_large(limit)
            return message

        tracked = scope["path"] not in UNTRACKED
        self.in_flight.count += tracked
        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.in_flight.count -= tracked


async def drain(ctx: ServerContext, in_flight: InFlight, timeout_s: float) -> None:
    """Stops taking requests, lets those in flight finish for up to `timeout_s`, ends the rest."""
    loop = asyncio.get_running_loop()
    ctx.draining = True
    logger.warning("shutting down: %d requests in flight get up to %.0f s to finish", in_flight.count, timeout_s)
    deadline = loop.time() + timeout_s
    while in_flight.count and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if not in_flight.count:
        return
    logger.warning("shutting down: ending %d requests still in flight", in_flight.count)
    ctx.closed = True
    error = APIError(503, f"the server shut down before this request finished ({timeout_s:g} s drain)",
                     code="server_shutting_down")
    for generation in list(ctx.generations):
        generation.fail(error)
    deadline = loop.time() + GRACE_AFTER_ABORT_S
    while in_flight.count and loop.time() < deadline:
        await asyncio.sleep(0.05)
