"""Prompt sets for the benchmarks: alpaca seed tasks, random prompts, WikiText passages.

Token lengths are exact when the server exposes /tokenize (see bench.client.ServerTokenizer);
otherwise they are estimated from word counts and the benchmark reads real counts from usage.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trident.bench.client import ServerTokenizer

ALPACA_FILE = "alpaca-seed-tasks.jsonl"
WIKITEXT_FILE = "wikitext2-valid.txt"
TOKENS_PER_WORD = 1.3          # rough English BPE ratio, only used without a tokenizer
VOCAB_SAMPLE_CHARS = 50_000    # WikiText text tokenized to learn which token ids are ordinary text


@dataclass(frozen=True)
class SampleRequest:
    """A prompt and how many tokens to ask for."""

    prompt: str
    prompt_len: int        # tokens in the prompt (exact with a tokenizer, estimated without)
    output_len: int        # max_tokens of the request


@dataclass(frozen=True)
class AlpacaTask:
    instruction: str
    input: str
    output: str            # the human-written reference answer

    @property
    def prompt(self) -> str:
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def default_data_dir() -> Path:
    """The data shipped with Trident (`bench/data/`, package data of `trident.bench`)."""
    return Path(__file__).resolve().parent / "data"


def require_data_file(data_dir: str | Path, name: str) -> Path:
    """Path of a data file, or a FileNotFoundError that says which flag fixes it."""
    path = Path(data_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found: pass --data-dir pointing at a folder that holds {name}")
    return path


def positive_int(text: str) -> int:
    """argparse type of the bench scripts' counts: an integer >= 1."""
    value = int(text)                       # a ValueError: argparse reports the invalid value
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def require_writable(path: str | Path) -> Path:
    """`path` (a result file), its folder created; a PermissionError naming it unless it can be
    written. Benchmarks call this before they measure, so a bad path cannot throw results away."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"result path {path} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write results to {path}")
    return path


def load_alpaca(path: str | Path) -> list[AlpacaTask]:
    """All seed tasks of the alpaca JSONL file (first instance of each)."""
    tasks = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            instance = (row.get("instances") or [{}])[0]
            tasks.append(AlpacaTask(row["instruction"], instance.get("input", ""), instance.get("output", "")))
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{path}:{line_no}: not an alpaca seed task ({exc})") from None
    if not tasks:
        raise ValueError(f"{path} holds no tasks")
    return tasks


def load_wikitext_words(path: str | Path) -> list[str]:
    """WikiText as one list of words (headings included, blank lines dropped)."""
    words = Path(path).read_text(encoding="utf-8").split()
    if not words:
        raise ValueError(f"{path} holds no text")
    return words


def estimate_tokens(text: str) -> int:
    """Token count guessed from words, for servers without /tokenize."""
    return max(1, math.ceil(len(text.split()) * TOKENS_PER_WORD))


async def count_tokens(tokenizer: ServerTokenizer | None, text: str) -> int:
    """Exact token count through the server when possible, else an estimate."""
    if tokenizer is None:
        return estimate_tokens(text)
    return len(await tokenizer.encode(text))


def sample_lengths(mean_len: int, range_ratio: float, num: int, rng: np.random.Generator) -> list[int]:
    """`num` lengths uniform in [mean * (1 - r), mean * (1 + r)], each at least 1."""
    if mean_len < 1:
        raise ValueError(f"lengths must be at least 1, got {mean_len}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(mean_len * (1 - range_ratio)))
    high = max(low, math.ceil(mean_len * (1 + range_ratio)))
    return [int(x) for x in rng.integers(low, high + 1, size=num)]


async def alpaca_requests(
    tasks: list[AlpacaTask], num: int, rng: np.random.Generator, tokenizer: ServerTokenizer | None,
    max_tokens: int | None = None,
) -> list[SampleRequest]:
    """`num` tasks in a seeded shuffled order (cycling when num > 175); output length = the
    reference answer's token count unless `max_tokens` overrides it."""
    order = rng.permutation(len(tasks))
    requests = []
    for i in range(num):
        task = tasks[int(order[i % len(tasks)])]
        output_len = max_tokens or max(1, await count_tokens(tokenizer, task.output))
        requests.append(SampleRequest(task.prompt, await count_tokens(tokenizer, task.prompt), output_len))
    return requests


async def random_requests(
    words: list[str], num: int, input_len: int, output_len: int, range_ratio: float,
    rng: np.random.Generator, tokenizer: ServerTokenizer | None,
) -> list[SampleRequest]:
    """Prompts of random tokens: random ids from the server's tokenizer (drawn from the ids that
    ordinary WikiText text uses, so no special tokens), decoded to text and re-counted; without a
    tokenizer, random WikiText words of about the same token count."""
    input_lens = sample_lengths(input_len, range_ratio, num, rng)
    output_lens = sample_lengths(output_len, range_ratio, num, rng)
    vocab = None
    if tokenizer is not None:
        sample_text = " ".join(words)[:VOCAB_SAMPLE_CHARS]
        vocab = np.unique(np.asarray(await tokenizer.encode(sample_text, add_special_tokens=False)))
    requests = []
    for n_in, n_out in zip(input_lens, output_lens):
        if vocab is not None:
            text = await tokenizer.decode([int(t) for t in rng.choice(vocab, size=n_in)])
            prompt_len = await count_tokens(tokenizer, text)
        else:
            text = " ".join(rng.choice(words, size=max(1, round(n_in / TOKENS_PER_WORD))))
            prompt_len = estimate_tokens(text)
        requests.append(SampleRequest(text, prompt_len, n_out))
    return requests


async def wikitext_requests(
    words: list[str], num: int, passage_words: int, output_len: int, rng: np.random.Generator,
    tokenizer: ServerTokenizer | None,
) -> list[SampleRequest]:
    """Long prompts: `num` WikiText passages of `passage_words` words from seeded random offsets."""
    if passage_words < 1 or passage_words > len(words):
        raise ValueError(f"--wikitext-len must be in [1, {len(words)}], got {passage_words}")
    if output_len < 1:
        raise ValueError(f"--wikitext-output-len must be at least 1, got {output_len}")
    starts = rng.integers(0, len(words) - passage_words + 1, size=num)
    requests = []
    for start in starts:
        text = " ".join(words[int(start):int(start) + passage_words])
        requests.append(SampleRequest(text, await count_tokens(tokenizer, text), output_len))
    return requests
