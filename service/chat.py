"""One chat turn: validate, store the prompt, generate, store the answers, respond.

The order is what makes "nothing is acknowledged before it is committed" true:
1. the new messages and a `running` completion are committed before generation starts;
2. the answers are committed before the client sees a finish (the full response, or, when
   streaming, the chunks carrying `finish_reason` and then `[DONE]`);
3. a failure is committed as a `failed` completion with its error before the error is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine as Database

from service import observability
from service.api.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    DeltaMessage,
    ResponseMessage,
    StoredCompletion,
    StreamChoice,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from service.auth import Principal
from service.core.config import Settings
from service.core.db import session_scope
from service.core.errors import (
    InvalidRequestError,
    NotFoundError,
    PrefloopError,
    error_body,
)
from service.engines import base
from service.engines.base import Engine, GenerationRequest, GenerationStream, SamplingParams
from service.storage import crud
from service.storage.models import new_id

log = logging.getLogger(__name__)


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
    body: ChatCompletionRequest,
    settings: Settings,
    engine: Engine,
    adapter: str | None,
    segment: str = "default",
) -> ChatPlan:
    """Check the request against the limits; raises 4xx errors. ``adapter`` is what the router
    resolved the request's ``model`` to (None: the base model)."""
    unknown = sorted(body.model_extra or {})
    if unknown:
        log.warning("ignoring unknown request fields: %s", ", ".join(unknown))
    _check_tools_and_logprobs(body, engine)
    if not body.messages and body.regenerate is None:
        raise InvalidRequestError(
            "messages must contain at least one message (or set `regenerate`)", param="messages"
        )
    if len(body.messages) > settings.max_messages:
        raise InvalidRequestError(
            f"too many messages: {len(body.messages)} > {settings.max_messages}", param="messages"
        )
    for i, m in enumerate(body.messages):
        if len(m.text()) > settings.max_message_chars:
            raise InvalidRequestError(
                f"message {i} is {len(m.text())} characters; the limit is "
                f"{settings.max_message_chars}",
                param=f"messages.{i}.content",
            )
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise InvalidRequestError(
            f"{param} is {max_tokens}; the limit is {settings.max_tokens_limit}", param=param
        )
    if body.n > settings.max_n:
        raise InvalidRequestError(f"n is {body.n}; the limit is {settings.max_n}", param="n")
    stops = body.stop or []
    if len(stops) > settings.max_stop_sequences:
        raise InvalidRequestError(
            f"at most {settings.max_stop_sequences} stop sequences are allowed", param="stop"
        )
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

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=settings.default_temperature if body.temperature is None else body.temperature,
        top_p=settings.default_top_p if body.top_p is None else body.top_p,
        n=body.n,
        stop=tuple(stops),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=logit_bias,
        response_format=(
            body.response_format.model_dump(by_alias=True, exclude_none=True)
            if body.response_format
            else None
        ),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    return ChatPlan(
        model=body.model or engine.model_name,
        adapter=adapter,
        segment=segment,
        messages=[m.plain() for m in body.messages],
        params=params,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        tool_choice=body.tool_choice,
    )


def wants_duel(body: ChatCompletionRequest, caller: Principal, settings: Settings) -> bool:
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


def _check_tools_and_logprobs(body: ChatCompletionRequest, engine: Engine) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    calls = any(m.role == "tool" or m.tool_calls for m in body.messages)
    if (body.tools or calls or body.tool_choice is not None) and not engine.supports_tools:
        raise InvalidRequestError(
            "tools need the vLLM engine (PREFLOOP_ENGINE=vllm): the embedded engine's model "
            "cannot be offered tools, nor read tool calls and results",
            param="tools",
        )


