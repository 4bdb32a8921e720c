"""One chat turn: validate, store the prompt, generate, store the answers, respond.

The route turns the OpenAI body into a `ChatRequest` and this module's results (a `ChatResult`,
or the events of a stream) into OpenAI's shapes; nothing here knows HTTP.

The order is what makes "nothing is acknowledged before it is committed" true:
1. the new messages and a `running` completion are committed before generation starts;
2. the answers are committed before the client sees a finish (the full response, or, when
   streaming, the chunks carrying `finish_reason` and then `[DONE]`);
3. a failure is committed as a `failed` completion with its error before the error is sent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine as Database

from service import observability
from service.core.config import Settings
from service.core.errors import InvalidRequestError, NotFoundError, PrefloopError
from service.core.identity import Principal
from service.engines import base
from service.engines.base import Engine, GenerationRequest, GenerationStream, SamplingParams
from service.storage import turns
from service.storage.db import session_scope
from service.storage.tables import Completion, Message, new_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatRequest:
    """A chat request as this module reads it: the route's conversion of the OpenAI body."""

    messages: list[dict[str, Any]]  # role, content (text), tool_calls, tool_call_id
    model: str | None = None
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"  # the field that set it, named in errors
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    # prefloop's extensions
    conversation_id: str | None = None
    parent_id: str | None = None
    regenerate: str | None = None
    unknown: tuple[str, ...] = ()  # fields sent that nothing reads (logged)


@dataclass(frozen=True)
class Duel:
    """A head-to-head turn: choice i is answered by `adapters[i]`, one choice from each arm of a
    live canary, in an order drawn per turn (the client is not told which is which)."""

    experiment: str
    adapters: tuple[str | None, str | None]


@dataclass(frozen=True)
class ChatPlan:
    model: str  # the name the client used, echoed back
    adapter: str | None
    segment: str
    messages: list[dict[str, Any]]
    params: SamplingParams
    include_usage: bool
    tools: list[dict[str, Any]] | None = None  # offered to the model, stored with the prompt
    tool_choice: Any = None
    duel: Duel | None = None

    def choice_adapters(self) -> list[str | None]:
        """The adapter that answers each choice."""
        return list(self.duel.adapters) if self.duel else [self.adapter] * self.params.n

    def tools_record(self) -> dict[str, Any] | None:
        if self.tools is None and self.tool_choice is None:
            return None
        return {"tools": self.tools, "tool_choice": self.tool_choice}


def plan_chat(
    body: ChatRequest,
    settings: Settings,
    engine: Engine,
    adapter: str | None,
    segment: str = "default",
) -> ChatPlan:
    """Check the request against the limits; raises 4xx errors. ``adapter`` is what the router
    resolved the request's ``model`` to (None: the base model)."""
    if body.unknown:
        log.warning("ignoring unknown request fields: %s", ", ".join(sorted(body.unknown)))
    _check_tools_and_logprobs(body, engine)
    _check_messages(body, settings)
    max_tokens = body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        param = body.max_tokens_param
        raise InvalidRequestError(
            f"{param} is {max_tokens}; the limit is {settings.max_tokens_limit}", param=param
        )
    if body.n > settings.max_n:
        raise InvalidRequestError(f"n is {body.n}; the limit is {settings.max_n}", param="n")
    if len(body.stop) > settings.max_stop_sequences:
        raise InvalidRequestError(
            f"at most {settings.max_stop_sequences} stop sequences are allowed", param="stop"
        )
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=settings.default_temperature if body.temperature is None else body.temperature,
        top_p=settings.default_top_p if body.top_p is None else body.top_p,
        n=body.n,
        stop=tuple(body.stop),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=_logit_bias(body, engine),
        response_format=body.response_format,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    return ChatPlan(
        model=body.model or engine.model_name,
        adapter=adapter,
        segment=segment,
        messages=body.messages,
        params=params,
        include_usage=body.include_usage,
        tools=body.tools,
        tool_choice=body.tool_choice,
    )


def _check_messages(body: ChatRequest, settings: Settings) -> None:
    if not body.messages and body.regenerate is None:
        raise InvalidRequestError(
            "messages must contain at least one message (or set `regenerate`)", param="messages"
        )
    if len(body.messages) > settings.max_messages:
        raise InvalidRequestError(
            f"too many messages: {len(body.messages)} > {settings.max_messages}", param="messages"
        )
    for i, m in enumerate(body.messages):
        if len(m["content"]) > settings.max_message_chars:
            raise InvalidRequestError(
                f"message {i} is {len(m['content'])} characters; the limit is "
                f"{settings.max_message_chars}",
                param=f"messages.{i}.content",
            )


