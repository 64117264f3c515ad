"""Perplexity of a text through any OpenAI-compatible server.

Each window is sent to /v1/completions with echo: true, logprobs: 1, max_tokens: 0; the server
answers the log-probability of every prompt token given the ones before it. The first token of a
window has no context (its logprob is null) and is skipped, so a window of W tokens scores W - 1:
    perplexity = exp(sum of -log p over scored tokens / number of scored tokens)
Windows are exact token ids when the server has /tokenize; otherwise the text is cut into word
windows and the server's own tokenization decides what is scored (not comparable across tokenizers).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import httpx

from trident.bench.client import ServerError, ServerTarget, ServerTokenizer, post_json
from trident.bench.datasets import TOKENS_PER_WORD

CHARS_PER_TOKEN = 5            # first guess of how much text to tokenize for the windows asked for


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float             # sum of -log p over the scored tokens (nats)
    num_scored_tokens: int
    num_windows: int
    window_unit: str           # "tokens": exact token windows; "words": fallback without /tokenize


@dataclass
class Windows:
    prompts: list[list[int]] | list[str]   # token-id windows, or text windows in the fallback
    unit: str                               # "tokens" | "words"


async def token_windows(tokenizer: ServerTokenizer, text: str, window: int, num_windows: int) -> list[list[int]]:
    """The last `num_windows` non-overlapping windows of `window` tokens of `text`: its end, which
    `trident calibrate` holds out of calibration (it reads the start). The tail is tokenized from a
    character cut, whose first tokens (a split word, BOS) are left out; when the whole text is
    shorter than the windows asked for, every token of it is used and the last window may be
    shorter. Windows under 2 tokens are dropped."""
    needed = window * num_windows
    chars = needed * CHARS_PER_TOKEN
    while True:
        ids = await tokenizer.encode(text[-chars:])
        # two tokens of margin: the cut at `chars` may split a word, and encoding may add BOS
        if len(ids) >= needed + 2 or chars >= len(text):
            break
        chars *= 2
    ids = ids[-needed:]
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 2]


def word_windows(text: str, window: int, num_windows: int) -> list[str]:
    """Fallback windows of about `window` tokens, cut at word boundaries: the last words of the
    text, like `token_windows`."""
    words = text.split()
    per_window = max(2, round(window / TOKENS_PER_WORD))
    words = words[-per_window * num_windows:]
    return [" ".join(words[i:i + per_window]) for i in range(0, len(words), per_window)]


async def build_windows(client: httpx.AsyncClient, target: ServerTarget, model: str, text: str,
                        window: int, num_windows: int) -> Windows:
    """Token windows through the server's tokenizer, or word windows (with a warning) without one."""
    if window < 2 or num_windows < 1:
        raise ValueError(f"need --window >= 2 and --num-windows >= 1, got {window} and {num_windows}")
    if not text.strip():
        raise ValueError("the perplexity text is empty")
    tokenizer = await ServerTokenizer.probe(client, target, model)
    if tokenizer is not None:
        return Windows(await token_windows(tokenizer, text, window, num_windows), "tokens")
    print(f"warning: {target.base_url} has no /tokenize; perplexity windows are cut at words "
          f"(~{window} tokens each) and scored with the server's own tokenization", file=sys.stderr)
    return Windows(word_windows(text, window, num_windows), "words")


async def prompt_logprobs(client: httpx.AsyncClient, target: ServerTarget, model: str,
                          prompt: str | list[int], extra_body: dict | None = None) -> list[float | None]:
    """Log-probability of each prompt token given the previous ones (first entry None)."""
    body = {"model": model, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0.0}
    body.update(extra_body or {})
    answer = await post_json(client, target, "/v1/completions", body)
    try:
        logprobs = answer["choices"][0]["logprobs"]["token_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise ServerError("the completions answer has no choices[0].logprobs.token_logprobs; "
                          "the server must support echo with logprobs") from None
    num_prompt = len(prompt) if isinstance(prompt, list) else (answer.get("usage") or {}).get("prompt_tokens")
    return logprobs[:num_prompt] if num_prompt else logprobs


def window_nll(logprobs: list[float | None]) -> tuple[float, int]:
    """(sum of -log p, count) over a window's tokens after the first."""
    scored = logprobs[1:]
    if any(lp is None for lp in scored):
        raise ServerError("the server returned a null logprob past the first token of a window")
    return -sum(scored), len(scored)


async def perplexity(client: httpx.AsyncClient, target: ServerTarget, model: str, windows: Windows,
                     extra_body: dict | None = None) -> PerplexityResult:
    """Perplexity over all windows (one request per window, sent in order)."""
    nll_sum, count = 0.0, 0
    for prompt in windows.prompts:
        nll, n = window_nll(await prompt_logprobs(client, target, model, prompt, extra_body))
        nll_sum, count = nll_sum + nll, count + n
    if count == 0:
        raise ValueError("no token was scored: the text is too short for one window of 2 tokens")
    return PerplexityResult(math.exp(nll_sum / count), nll_sum, count, len(windows.prompts), windows.unit)
