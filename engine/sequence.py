"""Per-sequence state shared by the scheduler, the model runner and the output processor."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from trident.engine.outputs import TokenLogprobs
from trident.engine.pruning.plan import LengthPolicy
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
    num_computed_tokens: int = 0             # tokens fed through the model (positions 0..n-1)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # chained hashes of the full blocks
    length: LengthPolicy = field(default_factory=LengthPolicy)   # this request's length-axis policy
    num_draft_tokens: int = 0                # speculative decoding: tokens drafted per step (0 = off)
    exit_thresholds: dict[int, float] | None = None   # early exit: exit layer -> probe threshold (None = off)
    exact_kv_tokens: int | None = None       # tokens before the first early exit (None: no exit yet)
    variant: str | None = None               # the loaded plan it runs (engine/variants.py); None: the only one
    cache_salt: int = 0                      # seeds its prefix-cache hash chain: variants never share blocks
    # The sequence's keys in the paged cache, in increasing original position: the length axis
    # removes entries (dropped or evicted tokens) but never renumbers them. One list serves every
    # layer; kv_depth says how deep each key goes.
    kv_slots: list[int] = field(default_factory=list)       # cache slot of each kept key
    kv_positions: list[int] = field(default_factory=list)   # its original position
    kv_depth: list[int] | None = None        # key i is in layers < kv_depth[i]; None = every key in every layer
    kv_mass: torch.Tensor | None = None      # [len(kv_slots)] float32 attention mass accumulated (KV budget)
    free_slots: list[int] = field(default_factory=list)     # reserved slots of the last block, not yet written
    num_dropped: int = 0                     # prompt tokens prefill pruning kept out of deeper layers
    num_evicted: int = 0                     # keys the KV budget evicted
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

    def reset_kv(self) -> None:
        """Forget the cache contents (the block manager has taken the blocks back)."""
        self.num_computed_tokens = 0
        self.block_table, self.block_hashes, self.free_slots = [], [], []
        self.kv_slots, self.kv_positions, self.kv_depth, self.kv_mass = [], [], None, None
        self.exact_kv_tokens = None

    @property
    def prunes_length(self) -> bool:
        """Whether the length axis may change what this sequence's blocks hold or which it keeps."""
        return self.length.is_active

    @property
    def draft_length(self) -> int:
        """Tokens to draft this step: at most what max_tokens still allows after the verified one."""
        return max(0, min(self.num_draft_tokens, self.max_tokens - self.num_output_tokens - 1))

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
