"""What the engine hands back to its callers (the server, benchmarks, tests)."""
from __future__ import annotations

from dataclasses import dataclass, field

# One position's logprobs: {token_id: logprob}, holding the chosen token and the top-k alternatives.
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    index: int                           # which of the n completions
    text: str                            # cumulative detokenized text (stop string removed)
    token_ids: list[int]                 # cumulative generated token ids
    logprobs: list[TokenLogprobs] | None = None   # one entry per generated token, when asked for
    finish_reason: str | None = None     # None while running; "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first entry None (no context)
    pruning: dict = field(default_factory=dict)   # per-axis accounting summary (usage.pruning)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
