"""Held-out quality of a (pruned) engine: perplexity of text windows, and teacher-forced
continuations after a context, which run every axis the way serving does (prefill dropping on the
context, KV budgets and early exits on each decode step)."""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch

from trident.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from trident.engine.llm import LLM


def perplexity(llm: LLM, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for w in windows:
        lps = llm.prompt_logprobs(w)
        nll -= sum(lps)
        count += len(lps)
    return math.exp(nll / count)


def token_windows(tokenizer, text: str, num_tokens: int, window: int, from_end: bool = False) -> list[list[int]]:
    """Consecutive `window`-token slices covering `num_tokens`, from the start (or end) of `text`."""
    chars = min(len(text), num_tokens * 8)
    part = text[-chars:] if from_end else text[:chars]
    ids = tokenizer.encode(part, add_special_tokens=False)
    return split_windows(ids[-num_tokens:] if from_end else ids[:num_tokens], window)


def split_windows(ids: list[int], window: int) -> list[list[int]]:
    """Consecutive whole `window`-token slices of `ids` (a shorter tail is left out)."""
    return [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]


@contextlib.contextmanager
def teacher_forcing(llm: LLM, targets: dict[str, list[int]], record: dict[str, list[tuple[float, int]]]):
    """While active, the engine's sampler emits each request's next target token instead of
    sampling, and records (logprob of that target, argmax) per position."""
    def forced(logits: torch.Tensor, seqs):
        logprobs = logits.float().log_softmax(-1)
        tokens = []
        for row, seq in zip(logprobs, seqs):
            target = targets[seq.request_id][seq.num_output_tokens]
            record[seq.request_id].append((float(row[target]), int(row.argmax())))
            tokens.append(target)
        return tokens, [None] * len(seqs)

    runner = llm.engine.runner
    original, runner.sampler = runner.sampler, forced
    try:
        yield
    finally:
        runner.sampler = original


def forced_continuation(llm: LLM, passages: list[list[int]], context: int, pruning) -> list[list[tuple[float, int]]]:
    """Per passage, (logprob, argmax) at each continuation position, teacher-forced."""
    engine = llm.engine
    targets, record = {}, {}
    for i, ids in enumerate(passages):
        request_id = f"forced-{i}"
        targets[request_id], record[request_id] = ids[context:], []
        engine.add_request(request_id, ids[:context], SamplingParams(max_tokens=len(ids) - context, temperature=0,
                                                                     ignore_eos=True, pruning=pruning))
    with teacher_forcing(llm, targets, record):
        while engine.has_unfinished_requests():
            engine.step()
    return [record[f"forced-{i}"] for i in range(len(passages))]
