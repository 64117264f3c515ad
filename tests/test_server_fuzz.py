"""A bounded fuzz run: schemathesis generates requests from the server's own OpenAPI document, valid
and invalid, and checks every answer against it: no 5xx, only documented status codes, content
types and response schemas, invalid data refused, 405s with Allow.

Fixed: the seed (derandomized), the number of cases per operation. The generated `max_tokens` and
`n` are capped so the tiny model answers quickly. The whole run has a budget of two minutes, which
every case checks: a run that outgrows it fails, and `max_examples` is to be lowered.
"""
from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from tests.test_server import RemoteServer
from trident.engine.async_engine import AsyncEngine
from trident.engine.config import EngineConfig
from trident.server.app import build_app

MAX_TOKENS = 4      # generated token limits above this are lowered to it
MAX_N = 2
BUDGET_S = 120.0    # the whole fuzz run, server start excluded


def cap_tokens(body):
    """Caps generated token limits, leaving what is invalid (negative, not an integer) invalid. A
    request without a limit (up to the context for chat, 16 for completions) gets the cap too."""
    if isinstance(body, dict):
        if ("messages" in body or "prompt" in body) and body.get("max_tokens") is None \
                and body.get("max_completion_tokens") is None:
            body["max_tokens"] = MAX_TOKENS
        for name, cap in (("max_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS), ("n", MAX_N)):
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                body[name] = cap
    return body


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # a short context bounds every generation, whatever the cases ask for
    srv = RemoteServer(tiny_model_dir, tmp_path_factory.mktemp("logs") / "server.log", "--max-model-len", "32")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fuzz_started(server) -> float:
    return time.monotonic()


# The document the server publishes (test_server_hardening checks that it serves this one); built
# without a model, as the document does not depend on one.
schema = schemathesis.openapi.from_dict(build_app(AsyncEngine(EngineConfig(model="unused"))).openapi())


@schema.parametrize()
@settings(max_examples=40, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_openapi_fuzz(server, fuzz_started, case):
    spent = time.monotonic() - fuzz_started
    assert spent < BUDGET_S, f"the fuzz run took {spent:.0f} s, over its {BUDGET_S:.0f} s budget: lower max_examples"
    # Here rather than in a map_body hook: schemathesis's coverage phase builds cases without hooks.
    case.body = cap_tokens(case.body)
    # Left out: positive_data_acceptance. Schema-valid requests the server must refuse exist, each
    # with a documented 400: token ids outside the vocabulary, prompts over the context, min_tokens
    # over max_tokens, top_logprobs without logprobs. Everything else is checked.
    case.call_and_validate(base_url=server.url, excluded_checks=[positive_data_acceptance])
