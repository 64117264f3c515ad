"""Per-request sampling parameters, validated once when the request enters the engine."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace

from trident.engine.pruning.length import RequestPruning

MAX_TOP_LOGPROBS = 20
GREEDY_BELOW = 1e-5       # temperatures under this sample greedily


@dataclass
class SamplingParams:
    n: int = 1                           # completions per prompt
    max_tokens: int | None = 16          # None = up to the context limit
    temperature: float = 1.0             # 0 = greedy
    top_k: int = -1                      # -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None              # same seed, same output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0      # > 1 discourages tokens of the prompt and output (1 = off)
    min_tokens: int = 0                  # EOS, stop tokens and stop strings wait for this many tokens
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None          # None = off; k >= 0: sampled token + top-k alternatives
    prompt_logprobs: int | None = None   # same, for prompt tokens (echo + logprobs)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    pruning: RequestPruning | None = None   # per-request dynamic pruning (the `pruning` object)

    def __post_init__(self) -> None:
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        self.stop_token_ids = [] if self.stop_token_ids is None else self.stop_token_ids
        _check_types(self)
        self.stop = [s for s in self.stop if s]
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.max_tokens is None or self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.seed is None or 0 <= self.seed < 2**63 - self.n,
             f"seed must be in [0, 2**63 - n), got {self.seed}"),
            (self.top_k == -1 or self.top_k >= 1, f"top_k must be -1 (off) or >= 1, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0 < self.repetition_penalty <= 2, f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}"),
            (self.min_tokens >= 0 and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
             f"min_tokens must be in [0, max_tokens], got {self.min_tokens} (max_tokens {self.max_tokens})"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def max_stop_len(self) -> int:
        """Length of the longest stop string (0 without any)."""
        return max(map(len, self.stop), default=0)

    @property
    def greedy(self) -> bool:
        # Temperatures this small are argmax in all but name, and dividing by them overflows.
        return self.temperature < GREEDY_BELOW

    def for_child(self, index: int) -> "SamplingParams":
        """Parameters of completion `index` of an n > 1 request: n=1 and a distinct derived seed."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


_INTS = ("n", "top_k", "min_tokens")
_OPTIONAL_INTS = ("max_tokens", "seed", "logprobs", "prompt_logprobs")
_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def _check_types(p: SamplingParams) -> None:
    """ValueError for a field of the wrong kind, before it can fail inside a batched step."""
    def is_int(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    for name in _INTS + _OPTIONAL_INTS:
        value = getattr(p, name)
        if not is_int(value) and not (value is None and name in _OPTIONAL_INTS):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    for name in _FLOATS:
        value = getattr(p, name)
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not isinstance(p.stop, (list, tuple)) or not all(isinstance(s, str) for s in p.stop):
        raise ValueError(f"stop must be a string or a list of strings, got {p.stop!r}")
    if not isinstance(p.stop_token_ids, (list, tuple)) or not all(is_int(t) for t in p.stop_token_ids):
        raise ValueError(f"stop_token_ids must be a list of token ids, got {p.stop_token_ids!r}")
