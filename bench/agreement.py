"""Greedy agreement with a dense reference run.

Both runs decode the same prompts at temperature 0. Per prompt, the agreement is the number of
positions that match before the first divergence, divided by the longer of the two outputs
(1.0 when both are identical, including both empty). Positions are tokens, read from the
per-token logprobs the server returns; a server that returns none is compared per character.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from trident.bench.client import ENDPOINT_PATHS, GenerationRequest, ServerError, ServerTarget, build_payload, post_json

REFERENCE_VERSION = 1


@dataclass
class GreedyOutput:
    prompt: str
    tokens: list[str]          # one entry per position: token text, or characters in the fallback
    text: str
    unit: str                  # "tokens" | "chars"


@dataclass
class AgreementResult:
    mean_prefix_agreement: float   # mean over prompts of (agreeing prefix length / longer length)
    exact_match_rate: float        # fraction of prompts whose outputs are identical
    num_prompts: int
    unit: str
    per_prompt: list[float]


def prefix_agreement(reference: list[str], candidate: list[str]) -> float:
    """Matching positions before the first divergence / the longer length (1.0 for two empties)."""
    longest = max(len(reference), len(candidate))
    if longest == 0:
        return 1.0
    agree = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        agree += 1
    return agree / longest


def compare_outputs(reference: list[GreedyOutput], candidate: list[GreedyOutput]) -> AgreementResult:
    """Agreement of `candidate` with `reference`, prompt by prompt (same prompts, same order)."""
    if len(reference) != len(candidate):
        raise ValueError(f"the reference has {len(reference)} outputs, the run {len(candidate)}")
    if not reference:
        raise ValueError("no outputs to compare")
    for ref, cand in zip(reference, candidate):
        if ref.prompt != cand.prompt:
            raise ValueError(f"prompt mismatch with the reference: {ref.prompt[:60]!r} vs {cand.prompt[:60]!r}")
    units = {o.unit for o in reference + candidate}
    unit = units.pop() if len(units) == 1 else "chars"
    pairs = [(r.tokens, c.tokens) if unit == "tokens" else (list(r.text), list(c.text)) for r, c in zip(reference, candidate)]
    per_prompt = [prefix_agreement(r, c) for r, c in pairs]
    exact = sum(r == c for r, c in pairs) / len(pairs)
    return AgreementResult(sum(per_prompt) / len(per_prompt), exact, len(pairs), unit, per_prompt)


def _parse_answer(endpoint: str, prompt: str, answer: dict) -> GreedyOutput:
    try:
        choice = answer["choices"][0]
        logprobs = choice.get("logprobs") or {}
        if endpoint == "chat":
            text = (choice.get("message") or {}).get("content") or ""
            tokens = [entry["token"] for entry in logprobs.get("content") or []]
        else:
            text = choice.get("text") or ""
            tokens = list(logprobs.get("tokens") or [])
    except (KeyError, IndexError, TypeError) as exc:
        raise ServerError(f"unexpected {endpoint} answer ({exc}): {json.dumps(answer)[:300]}") from None
    if tokens or not text:
        return GreedyOutput(prompt, tokens, text, "tokens")
    return GreedyOutput(prompt, list(text), text, "chars")


async def greedy_outputs(client: httpx.AsyncClient, target: ServerTarget, model: str, prompts: list[str],
                         endpoint: str, max_tokens: int, extra_body: dict | None = None,
                         concurrency: int = 4) -> list[GreedyOutput]:
    """Temperature-0 outputs of `prompts` with per-token logprobs, `concurrency` requests at a time."""
    semaphore = asyncio.Semaphore(concurrency)
    logprob_fields = {"logprobs": True} if endpoint == "chat" else {"logprobs": 1}

    async def one(prompt: str) -> GreedyOutput:
        request = GenerationRequest(prompt, max_tokens, temperature=0.0,
                                    extra_body={**logprob_fields, **(extra_body or {})})
        async with semaphore:
            answer = await post_json(client, target, ENDPOINT_PATHS[endpoint],
                                     build_payload(endpoint, model, request, stream=False))
        return _parse_answer(endpoint, prompt, answer)

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def save_reference(path: str | Path, meta: dict, outputs: list[GreedyOutput]) -> None:
    """Write a reference run: `meta` (model, endpoint, max_tokens, ...) and its outputs."""
    document = {"version": REFERENCE_VERSION, **meta, "outputs": [asdict(o) for o in outputs]}
    Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def load_reference(path: str | Path, endpoint: str, max_tokens: int) -> list[GreedyOutput]:
    """Outputs of a saved reference; refuse one made with another endpoint or max_tokens."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference {path} not found: write one first with --save-reference")
    document = json.loads(path.read_text(encoding="utf-8"))
    if document.get("version") != REFERENCE_VERSION:
        raise ValueError(f"{path}: unsupported reference version {document.get('version')!r}")
    for key, value in (("endpoint", endpoint), ("max_tokens", max_tokens)):
        if document.get(key) != value:
            raise ValueError(f"{path} was made with {key}={document.get(key)!r}, this run uses {value!r}")
    return [GreedyOutput(**o) for o in document["outputs"]]