def _start_turn(
    db: Database, engine: Engine, plan: ChatPlan, body: ChatCompletionRequest, caller: Principal
) -> crud.StartedTurn:
    with session_scope(db) as session:
        turn = crud.start_completion(
            session,
            caller=caller,
            user_id=caller.visitor_user or body.user,  # widget visitors: server-issued
            conversation_id=body.conversation_id,
            parent_id=body.parent_id,
            messages=plan.messages,
            model=plan.model,
            base_model=engine.model_name,
            adapter_version=plan.adapter,
            segment=plan.segment,
            params=_params_record(plan.params),
            stream=body.stream,
            regenerate=body.regenerate,
            tools=plan.tools_record(),
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
    choices: list[crud.ChoiceRecord],
    status: str,
    error: str | None,
    prompt_tokens: int | None,
    started: float,
) -> None:
    try:
        with session_scope(db) as session:
            completion = crud.finish_completion(
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
    db: Database, engine: Engine, plan: ChatPlan, body: ChatCompletionRequest, caller: Principal
) -> tuple[crud.StartedTurn, GenerationStream, float]:
    started = time.perf_counter()
    turn = await run_in_threadpool(_start_turn, db, engine, plan, body, caller)
    observability.generation_started()  # every started turn ends in _finish
    # A regeneration keeps the response_format of the answer it redoes (crud copies it).
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

    def records(self) -> list[crud.ChoiceRecord]:
        return [
            crud.ChoiceRecord(
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
        done = sum(self.tokens)
        return Usage(
            prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done
        )


async def complete_chat(
    db: Database, engine: Engine, plan: ChatPlan, body: ChatCompletionRequest, caller: Principal
) -> ChatCompletionResponse:
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
    return ChatCompletionResponse(
        id=turn.completion.id,
        model=plan.model,
        choices=[
            Choice(
                index=r.index,
                message=_message(r.text, r.tool_calls),
                finish_reason=r.finish_reason,
                logprobs=_logprobs(acc.logprobs[r.index], plan.params),
                message_id=r.message_id,
            )
            for r in records
        ],
        usage=acc.usage(stream.prompt_tokens),
        conversation_id=turn.completion.conversation_id,
        adapter_version=plan.adapter,
    )


def _message(text: str, tool_calls: list[dict[str, Any]] | None) -> ResponseMessage:
    # OpenAI sends null content with tool calls and nothing else.
    return ResponseMessage(
        content=None if tool_calls and not text else text,
        tool_calls=[ToolCall.model_validate(c) for c in tool_calls] if tool_calls else None,
    )


def _logprobs(entries: list[base.TokenLogprob], params: SamplingParams) -> ChoiceLogprobs | None:
    """The engine's records in OpenAI's shape; None when the request did not ask."""
    if params.logprobs is None:
        return None

    def top(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode(errors="replace")))

    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                **top(e.token, e.logprob).model_dump(),
                top_logprobs=[top(t, lp) for t, lp in e.top],
            )
            for e in entries
        ]
    )


async def stream_chat(
    db: Database, engine: Engine, plan: ChatPlan, body: ChatCompletionRequest, caller: Principal
) -> AsyncIterator[str]:
    """Start the turn (errors here are still plain HTTP errors), then return the SSE body."""
    turn, stream, started = await _begin(db, engine, plan, body, caller)
    return _sse(db, plan, turn, stream, started)


async def _sse(
    db: Database,
    plan: ChatPlan,
    turn: crud.StartedTurn,
    stream: GenerationStream,
    started: float,
) -> AsyncIterator[str]:
    cid, created = turn.completion.id, int(time.time())
    acc = _Collector(plan.choice_adapters())

    def chunk(choices: list[StreamChoice], usage: Usage | None = None, **extra: Any) -> str:
        body = ChatCompletionChunk(
            id=cid, created=created, model=plan.model, choices=choices, usage=usage, **extra
        )
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

    finish = dict(status="succeeded", error=None)
    try:
        yield chunk(
            [
                StreamChoice(
                    index=i, delta=DeltaMessage(role="assistant", content=""), message_id=mid
                )
                for i, mid in enumerate(acc.ids)
            ],
            conversation_id=turn.completion.conversation_id,
            adapter_version=plan.adapter,
        )
        async for d in stream:
            acc.add(d)
            if d.text or d.logprobs or d.tool_calls:
                delta = DeltaMessage(content=d.text or None, tool_calls=list(d.tool_calls) or None)
                lp = _logprobs(list(d.logprobs), plan.params)
                yield chunk([StreamChoice(index=d.index, delta=delta, logprobs=lp)])
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
        finish = dict(status="failed", error=f"the answer could not be stored: {exc}")
        stored = False
    else:
        stored = True

    if finish["status"] != "succeeded":
        err = error_body(str(finish["error"]), "engine_error" if stored else "server_error")
        yield f"data: {json.dumps(err)}\n\n"
        yield "data: [DONE]\n\n"
        return
    yield chunk(
        [
            StreamChoice(index=i, delta=DeltaMessage(), finish_reason=acc.finish[i])
            for i in range(plan.params.n)
        ]
    )
    if plan.include_usage:
        yield chunk([], usage=acc.usage(stream.prompt_tokens))
    yield "data: [DONE]\n\n"


def read_completion(db: Database, completion_id: str, caller: Principal) -> StoredCompletion:
    """A stored completion, if the caller may see it (else 404, as if it did not exist)."""
    with session_scope(db) as session:
        found = crud.owned_completion(session, completion_id=completion_id, caller=caller)
        if found is None:
            raise NotFoundError(f"completion {completion_id!r} not found")
        answers = crud.answers_of(session, completion_id=completion_id)
    usage = None
    if found.prompt_tokens is not None:
        done = found.completion_tokens or 0
        usage = Usage(
            prompt_tokens=found.prompt_tokens,
            completion_tokens=done,
            total_tokens=found.prompt_tokens + done,
        )
    return StoredCompletion(
        id=found.id,
        created=int(found.created_at.timestamp()),
        model=found.model,
        status=found.status,  # type: ignore[arg-type]
        error=found.error,
        choices=[
            Choice(
                index=m.choice_index or 0,
                message=_message(m.content, m.tool_calls),
                finish_reason=m.finish_reason,
                message_id=m.id,
            )
            for m in answers
        ],
        usage=usage,
        user=found.user_id,
        conversation_id=found.conversation_id,
        adapter_version=found.adapter_version,
    )
