"""OpenAI-shaped errors: one exception type, the engine's exceptions mapped to HTTP codes, handlers.

Every error leaves the server as {"error": {"message", "type", "param", "code"}} with the HTTP
status the OpenAI SDK maps to its exception classes (400 BadRequestError, 401 AuthenticationError,
404 NotFoundError, 413 and 405 APIStatusError, 429 RateLimitError, 500 and 503 InternalServerError).
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from trident.engine.async_engine import EngineDeadError, QueueFullError
from trident.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered to the client with `status` and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers     # e.g. `Allow` on a 405

    def to_body(self) -> dict:
        """The JSON body, also sent as the payload of an SSE error event mid-stream."""
        info = ErrorInfo(message=self.message, type=ERROR_TYPES.get(self.status, "server_error"),
                         param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.to_body(), status_code=self.status, headers=self.headers)


def context_length_error(message: str, param: str | None = "prompt") -> APIError:
    """A 400 with OpenAI's `context_length_exceeded` code."""
    return APIError(400, message, param=param, code="context_length_exceeded")


def engine_error(exc: BaseException) -> APIError:
    """Maps what `engine.generate` raises: bad input 400, queue full 429, engine dead 503."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc) or "the engine's waiting queue is full; retry later", code="queue_full")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc) or "the engine has failed", code="engine_dead")
    if isinstance(exc, ValueError):
        # The engine's context checks say "maximum context length"; tests/test_server_hardening.py
        # pins that wording, so a change there fails a test rather than dropping the code.
        if "maximum context length" in str(exc):
            return context_length_error(str(exc), param=None)
        return APIError(400, str(exc))
    logger.error("request failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line per pydantic error, and the first offending field as `param`."""
    parts, param = [], None
    for error in exc.errors():
        if error.get("type") == "json_invalid":   # loc is a character position, not a field
            return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', '')}", None
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        param = param or where or None
        message = str(error.get("msg")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """Answers validation errors with 400 (not FastAPI's 422) and every error in OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).to_response()

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's 405 carries `Allow`, which RFC 9110 requires on a 405: keep its headers.
        code = "request_too_large" if exc.status_code == 413 else None
        return APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).to_response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return engine_error(exc).to_response()
