"""The engine contract: what the gateway needs from whatever runs the model.

Two implementations: `local.LocalEngine` (embedded transformers + peft) and, later,
`vllm.VLLMEngine` (vLLM servers over HTTP). Routes only ever see this Protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    # OpenAI's shape, checked by the API: {"type": "text" | "json_object"} or {"type":
    # "json_schema", "json_schema": {"name": ..., "schema": {...}}}. None: not asked for.
    response_format: dict[str, Any] | None = None
    logprobs: int | None = None  # None: no log-probs; k: the sampled token's and the top k


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[dict[str, Any]]  # OpenAI messages: role, content (tool_calls, tool_call_id)
    params: SamplingParams
    adapter: str | None = None  # a loaded adapter's name; None serves the base model
    stream: bool = True  # False: the client waits for the whole answer (an engine may batch it)
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions (`supports_tools`)
    tool_choice: Any = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, its log-probability, and the top alternatives at its
    step as (text, log-probability), most likely first."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ChoiceDelta:
    """New text for one choice. The last delta of a choice carries its finish_reason."""

    index: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    completion_tokens: int = 0  # tokens generated for this choice so far
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens behind `text` (when asked for)
    # Tool-call pieces in OpenAI's streaming shape ({index, id, type, function: {name,
    # arguments}}); a call's `arguments` may come in several pieces.
    tool_calls: tuple[dict[str, Any], ...] = ()


class GenerationStream(Protocol):
    prompt_tokens: int

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]: ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    model_name: str  # the id clients use to reach the base model
    supports_tools: bool  # takes `tools` and tool messages, and answers with tool calls

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def is_ready(self) -> bool: ...

    def adapters(self) -> list[str]: ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    def context_length(self) -> int: ...

    def vocab_size(self) -> int:
        """Token ids run from 0 to this, exclusive (logit_bias is checked against it)."""
        ...

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int: ...

    async def generate(self, request: GenerationRequest) -> GenerationStream:
        """Reserve a slot and start generating; raises OverloadedError when the queue is full."""
        ...
