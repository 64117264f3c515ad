"""The asynchronous load generator: arrivals, concurrency limit, warm-up, progress bar."""
from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from tqdm import tqdm

from trident.bench.client import GenerationRequest, ServerTarget, ServerTokenizer, resolve_model, stream_request
from trident.bench.datasets import SampleRequest
from trident.bench.metrics import RequestRecord


@dataclass(frozen=True)
class LoadConfig:
    """How to send a prompt set to one server."""

    endpoint: str = "chat"                 # "chat" | "completions"
    request_rate: float = math.inf         # mean requests per second; inf sends all at once
    burstiness: float = 1.0                # gamma shape of inter-arrival times; 1 = Poisson
    max_concurrency: int | None = None     # requests in flight at most; None = unbounded
    num_warmups: int = 0                   # requests sent before timing starts, not measured
    seed: int = 0                          # seeds the arrival times
    temperature: float = 0.0
    ignore_eos: bool = False               # sent as the extra body field `ignore_eos`
    max_tokens: int | None = None          # overrides every request's output length
    extra_body: dict = field(default_factory=dict)   # merged into every request body
    request_timeout_s: float = 3600.0
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request rate must be positive (or inf), got {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a positive number, got {self.burstiness}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request timeout must be positive, got {self.request_timeout_s}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be at least 1, got {self.max_concurrency}")
        if self.num_warmups < 0:
            raise ValueError(f"num warmups must not be negative, got {self.num_warmups}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max tokens must be at least 1, got {self.max_tokens}")


@dataclass
class RunResult:
    model: str
    records: list[RequestRecord]           # one per measured request, in dataset order
    duration_s: float                      # first send to last completion


def arrival_offsets(num: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Send times relative to the start: the first at 0, then gamma-distributed gaps with mean
    1 / request_rate and shape `burstiness` (shape 1 is a Poisson process); all 0 at rate inf."""
    if math.isinf(request_rate):
        return [0.0] * num
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=max(num - 1, 0))
    return [0.0] + np.cumsum(gaps).tolist() if num else []


def to_generation_request(sample: SampleRequest, config: LoadConfig) -> GenerationRequest:
    """Apply the run-wide settings (max-tokens override, temperature, extra body) to a sample."""
    extra = {"ignore_eos": True} if config.ignore_eos else {}
    extra.update(config.extra_body)
    return GenerationRequest(
        prompt=sample.prompt,
        max_tokens=config.max_tokens or sample.output_len,
        expected_prompt_len=sample.prompt_len,
        temperature=config.temperature,
        extra_body=extra,
    )


async def run_load(target: ServerTarget, samples: list[SampleRequest], config: LoadConfig) -> RunResult:
    """Send `samples` to `target` under `config` and return the measured timelines."""
    if not samples:
        raise ValueError("no prompts to send")
    requests = [to_generation_request(s, config) for s in samples]
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
    timeout = httpx.Timeout(config.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = await resolve_model(client, target)
        semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None

        async def send(request: GenerationRequest, bar: tqdm | None) -> RequestRecord:
            if semaphore is None:
                record = await stream_request(client, target, config.endpoint, model, request)
            else:
                async with semaphore:
                    record = await stream_request(client, target, config.endpoint, model, request)
            if bar is not None:
                bar.update(1)
            return record

        if config.num_warmups:
            warmups = [requests[i % len(requests)] for i in range(config.num_warmups)]
            await asyncio.gather(*(send(r, None) for r in warmups))

        offsets = arrival_offsets(len(requests), config.request_rate, config.burstiness,
                                  np.random.default_rng(config.seed))
        with tqdm(total=len(requests), disable=config.disable_tqdm, desc="requests") as bar:
            start = time.perf_counter()
            tasks = []
            for offset, request in zip(offsets, requests):
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(request, bar)))
            records = await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
        await count_missing_output_tokens(client, target, model, records)
    return RunResult(model=model, records=list(records), duration_s=duration)


async def count_missing_output_tokens(client: httpx.AsyncClient, target: ServerTarget, model: str,
                                      records: list[RequestRecord]) -> None:
    """Output tokens of successful requests whose stream sent no usage, from their text through the
    server's tokenizer, as vLLM's benchmark does (a server may stream several tokens per chunk, so
    chunks are no count); without /tokenize they stay one per chunk, with a warning."""
    missing = [r for r in records if r.success and r.output_tokens is None]
    if not missing:
        return
    tokenizer = await ServerTokenizer.probe(client, target, model)
    if tokenizer is None:
        print(f"warning: {len(missing)} responses carried no usage and the server has no /tokenize: their "
              f"output tokens are counted one per streamed chunk, a lower bound", file=sys.stderr)
        return
    for record in missing:
        record.output_tokens = len(await tokenizer.encode(record.generated_text, add_special_tokens=False))
