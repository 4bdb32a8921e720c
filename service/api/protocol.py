"""OpenAI-compatible request and response models.

Fields follow the order of OpenAI's API reference; prefloop's extensions sit in a marked block.
Unknown request fields are accepted and logged (as vLLM does), so newer OpenAI clients keep
working; fields we cannot honour are refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

MAX_STOP_CHARS = 256


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str = Field(max_length=256)
    arguments: str  # JSON text, as the model wrote it (it may not parse)


class ToolCall(BaseModel):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Required, but null (or left out) in an assistant turn that only called tools.
    content: str | list[TextPart] | None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)  # assistant
    tool_call_id: str | None = Field(default=None, max_length=256)  # tool: the call answered

    @model_validator(mode="before")
    @classmethod
    def _calls_need_no_content(cls, data: Any) -> Any:
        # An assistant turn that only calls tools may leave `content` out, as OpenAI allows.
        if isinstance(data, dict) and data.get("tool_calls") and "content" not in data:
            return {**data, "content": None}
        return data

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content may be null only in an assistant message with tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def plain(self) -> dict[str, Any]:
        # The chat templates of small open models know "system", not OpenAI's newer "developer".
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextFormat(BaseModel):
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    # `schema` would shadow a BaseModel attribute: the field is `schema_`, spelt `schema` on
    # the wire (dump with by_alias=True).
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


def _format_type(v: Any) -> str | None:
    # Tags are spelt "type=..." so the error handler leaves them out of `param`
    # (`response_format.json_schema.name`, not `response_format.json_schema.json_schema.name`).
    raw = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return f"type={raw}" if raw in ("text", "json_object", "json_schema") else None


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("type=text")]
    | Annotated[JsonObjectFormat, Tag("type=json_object")]
    | Annotated[JsonSchemaFormat, Tag("type=json_schema")],
    Discriminator(
        _format_type,
        custom_error_type="invalid_response_format",
        custom_error_message="type must be 'text', 'json_object' or 'json_schema'",
    ),
]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    # At least one message, unless `regenerate` names the prompt (checked in `plan_chat`).
    messages: list[ChatMessage] = Field(default_factory=list)
    model: str | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = Field(default=None, max_length=256)

    # --- prefloop extensions -------------------------------------------------------------
    conversation_id: str | None = Field(
        default=None, description="Continue this stored conversation (from an earlier response)."
    )
    parent_id: str | None = Field(
        default=None,
        description="The message to continue from (an earlier choice's `message_id`); "
        "defaults to the conversation's latest answer.",
    )
    regenerate: str | None = Field(
        default=None,
        max_length=128,
        description="Answer this earlier completion's prompt again (its `id`): the new answers "
        "are stored as siblings of the earlier ones. `messages` may then be empty.",
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            # A stop string's length is how much text each answer holds back while streaming.
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        return stops


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # null when the answer is only tool calls
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes (a token may be part of a character)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    message_id: str  # extension: pass as `parent_id` to continue from this answer


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    # --- prefloop extensions
    conversation_id: str
    adapter_version: str | None = None


class StoredCompletion(BaseModel):
    """`GET /v1/chat/completions/{id}`: a stored completion, as far as it got."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    status: Literal["running", "succeeded", "failed", "cancelled"]
    error: str | None = None
    choices: list[Choice]
    usage: Usage | None = None
    user: str | None = None
    conversation_id: str
    adapter_version: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    # Pieces of tool calls: {index, id, type, function: {name, arguments}}, as OpenAI streams
    tool_calls: list[dict[str, Any]] | None = None


class StreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None
    message_id: str | None = None  # extension, on each choice's first chunk


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    # --- prefloop extensions
    conversation_id: str | None = None
    adapter_version: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "prefloop"
    parent: str | None = None  # extension (as vLLM): the base model of an adapter
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, as OpenAI's API sends them."""

    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the errors a route may answer (`service.core.errors`)."""
    what = {
        400: "Bad input (`param` names the field)",
        401: "No API key, or an unknown or revoked one",
        403: "The key's role or scope does not allow this",
        404: "Not found (or another key's or tenant's)",
        409: "Conflicts with stored state",
        413: "Request body too large",
        429: "Rate limit; see Retry-After",
        503: "Overloaded, loading, or the database is unavailable; see Retry-After",
    }
    return {c: {"model": ErrorResponse, "description": what[c]} for c in codes}


V1_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 429, 503)
