"""OpenAI-compatible request and response models: the only pydantic models in Trident.

Requests ignore unknown fields (clients send options from newer API versions) and read an explicit
`null` as "use the default". `to_sampling_params()` turns a validated request into the engine's
SamplingParams, whose own checks raise ValueError; the server answers those with HTTP 400.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, model_serializer, model_validator

from trident.engine.pruning.length import RequestPruning
from trident.engine.sampling_params import SamplingParams

MAX_COMPLETION_LOGPROBS = 5    # OpenAI's bound for /v1/completions `logprobs`
MAX_CHAT_TOP_LOGPROBS = 20     # OpenAI's bound for chat `top_logprobs`
MAX_N = 128                    # OpenAI's bound for `n`; also keeps one request from flooding the engine
# OpenAI options that change what the output must be: ignoring them would silently return something
# else, so a request that sets them gets a 400 naming the field.
UNSUPPORTED = ("logit_bias", "response_format", "tools", "tool_choice", "functions", "function_call", "suffix")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in UNSUPPORTED:
                if data.get(name) not in (None, {}, [], "") and data.get(name) != {"type": "text"}:
                    raise ValueError(f"`{name}` is not supported by this server")
            if data.get("best_of") not in (None, 1, data.get("n", 1)):
                raise ValueError("`best_of` other than n is not supported by this server")
            return {key: value for key, value in data.items() if value is not None}
        return data


class StreamOptions(_Request):
    include_usage: bool = False


class PruningRequest(BaseModel):
    """The `pruning` object of a completion request: this request's dynamic pruning, on top of the
    served plan. Unknown keys and values of the wrong type are a 400; the engine checks the rest
    (budgets, layers, fractions) against the model."""

    model_config = ConfigDict(extra="forbid")

    profile: StrictStr | None = None            # "dense": no dynamic pruning; the served plan's name: its policy
    kv_budget: StrictInt | None = None          # keys each sequence keeps in decode (sinks + recent + heavy hitters)
    # a fraction of each prefill chunk kept after the default layer, or [[layer, fraction], ...]
    prefill_keep: StrictFloat | StrictInt | list[tuple[StrictInt, StrictFloat | StrictInt]] | None = None

    def to_engine(self) -> RequestPruning:
        return RequestPruning(profile=self.profile, kv_budget=self.kv_budget, prefill_keep=self.prefill_keep)


class _SamplingRequest(_Request):
    """Fields shared by completion and chat requests: OpenAI's names plus vLLM-style extras."""

    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] = Field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # extras beyond the OpenAI API
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    pruning: PruningRequest | None = None       # per-request dynamic pruning; usage.pruning says what ran

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage-only chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, min_p=self.min_p, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop),
            stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            pruning=self.pruning.to_engine() if self.pruning is not None else None,
        )


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt`: text, several texts, token ids, or several token-id lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False

    def to_sampling_params(self) -> SamplingParams:
        """Engine parameters; `echo` with `logprobs` also asks for the prompt's logprobs."""
        prompt_logprobs = self.logprobs if self.echo else None
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_logprobs)


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str
    content: str | list[TextContentPart] = ""
    name: str | None = None

    def to_template_dict(self) -> dict[str, str]:
        """The message as chat templates expect it: text content parts joined into one string."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        message = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. Without a token limit the reply may fill the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None   # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)

    def to_sampling_params(self) -> SamplingParams:
        """Engine parameters; `top_logprobs` needs `logprobs: true`, as in the OpenAI API."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, None)


class TokenizeRequest(_Request):
    """POST /tokenize: exactly one of `prompt` (raw text) or `messages` (chat-templated)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True      # for `prompt`; chat templates carry their own
    add_generation_prompt: bool = True   # for `messages`


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses ----------------------------------------------------------------------------------

class UsageInfo(BaseModel):
    """Token counts; `pruning` (the engine's per-axis accounting) is added only when non-empty."""

    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def make_usage(prompt_tokens: int, completion_tokens: int, pruning: dict | None = None) -> UsageInfo:
    """UsageInfo with `total_tokens` filled in and `pruning` attached when the engine reported it."""
    extra = {"pruning": pruning} if pruning else {}
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens, **extra)


def _now() -> int:
    return int(time.time())


class CompletionLogprobs(BaseModel):
    """Legacy completions format: parallel lists, one entry per token (prompt first under echo)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)   # None for the first prompt token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)               # char offset in the choice text


class CompletionChoice(BaseModel):
    index: int                     # prompt_index * n + completion index
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """Stream delta; unset fields are left out (`{}` on the closing chunk), as OpenAI sends them."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _drop_none(self) -> dict[str, str]:
        return {key: value for key, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "trident"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo
