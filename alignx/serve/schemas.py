"""Serving: the OpenAI-compatible wire format of the AlignX HTTP API (pydantic v2).

``POST /v1/chat/completions`` takes a :class:`ChatCompletionRequest` and answers with a
:class:`ChatCompletionResponse` (or a stream of :class:`ChatCompletionChunk` as server-sent
events). Both carry the ``alignx`` extension (:class:`AlignXInfo`): the axis that answered,
the calibrated weights, confidence, OOD flag, provenance (run + adapter) and the latency split
(routing vs expert). Errors use the OpenAI body ``{"error": {message, type, param, code}}``.
The official ``openai`` client ignores unknown fields, so the extension does not break it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ROUTED_MODEL = "alignx"
#: AlignX routed by the router's uncalibrated softmax (the ablation baseline).
SOFTMAX_MODEL = "alignx-softmax"
EXPERT_PREFIX = "expert-"


class ChatMessage(BaseModel):
    """One chat turn as sent by a client."""

    model_config = ConfigDict(extra="ignore")  # clients send e.g. "name"; we do not use it

    role: Literal["system", "user", "assistant"]
    content: str


def _require_user(v: list[ChatMessage]) -> list[ChatMessage]:
    if not any(m.role == "user" for m in v):
        raise ValueError("messages must contain at least one 'user' message")
    return v


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions request that AlignX honours.

    Unknown OpenAI fields (``user``, ``presence_penalty``, ...) are accepted and ignored, as
    other OpenAI-compatible servers do; fields we do support are validated strictly.
    """

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="'alignx' (routed), 'alignx-softmax', 'expert-<axis>' "
                       "(direct) or a baseline enabled on the server.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="New-token cap; default per app.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")

    @field_validator("messages")
    @classmethod
    def _has_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        return _require_user(v)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4 or any(not s for s in items):
            raise ValueError("stop must be a non-empty string or a list of at most 4 of them")
        return v

    def stop_list(self) -> list[str]:
        """``stop`` as a list (possibly empty)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def messages_dicts(self) -> list[dict[str, str]]:
        """The conversation as plain ``{"role", "content"}`` dicts."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


class GenerateRequest(BaseModel):
    """What the router sends an expert: a validated conversation plus sampling parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    messages: list[dict[str, str]]
    max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0.0, le=2.0)
    top_p: float = Field(gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    request_id: str = ""


class Provenance(BaseModel):
    """Which artifacts answered: run directory, adapter name and its manifest identity."""

    model_config = ConfigDict(frozen=True)

    run: str
    adapter: str
    manifest_sha256: str
    created_at: str
    config_hash: str = ""


class GenerateResult(BaseModel):
    """An expert's answer to one :class:`GenerateRequest`."""

    model_config = ConfigDict(frozen=True)

    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    provenance: Provenance
    expert_ms: float = 0.0


class AlignXInfo(BaseModel):
    """The ``alignx`` extension object of every completion.

    ``system`` is the model id that answered (``alignx``, ``alignx-softmax``, ``expert-<axis>``
    or a baseline: ``base``, ``multitask``, ``h3fusion``); ``axis`` is the expert's axis, and
    ``None`` for a baseline, which has no axis expert.
    """

    system: str | None = None
    axis: str | None = None
    weights: dict[str, float] = Field(default_factory=dict)
    confidence: float | None = None
    ood: bool | None = None
    routed: bool = True
    run: str | None = None
    adapter: str | None = None
    adapter_manifest_sha256: str | None = None
    route_ms: float = 0.0
    expert_ms: float = 0.0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=new_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    alignx: AlignXInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (``data: {...}``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    alignx: AlignXInfo | None = None  # on the first and the last chunk
    usage: Usage | None = None  # on the last chunk


class StreamDelta(BaseModel):
    """What an expert's ``generate_stream`` yields: text deltas, then one final item."""

    model_config = ConfigDict(frozen=True)

    text: str = ""
    final: GenerateResult | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "alignx"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RouteRequest(BaseModel):
    """``POST /v1/route``: routing only, no generation."""

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _has_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        return _require_user(v)


class RouteResponse(BaseModel):
    object: Literal["alignx.route"] = "alignx.route"
    alignx: AlignXInfo


ErrorType = Literal[
    "invalid_request_error", "authentication_error", "not_found_error", "overloaded_error",
    "server_error",
]


class ErrorDetail(BaseModel):
    message: str
    type: ErrorType
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI-style error body."""

    error: ErrorDetail


def error_body(
    message: str, type_: ErrorType, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error body as a plain dict (for ``JSONResponse``)."""
    return ErrorResponse(
        error=ErrorDetail(message=message, type=type_, param=param, code=code)
    ).model_dump()
