"""Per-sequence state shared by the scheduler, the model runner and the output processor."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from trident.engine.outputs import TokenLogprobs
from trident.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion being generated. An n > 1 request owns n sequences with the same prompt."""

    seq_id: int
    request_id: str
    index: int                               # completion index within its request
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int                          # resolved: params.max_tokens or what the context allows
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)   # prompt + generated, grows every step
    num_computed_tokens: int = 0             # tokens whose K/V sit in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # chained hashes of the full blocks
    generator: torch.Generator | None = None  # per-request RNG when a seed is given
    min_tokens_banned: list[int] = field(default_factory=list)   # EOS + stop ids, masked until min_tokens
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    text: str = ""                           # detokenized output, stop string removed at finish
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        # Only the first completion of a request reports them; they are the same for all.
        return self.params.prompt_logprobs is not None and self.index == 0