def _logit_bias(body: ChatRequest, engine: Engine) -> dict[int, float]:
    logit_bias: dict[int, float] = {}
    vocab = engine.vocab_size() if body.logit_bias else 0
    for key, value in (body.logit_bias or {}).items():
        # Checked here, before the request joins a batch: an id past the vocabulary would fail
        # the shared decode step for every request in it (on CUDA, a device-side assert).
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids from 0 to {vocab - 1}, got {key!r}",
                param="logit_bias",
            )
        logit_bias[int(key)] = value
    return logit_bias


def wants_duel(body: ChatRequest, caller: Principal, settings: Settings) -> bool:
    """Is this a widget's "which is better?" turn (a visitor's n=2 that is no regeneration)
    drawn for a head-to-head, if its segment runs a canary? API clients asking for n=2 want
    two samples of one model, so only the widget's turns are ever drawn."""
    return (
        caller.visitor_user is not None
        and body.n == 2
        and body.regenerate is None
        and random.random() < settings.canary_duel_share
    )


def as_duel(plan: ChatPlan, experiment: str, rival: str | None) -> ChatPlan:
    """`plan` answered once by its own adapter and once by the canary's other arm, in random
    order: the pick then maps to an arm through each stored answer's adapter version."""
    pair = (plan.adapter, rival) if random.random() < 0.5 else (rival, plan.adapter)
    return replace(plan, duel=Duel(experiment, pair))


def _check_tools_and_logprobs(body: ChatRequest, engine: Engine) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    calls = any(m["role"] == "tool" or m.get("tool_calls") for m in body.messages)
    if (body.tools or calls or body.tool_choice is not None) and not engine.supports_tools:
        raise InvalidRequestError(
            "tools need the vLLM engine (PREFLOOP_ENGINE=vllm): the embedded engine's model "
            "cannot be offered tools, nor read tool calls and results",
            param="tools",
        )


def _start_turn(
    db: Database, engine: Engine, plan: ChatPlan, body: ChatRequest, caller: Principal
) -> turns.StartedTurn:
    spec = turns.CompletionSpec(
        model=plan.model,
        base_model=engine.model_name,
        adapter_version=plan.adapter,
        segment=plan.segment,
        params=_params_record(plan.params),
        stream=body.stream,
        tools=plan.tools_record(),
    )
    user_id = caller.visitor_user or body.user  # widget visitors: server-issued
    with session_scope(db) as session:
        if body.regenerate is not None:
            turn = turns.start_regeneration(
                session,
                caller=caller,
                user_id=user_id,
                conversation_id=body.conversation_id,
                messages=plan.messages,
                regenerate=body.regenerate,
                spec=spec,
            )
        else:
            turn = turns.start_completion(
                session,
                caller=caller,
                user_id=user_id,
                conversation_id=body.conversation_id,
                parent_id=body.parent_id,
                messages=plan.messages,
                spec=spec,
                experiment_id=plan.duel.experiment if plan.duel else None,
            )
        # Counted here, before commit, so a prompt that cannot fit stores nothing.
        prompt_tokens = engine.count_prompt_tokens(turn.prompt)
        room = engine.context_length() - prompt_tokens
        if room < plan.params.max_tokens:
            raise InvalidRequestError(
                f"the prompt is {prompt_tokens} tokens and max_tokens is "
                f"{plan.params.max_tokens}, more than the model's context of "
                f"{engine.context_length()} tokens; shorten the conversation or max_tokens",
                param="messages",
                code="context_length_exceeded",
            )
    return turn


def _params_record(p: SamplingParams) -> dict[str, Any]:
    record = asdict(p)
    record["stop"] = list(p.stop)
    record["logit_bias"] = {str(k): v for k, v in p.logit_bias.items()}
    return record


def _finish(
    db: Database,
    *,
    completion_id: str,
    choices: list[turns.ChoiceRecord],
    status: str,
    error: str | None,
    prompt_tokens: int | None,
    started: float,
) -> None:
    try:
        with session_scope(db) as session:
            completion = turns.finish_completion(
                session,
                completion_id=completion_id,
                choices=choices,
                status=status,
                error=error,
                prompt_tokens=prompt_tokens,
                latency_ms=(time.perf_counter() - started) * 1000,
            )
    except BaseException:
        observability.IN_PROGRESS.dec()  # not stored: still no longer in progress
        raise
    observability.generation_finished(completion)  # after the commit: counts what is stored


async def _store_failure(
    db: Database, completion_id: str, exc: PrefloopError, prompt_tokens: int | None, started: float
) -> None:
    # A failed answer is not an answer: no assistant message; the error is on the row.
    await run_in_threadpool(
        _finish,
        db,
        completion_id=completion_id,
        choices=[],
        status="failed",
        error=exc.message,
        prompt_tokens=prompt_tokens,
        started=started,
    )


