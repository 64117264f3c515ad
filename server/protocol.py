"""OpenAI-compatible request and response models: the only pydantic models in Trident.

Requests ignore unknown fields (clients send options from newer API versions) and read an explicit
`null` as "use the default". Types are strict, as OpenAI's are: `"max_tokens": "2"` or `true` is a
400, not 2; numbers carry their ranges, so the OpenAPI document states them. Every string must be
valid Unicode: a lone UTF-16 surrogate (`"\\ud800"` in JSON) is a 400 naming the field.
`to_sampling_params()` turns a validated request into the engine's SamplingParams, whose own checks
raise ValueError; the server answers those with HTTP 400.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_serializer,
                      model_validator)
from pydantic.types import Strict

from trident.engine.pruning.length import RequestPruning
from trident.engine.sampling_params import SamplingParams

MAX_COMPLETION_LOGPROBS = 5    # OpenAI's bound for /v1/completions `logprobs`
MAX_CHAT_TOP_LOGPROBS = 20     # OpenAI's bound for chat `top_logprobs`
MAX_N = 128                    # OpenAI's bound for `n`; also keeps one request from flooding the engine
# OpenAI options that change what the output must be: ignoring them would silently return something
# else, so a request that sets them gets a 400 naming the field.
UNSUPPORTED = ("logit_bias", "response_format", "tools", "tool_choice", "functions", "function_call", "suffix")
MAX_SEED = 2**63 - 1 - MAX_N   # the engine derives seed + i for the n completions; all must fit an int64

# A JSON number (integer or not), never a string or a boolean; NaN and infinities are refused.
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]


def _unicode_error(value: Any, where: str = "") -> str | None:
    """The path of the first string (or key) in `value` that is not valid Unicode, else None.

    json.loads turns a lone `\\ud800` escape into a surrogate code point, which no tokenizer, UTF-8
    encoder or JSON writer accepts; `str.encode` finds one at C speed, even in a 10 MB prompt."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if not isinstance(key, str) or _unicode_error(key) is not None:
                return where or "body"
            found = _unicode_error(item, path)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _unicode_error(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def _optional_fields_are_nullable(schema: dict, model: type[BaseModel]) -> None:
    """The JSON schema says what `_null_means_default` does: an optional field may be null."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required or prop.get("type") == "null" or {"type": "null"} in prop.get("anyOf", ()):
            continue
        if "anyOf" in prop:
            prop["anyOf"].append({"type": "null"})
        else:
            keep = {key: prop.pop(key) for key in ("title", "description", "default") if key in prop}
            schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **keep}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_optional_fields_are_nullable)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            bad = _unicode_error(data)
            if bad is not None:
                raise ValueError(f"`{bad}` is not valid Unicode text (it holds a lone UTF-16 surrogate)")
            for name in UNSUPPORTED:
                if data.get(name) not in (None, {}, [], "") and data.get(name) != {"type": "text"}:
                    raise ValueError(f"`{name}` is not supported by this server")
            if data.get("best_of") not in (None, 1, data.get("n", 1)):
                raise ValueError("`best_of` other than n is not supported by this server")
            return {key: value for key, value in data.items() if value is not None}
        return data


class StreamOptions(_Request):
    include_usage: StrictBool = False


TokenId = Annotated[StrictInt, Field(ge=0)]


class PruningRequest(BaseModel):
    """The `pruning` object of a completion request: this request's dynamic pruning, on top of the
    served plan. Unknown keys and values of the wrong type are a 400; the engine checks the rest
    (budgets, layers, fractions) against the model."""

    model_config = ConfigDict(extra="forbid")

    profile: StrictStr | None = None            # "dense": no dynamic pruning; the served plan's name: its policy
    kv_budget: StrictInt | None = None          # keys each sequence keeps in decode (sinks + recent + heavy hitters)
    # a fraction of each prefill chunk kept after the default layer, or [[layer, fraction], ...]
    prefill_keep: StrictFloat | StrictInt | list[tuple[StrictInt, StrictFloat | StrictInt]] | None = None
    speculative: StrictBool | None = None       # lossless self-speculative decoding on or off (default: the server's)
    num_draft_tokens: StrictInt | None = None   # tokens drafted per step when speculating
    early_exit: StrictBool | None = None        # the served plan's early exits on or off (default: on)
    exit_threshold: StrictFloat | StrictInt | None = None   # one probe threshold in [0, 1] for every exit point

    def to_engine(self) -> RequestPruning:
        return RequestPruning(profile=self.profile, kv_budget=self.kv_budget, prefill_keep=self.prefill_keep,
                              speculative=self.speculative, num_draft_tokens=self.num_draft_tokens,
                              early_exit=self.early_exit, exit_threshold=self.exit_threshold)


class _SamplingRequest(_Request):
    """Fields shared by completion and chat requests: OpenAI's names plus vLLM-style extras."""

    model: StrictStr | None = None
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    temperature: Number = Field(default=1.0, ge=0, le=2)
    top_p: Number = Field(default=1.0, gt=0, le=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] = Field(default_factory=list)
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    presence_penalty: Number = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(default=0.0, ge=-2, le=2)
    user: StrictStr | None = None
    # extras beyond the OpenAI API
    top_k: StrictInt = Field(default=-1, ge=-1, description="-1 or 0: off")
    min_p: Number = Field(default=0.0, ge=0, le=1)
    repetition_penalty: Number = Field(default=1.0, gt=0, le=2)
    min_tokens: StrictInt = Field(default=0, ge=0)
    ignore_eos: StrictBool = False
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] = Field(default_factory=list)
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
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
            n=self.n, max_tokens=max_tokens, temperature=self.temperature,
            top_k=-1 if self.top_k == 0 else self.top_k,                    # 0 is "off" too, as in vLLM
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

    prompt: StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]
    max_tokens: StrictInt | None = Field(default=16, ge=0)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: StrictBool = False

    def to_sampling_params(self) -> SamplingParams:
        """Engine parameters; `echo` with `logprobs` also asks for the prompt's logprobs."""
        prompt_logprobs = self.logprobs if self.echo else None
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_logprobs)


class TextContentPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: StrictStr
    content: StrictStr | list[TextContentPart] = ""
    name: StrictStr | None = None

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
    max_tokens: StrictInt | None = Field(default=None, ge=0)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=0)   # OpenAI's newer name; wins
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)

    def to_sampling_params(self) -> SamplingParams:
        """Engine parameters; `top_logprobs` needs `logprobs: true`, as in the OpenAI API."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, None)


class TokenizeRequest(_Request):
    """POST /tokenize: exactly one of `prompt` (raw text) or `messages` (chat-templated)."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True      # for `prompt`; chat templates carry their own
    add_generation_prompt: StrictBool = True   # for `messages`


class DetokenizeRequest(_Request):
    model: StrictStr | None = None
    tokens: list[TokenId]


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


class HealthResponse(BaseModel):
    """GET /health when ready: what the engine holds right now (all 0 when the server is idle)."""

    status: Literal["ok"] = "ok"
    model: str
    running: int            # sequences in the engine's running set
    waiting: int            # sequences waiting to be scheduled
    kv_blocks_used: int     # KV-cache blocks held by sequences
    kv_blocks_total: int


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
