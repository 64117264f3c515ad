"""The OpenAPI document, made to say what the server answers.

FastAPI documents 422 with its own validation schema for every route with a body; this server
answers invalid input with 400 in OpenAI's error shape. Each route lists the error statuses it can
return with `ErrorResponse` as their schema, and the 422 entries and their schemas are removed.
"""
from __future__ import annotations

from fastapi import FastAPI

from trident.server.protocol import ErrorResponse

ERRORS = {
    400: "invalid request: a field of the wrong type or range, an unsupported option, an empty or too long prompt",
    401: "missing or wrong API key (when the server runs with --api-key)",
    404: "unknown model",
    413: "request body over --max-request-bytes",
    429: "the engine's waiting queue is full",
    500: "the engine failed on this request",
    503: "the model is loading, the engine failed, or the server is shutting down",
}


def error_responses(*statuses: int) -> dict[int, dict]:
    """`responses=` entries for FastAPI routes: each status with its description and ErrorResponse."""
    return {status: {"model": ErrorResponse, "description": ERRORS[status]} for status in statuses}


def install_openapi(app: FastAPI) -> None:
    """Replaces app.openapi with a version that drops FastAPI's 422 entries and schemas."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
        return app.openapi_schema

    app.openapi = openapi