async def _begin(
    db: Database, engine: Engine, plan: ChatPlan, body: ChatRequest, caller: Principal
) -> tuple[turns.StartedTurn, GenerationStream, float]:
    started = time.perf_counter()
    turn = await run_in_threadpool(_start_turn, db, engine, plan, body, caller)
    observability.generation_started()  # every started turn ends in _finish
    # A regeneration keeps the response_format of the answer it redoes (stored with it).
    params = replace(plan.params, response_format=turn.completion.params.get("response_format"))
    request = GenerationRequest(
        messages=turn.prompt,
        params=params,
        adapter=plan.adapter,
        stream=body.stream,
        # The stored ones: a regeneration answers with the tools its prompt was asked with.
        tools=(turn.completion.tools or {}).get("tools"),
        tool_choice=(turn.completion.tools or {}).get("tool_choice"),
    )
    try:
        stream = await _generate(engine, plan, request)
    except PrefloopError as exc:
        await _store_failure(db, turn.completion.id, exc, None, started)
        raise
    return turn, stream, started


async def _generate(engine: Engine, plan: ChatPlan, request: GenerationRequest) -> GenerationStream:
    """The engine's stream; a head-to-head turn is two one-answer requests, one per arm (any
    engine runs them side by side), merged into one stream of choices 0 and 1."""
    if plan.duel is None:
        return await engine.generate(request)
    one = replace(request.params, n=1)
    streams: list[GenerationStream] = []
    try:
        for adapter in plan.duel.adapters:
            streams.append(await engine.generate(replace(request, params=one, adapter=adapter)))
    except BaseException:
        for s in streams:  # the first one's slot is given back
            s.cancel()
        raise
    return DuelStream(streams)


class DuelStream:
    """Several one-answer streams as one: stream i's deltas become choice i's."""

    def __init__(self, streams: list[GenerationStream]):
        self.streams = streams

    @property
    def prompt_tokens(self) -> int:  # the same prompt for each
        return self.streams[0].prompt_tokens

    def cancel(self) -> None:
        for s in self.streams:
            s.cancel()

    async def __aiter__(self) -> AsyncIterator[base.ChoiceDelta]:
        queue: asyncio.Queue[base.ChoiceDelta | Exception | None] = asyncio.Queue()

        async def pump(index: int, stream: GenerationStream) -> None:
            try:
                async for d in stream:
                    await queue.put(replace(d, index=index))
                await queue.put(None)
            except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
                await queue.put(exc)

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:  # an error, or the client left: stop both (cancel is idempotent)
            for t in tasks:
                t.cancel()
            self.cancel()


class _Collector:
    """Accumulates deltas into one record per choice."""

    def __init__(self, adapters: list[str | None]):
        n = len(adapters)
        self.adapters = adapters
        self.ids = [new_id("msg") for _ in range(n)]
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.tokens = [0] * n
        self.logprobs: list[list[base.TokenLogprob]] = [[] for _ in range(n)]
        self.calls: list[dict[int, dict[str, Any]]] = [{} for _ in range(n)]

    def add(self, d: base.ChoiceDelta) -> None:
        self.texts[d.index].append(d.text)
        self.tokens[d.index] = max(self.tokens[d.index], d.completion_tokens)
        if d.finish_reason is not None:
            self.finish[d.index] = d.finish_reason
        self.logprobs[d.index].extend(d.logprobs)
        for piece in d.tool_calls:  # a call's id, name come once; its arguments in pieces
            call = self.calls[d.index].setdefault(
                piece.get("index", 0), {"id": "", "type": "function", "name": "", "arguments": ""}
            )
            fn = piece.get("function") or {}
            call["id"] = piece.get("id") or call["id"]
            call["name"] = fn.get("name") or call["name"]
            call["arguments"] += fn.get("arguments") or ""

    def tool_calls(self, index: int) -> list[dict[str, Any]] | None:
        calls = [self.calls[index][k] for k in sorted(self.calls[index])]
        return [
            {"id": c["id"], "type": c["type"],
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls
        ] or None  # fmt: skip

    def records(self) -> list[turns.ChoiceRecord]:
        return [
            turns.ChoiceRecord(
                self.ids[i],
                i,
                "".join(t),
                self.finish[i],
                self.tokens[i],
                self.tool_calls(i),
                self.adapters[i],
            )
            for i, t in enumerate(self.texts)
        ]

    def usage(self, prompt_tokens: int) -> Usage:
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(self.tokens))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ChatResult:
    """A stored, succeeded turn: what the client is answered."""

    id: str  # the completion's
    model: str  # the name the client used
    conversation_id: str
    adapter_version: str | None
    choices: list[turns.ChoiceRecord]
    logprobs: list[list[base.TokenLogprob]] | None  # per choice; None: not asked for
    usage: Usage


async def complete_chat(
    db: Database, engine: Engine, plan: ChatPlan, body: ChatRequest, caller: Principal
) -> ChatResult:
    turn, stream, started = await _begin(db, engine, plan, body, caller)
    acc = _Collector(plan.choice_adapters())
    try:
        async for d in stream:
            acc.add(d)
    except PrefloopError as exc:
        await _store_failure(db, turn.completion.id, exc, stream.prompt_tokens, started)
        raise
    records = acc.records()
    await run_in_threadpool(
        _finish,
        db,
        completion_id=turn.completion.id,
        choices=records,
        status="succeeded",
        error=None,
        prompt_tokens=stream.prompt_tokens,
        started=started,
    )
    return ChatResult(
        id=turn.completion.id,
        model=plan.model,
        conversation_id=turn.completion.conversation_id,
        adapter_version=plan.adapter,
        choices=records,
        logprobs=acc.logprobs if plan.params.logprobs is not None else None,
        usage=acc.usage(stream.prompt_tokens),
    )


# What a streamed turn yields, in order: `Started`; `base.ChoiceDelta`s with text, log-probs or
# tool calls; then `Finished` (everything stored) or `Failed`.


@dataclass(frozen=True)
class Started:
    id: str  # the completion's
    message_ids: list[str]  # per choice
    conversation_id: str
    adapter_version: str | None


@dataclass(frozen=True)
class Finished:
    finish_reasons: list[str | None]  # per choice
    usage: Usage | None  # when the request asked for it


@dataclass(frozen=True)
class Failed:
    error: str
    stored: bool  # False: not even the failure could be stored


StreamEvent = Started | base.ChoiceDelta | Finished | Failed


async def stream_chat(
    db: Database, engine: Engine, plan: ChatPlan, body: ChatRequest, caller: Principal
) -> AsyncGenerator[StreamEvent, None]:
    """Start the turn (errors here are still plain HTTP errors), then return its events. The
    answers are committed before `Finished` is yielded; a client that leaves (the iterator is
    closed or cancelled) leaves a `cancelled` completion with what was generated."""
    turn, stream, started = await _begin(db, engine, plan, body, caller)
    return _events(db, plan, turn, stream, started)


async def _events(
    db: Database,
    plan: ChatPlan,
    turn: turns.StartedTurn,
    stream: GenerationStream,
    started: float,
) -> AsyncGenerator[StreamEvent, None]:
    cid = turn.completion.id
    acc = _Collector(plan.choice_adapters())
    finish: dict[str, Any] = dict(status="succeeded", error=None)
    try:
        yield Started(cid, acc.ids, turn.completion.conversation_id, plan.adapter)
        async for d in stream:
            acc.add(d)
            if d.text or d.logprobs or d.tool_calls:
                yield d
    except PrefloopError as exc:
        finish = dict(status="failed", error=exc.message)
    except (asyncio.CancelledError, GeneratorExit):
        # The client went away. Store what was generated without awaiting: this task is
        # being cancelled, so the write runs to completion in a worker thread on its own.
        stream.cancel()
        asyncio.get_running_loop().run_in_executor(
            None,
            lambda: _finish(
                db,
                completion_id=cid,
                choices=acc.records(),
                status="cancelled",
                error="the client disconnected",
                prompt_tokens=stream.prompt_tokens,
                started=started,
            ),
        )
        raise
    try:
        await run_in_threadpool(
            _finish,
            db,
            completion_id=cid,
            choices=acc.records() if finish["status"] == "succeeded" else [],
            prompt_tokens=stream.prompt_tokens,
            started=started,
            **finish,
        )
    except Exception as exc:  # noqa: BLE001 - the client must hear that nothing was stored
        log.exception("could not store completion %s", cid)
        yield Failed(f"the answer could not be stored: {exc}", stored=False)
        return
    if finish["status"] != "succeeded":
        yield Failed(finish["error"], stored=True)
        return
    usage = acc.usage(stream.prompt_tokens) if plan.include_usage else None
    yield Finished(acc.finish[: plan.params.n], usage)


def read_completion(
    db: Database, completion_id: str, caller: Principal
) -> tuple[Completion, list[Message]]:
    """A stored completion and its answers, if the caller may see it (else 404, as if it did
    not exist)."""
    with session_scope(db) as session:
        found = turns.owned_completion(session, completion_id=completion_id, caller=caller)
        if found is None:
            raise NotFoundError(f"completion {completion_id!r} not found")
        answers = turns.answers_of(session, completion_id=completion_id)
    return found, answers
